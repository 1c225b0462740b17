"""Automatic restart after a fault: under `torchrun --max-restarts N` a worker that dies (SIGKILL, the OOM
killer, a crash, a hang the watchdog ends) makes torchrun start every worker again; the new workers find
this out, resume from the newest checkpoint that verifies, name the fault, and count what it cost.

- The stores (rn50.system.store): a fresh process-group store per attempt, and torchrun's agent store, which
  outlives the attempts: the watchdog publishes its heartbeats there, and every rank records how it ended
  (`recorded`), so that the next attempt can name the rank that failed first, what it was doing and how far
  training had got.
- `resume_on_restart(out, resume)`: on a restart of a job that had started training in --out, `--resume
  auto` (the command line needs no --resume for it): the resume choice, returned, never written back.
- `report_restart(...)`: the restart line and a record in `RUN/faults.jsonl`: the fault, the rank, its phase,
  the checkpoint resumed from, the steps lost and the seconds from the fault to training again.
- `CheckpointCadence`: `--checkpoint-every 500` (steps) or `--checkpoint-every 10m` (time, agreed by every
  rank).

Everything here degrades to nothing outside torchrun (one process, srun tasks, a container's restart
policy): a restart is then a start with `--resume auto`, and the fault is named from the run folder alone.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import time
from pathlib import Path

from rn50.config.run_settings import Seconds
from rn50.reliability.exits import exit_code_of
from rn50.system.dist import any_rank
from rn50.system.store import agent_store, attempt_id, earlier_attempt_store, max_restarts, restart_count, run_id

JOB_FILE = ".job.json"  # the run folder's note of which torchrun job trains in it, and how its attempts ended
FAULTS_FILE = "faults.jsonl"  # one record per restart after a fault


# --- how each rank ended -----------------------------------------------------------------------------

def record_exit(rank: int, code: int, reason: str, phase: str | None = None) -> None:
    """This rank's end and what it was doing, for the next attempt's fault report (nothing outside torchrun)."""
    store = agent_store()
    if store is None:
        return
    try:
        store.set(f"exit/{rank}", json.dumps({"code": code, "reason": reason[:300], "time": time.time(),
                                              "phase": phase,
                                              "pid": os.getpid(), "host": socket.gethostname()}))
    except Exception:  # the agent's store may be gone with its node: nothing to record into
        pass


# a collective that failed because another rank is gone (dead, killed, unreachable): gloo and NCCL wordings
_PEER_LOST = re.compile(r"Connection reset by peer|Connection closed by peer|Broken pipe|Connection refused|"
                        r"remote process exited|NCCL communicator was aborted|ProcessGroupNCCL.*(abort|timeout)|"
                        r"Socket Timeout|Timed out waiting", re.I)


def peer_lost(exc: BaseException) -> bool:
    return isinstance(exc, (RuntimeError, OSError)) and bool(_PEER_LOST.search(str(exc)))


def recorded(fn, rank: int, world_size: int, describe, *args):
    """Run `fn(*args)` and record how this rank ended. Where a collective failed because another rank is
    gone, say so in one line (no traceback: the rank that failed first is the story, and torchrun
    restarts the job under --max-restarts) and exit 1."""
    try:
        result = fn(*args)
    except BaseException as exc:
        code = exit_code_of(exc)
        lost = world_size > 1 and peer_lost(exc)
        record_exit(rank, code, ("peer lost: " if lost else "") + f"{type(exc).__name__}: {exc}",
                    describe().partition(" while ")[2])
        if lost:
            text = " ".join(str(exc).split())
            found = _PEER_LOST.search(text)
            said = text[max(0, found.start() - 60):found.end()].split("] ", 1)[-1]  # past gloo's source location
            print(f"failed: {describe()}: a collective failed because another rank is gone ({type(exc).__name__}: "
                  f"{said}); the rank that failed first is named above or in torchrun's report"
                  + (f"; torchrun restarts the job (restarts left: {max_restarts() - restart_count()})"
                     if max_restarts() > restart_count() else ""), file=sys.stderr, flush=True)
            raise SystemExit(1) from None
        raise
    record_exit(rank, 0, "finished")
    return result


# --- resuming on a restart ---------------------------------------------------------------------------

def _job(out: Path) -> dict:
    try:
        return json.loads((Path(out) / JOB_FILE).read_text())
    except (OSError, ValueError):
        return {}


def resume_on_restart(out: Path, resume: str | None) -> tuple[str | None, dict | None]:
    """(the checkpoint to resume from, the job note of the attempt that failed). On a restart by torchrun of a
    job that had started training in --out: `auto`, the newest checkpoint that verifies, whatever --resume
    said (none, or a path the run has moved past). Otherwise --resume as given and no job note."""
    if restart_count() == 0 or not run_id():
        return resume, None
    job = _job(out)
    if job.get("run_id") != run_id():  # the failed attempt never got to training: start as it did
        return resume, None
    return "auto", job


def mark_training(out: Path, is_main: bool) -> None:
    """Rank 0 notes in the run folder that this job (torchrun's run id) trains in it, before the first step."""
    if not is_main:
        return
    note = {"run_id": run_id(), "restart": restart_count(), "attempt": attempt_id(), "started": time.time(),
            "pid": os.getpid(), "host": socket.gethostname()}
    tmp = Path(out) / f".{JOB_FILE}.tmp"
    tmp.write_text(json.dumps(note) + "\n")
    os.replace(tmp, Path(out) / JOB_FILE)


_PHASE = re.compile(r"epoch (\d+) (after )?step (\d+)")


def step_reached(phase: str, steps_per_epoch: int) -> int | None:
    """Optimizer steps done in all when a rank was in `phase` (the watchdog's words)."""
    saving = re.search(r"saving a checkpoint at epoch (\d+) step (\d+)", phase or "")
    if saving:
        return (int(saving[1]) - 1) * steps_per_epoch + int(saving[2])
    found = _PHASE.search(phase or "")
    if not found:
        validating = re.search(r"epoch (\d+): validation", phase or "")  # the epoch's steps are done
        return int(validating[1]) * steps_per_epoch if validating else None
    epoch, after, step = int(found[1]), found[2], int(found[3])
    return (epoch - 1) * steps_per_epoch + (step if after else step - 1)


def previous_attempt(world_size: int) -> dict | None:
    """The heartbeats and exit records of the attempt before this one, from torchrun's store."""
    store = earlier_attempt_store()
    if store is None:
        return None
    beats, exits = {}, {}
    for rank in range(world_size):
        for kind, into in (("heartbeat", beats), ("exit", exits)):
            key = f"{kind}/{rank}" if kind == "exit" else f"rn50/heartbeat/{rank}"
            try:
                if store.check([key]):
                    into[rank] = json.loads(store.get(key))
            except Exception:
                pass
    return {"beats": beats, "exits": exits}


def name_fault(previous: dict | None, steps_per_epoch: int) -> dict:
    """Which rank failed first, how, while doing what, when and at which step, from the failed attempt's
    heartbeats and exit records. A rank that recorded no exit died without a word (a signal such as SIGKILL,
    the OOM killer, or its node was lost); a rank whose exit says "peer lost" only saw another one go."""
    if not previous or not previous["beats"]:
        return {"cause": "unknown (no record of the failed attempt: it ran outside torchrun's store)"}
    beats, exits = previous["beats"], previous["exits"]
    own = {r: e for r, e in exits.items() if not e["reason"].startswith("peer lost")}
    silent = [r for r in beats if r not in exits]
    if own:  # a rank that ended on its own account (watchdog, crash, error) before the others saw it
        rank = min(own, key=lambda r: own[r]["time"])
        code, reason = own[rank]["code"], own[rank]["reason"]
        cause = {4: "hung (the watchdog ended it)", 2: "a user error", 3: "diverged", 75: "stopped by a signal",
                 130: "stopped by Ctrl-C"}.get(code, "crashed") + f" (exit {code}: {reason.splitlines()[0][:200]})"
        when = own[rank]["time"]
        named = re.search(r"stalest rank (\d+)", reason) if code == 4 else None
        if named and int(named[1]) in beats:  # the watchdog names the frozen rank, not itself
            rank = int(named[1])
            cause = (f"stopped making progress (frozen, stopped or stuck; the watchdog on rank "
                     f"{min(own, key=lambda r: own[r]['time'])} ended the job after --hang-timeout)")
            when = beats[rank]["progress"]
    elif silent:
        rank = min(silent, key=lambda r: beats[r]["beat"])
        cause = "died without a word (killed by a signal such as SIGKILL, the OOM killer, or its node was lost)"
        when = beats[rank]["beat"]
    else:
        rank = min(exits, key=lambda r: exits[r]["time"])
        cause, when = f"ended first (exit {exits[rank]['code']}: {exits[rank]['reason'][:200]})", exits[rank]["time"]
    beat = beats.get(rank, {})
    # the survivors' exit records say where they stood when the collective failed; heartbeats lag by up to
    # their period
    phases = [b.get("phase") or "" for b in beats.values()] + [e.get("phase") or "" for e in exits.values()]
    reached = [s for s in (step_reached(phase, steps_per_epoch) for phase in phases) if s is not None]
    return {"rank": rank, "host": beat.get("host"), "pid": beat.get("pid"), "phase": beat.get("phase"),
            "cause": cause, "fault_time": when, "step_reached": max(reached) if reached else None}


def report_restart(out: Path, job: dict, checkpoint: dict | None, world_size: int, steps_per_epoch: int,
                   say) -> dict:
    """The restart line (rank 0) and its record in RUN/faults.jsonl."""
    # the failed attempt's steps: numbered as its checkpoint numbers them (an elastic change alters the count)
    fault = name_fault(previous_attempt(world_size), checkpoint["steps_per_epoch"] if checkpoint else steps_per_epoch)
    resumed_at = checkpoint["step"] if checkpoint else 0
    reached = fault.get("step_reached")
    lost = max(0, reached - resumed_at) if reached is not None else None
    back_s = time.time() - fault["fault_time"] if fault.get("fault_time") else None
    record = {"time": time.time(), "restart": restart_count(), "max_restarts": max_restarts(), **fault,
              "resumed_step": resumed_at, "steps_lost": lost, "restart_s": back_s}
    who = (f"rank {fault['rank']} (pid {fault['pid']} on {fault['host']}) " if "rank" in fault else "")
    while_ = f" while {fault['phase']}" if fault.get("phase") else ""
    say(f"restart {restart_count()} of {max_restarts()} (torchrun --max-restarts) after a fault: {who}{fault['cause']}"
        f"{while_}; resuming from step {resumed_at}"
        + (f": {lost} step{'s' if lost != 1 else ''} lost" if lost is not None else "")
        + (f", training again {back_s:.1f} s after the fault" if back_s is not None else "")
        + f"; faults so far in {Path(out) / FAULTS_FILE}")
    try:
        with open(Path(out) / FAULTS_FILE, "a") as handle:
            handle.write(json.dumps(record) + "\n")
    except OSError:
        pass
    return record


# --- --checkpoint-every STEPS | DURATION (parsed by rn50.config.run_settings.parse_every) -------------

class CheckpointCadence:
    """When the periodic checkpoint is due. Steps: every N optimizer steps. Time: every rank looks at its
    clock at the steps where the stop signal is agreed (every step alone, every `check_every` with several
    ranks) and all save when any rank's interval has passed, so they save at the same step."""

    def __init__(self, every, check_every: int):
        self.every, self.check_every = every, check_every
        self.last = time.monotonic()

    def __bool__(self) -> bool:
        return bool(self.every)

    def due(self, steps_total: int) -> bool:
        if not self.every:
            return False
        if not isinstance(self.every, Seconds):
            return steps_total % int(self.every) == 0
        if steps_total % self.check_every:
            return False
        if any_rank(time.monotonic() - self.last >= float(self.every)):
            self.last = time.monotonic()
            return True
        return False



def started(out: Path, job: dict | None, checkpoint: dict | None, env, steps_per_epoch: int, say) -> None:
    """Before the first step: the run folder's job note, and on a restart its line and fault record."""
    previous = job.get("restart") if job is not None else None
    mark_training(out, env.is_main)
    if job is None or not env.is_main:
        return
    if previous == restart_count():  # torchrun restarted the group without counting it: a membership change
        say(f"the group changed membership (torchrun --nnodes MIN:MAX: a node joined), now {env.world_size} "
            f"process{'es' if env.world_size != 1 else ''}: no fault, resuming from step "
            f"{checkpoint['step'] if checkpoint else 0}")
        return
    report_restart(out, job, checkpoint, env.world_size, steps_per_epoch, say)
