"""The process group's store under torchrun, fresh for every attempt, and torchrun's agent store beside it.

- `attempt_store(rank, world_size)`: a fresh store for this attempt's process group. torchrun's agent keeps
  ONE store for the whole job and hands its address to every attempt, and torch's env:// set-up no longer
  keys it by attempt, so a restarted group read the dead group's gloo addresses and failed in
  `connectFullMesh ... Connection refused` (measured here, torch 2.14). Rank 0 now hosts a new store per
  attempt and publishes its address in the agent's store with a nonce; the other ranks take the newest
  address that answers with that nonce.
- `agent_store()`: the agent's store itself, which outlives the attempts, under this attempt's prefix: the
  watchdog publishes its heartbeats there and every rank records how it ended (rn50.reliability.restart),
  so that the next attempt can name the fault. `earlier_attempt_store()` is the attempt before this one's.

Everything here is None outside torchrun's shared agent store (one process, srun tasks).
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from datetime import timedelta

_agent = None  # torchrun's agent store (outlives the attempts), or None
_own_server = None  # rank 0: this attempt's store server, kept alive with the process
_attempt = ""  # this attempt's nonce: the prefix of its heartbeats and exit records in the agent store


def restart_count() -> int:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def max_restarts() -> int:
    return int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0)


def run_id() -> str:
    return os.environ.get("TORCHELASTIC_RUN_ID", "")


def _key(*parts) -> str:
    return "/".join(["rn50", run_id(), *map(str, parts)])


# --- the process group's store, fresh for every attempt ------------------------------------------------

def attempt_store(rank: int, world_size: int, timeout: timedelta = timedelta(minutes=30)):
    """A store no earlier attempt has written to, for init_process_group; None in one process and outside
    torchrun's shared agent store (there env:// starts a fresh one anyway). Connects to the agent's store
    (agent_store) in every case where torchrun shares one."""
    global _agent, _own_server, _attempt
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    from torch.distributed import TCPStore

    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    _agent = TCPStore(addr, port, world_size, is_master=False, timeout=timeout)
    where = _key("attempt-store")
    if world_size == 1:  # no process group to set up; the agent's store still keeps the fault records
        _attempt = uuid.uuid4().hex
        note_attempt(True)
        return None
    if rank == 0:
        _attempt = uuid.uuid4().hex
        _own_server = TCPStore(addr, 0, world_size, is_master=True, timeout=timeout, wait_for_workers=False)
        _own_server.set("rn50/attempt", _attempt)
        note_attempt(True)  # before the address: a rank that finds this attempt finds it listed
        _agent.set(where, json.dumps({"addr": addr, "port": _own_server.port, "attempt": _attempt}))
        return _own_server
    deadline, refused = time.monotonic() + timeout.total_seconds(), set()
    while time.monotonic() < deadline:
        record = _agent.get(where).decode()  # blocks until rank 0 of the first attempt has set it
        if record not in refused:
            found = json.loads(record)
            try:  # an earlier attempt's rank 0 is gone: its port refuses at once
                socket.create_connection((found["addr"], found["port"]), timeout=5).close()
                store = TCPStore(found["addr"], found["port"], world_size, is_master=False,
                                 timeout=timeout, wait_for_workers=False)
                if store.check(["rn50/attempt"]) and store.get("rn50/attempt").decode() == found["attempt"]:
                    _attempt = found["attempt"]
                    return store
            except (OSError, RuntimeError):
                pass
            refused.add(record)
        time.sleep(0.1)
    raise RuntimeError(f"rank {rank}: rank 0 never published this attempt's store in torchrun's store at "
                       f"{addr}:{port} within {timeout.total_seconds():.0f} s")


def agent_store():
    """torchrun's agent store with this attempt's prefix (heartbeats, exit records), or None."""
    if _agent is None or not _attempt:
        return None
    from torch.distributed import PrefixStore

    return PrefixStore(_key(_attempt) + "/", _agent)


def _attempts() -> list[str]:
    """The job's attempts so far, oldest first, as rank 0 of each listed them in the agent's store."""
    key = _key("attempts")
    return json.loads(_agent.get(key).decode()) if _agent.check([key]) else []


def note_attempt(is_main: bool) -> None:
    """Rank 0 adds this attempt to the job's list in torchrun's store (read by the next attempt)."""
    if _agent is None or not is_main or not _attempt:
        return
    try:
        _agent.set(_key("attempts"), json.dumps((_attempts() + [_attempt])[-20:]))
    except Exception:
        pass


def attempt_id() -> str:
    """This attempt's nonce ("" outside torchrun's agent store)."""
    return _attempt


def earlier_attempt_store():
    """The agent store under the prefix of the attempt before this one (its heartbeats and exit records), or
    None: outside torchrun's store, or on the job's first attempt."""
    if _agent is None:
        return None
    from torch.distributed import PrefixStore

    try:
        earlier = [a for a in _attempts() if a != _attempt]
    except Exception:  # the agent's store may be gone with its node
        return None
    return PrefixStore(_key(earlier[-1]) + "/", _agent) if earlier else None
