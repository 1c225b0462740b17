"""What else ran on the machine during a measurement window (issue 37): `LoadMonitor` between start() and stop(),
`judge` from its figures to busy or not and why, `merge` from a row's windows (or ranks) to one row's figures.
Where /proc or NVML is missing the figures say so ("reason", "gpu_reason"); nothing here stops a benchmark.

CPU, from /proc (Linux), in SC_CLK_TCK ticks. busy = user + nice + system of /proc/stat's "cpu" line; left out:
guest and guest_nice (already inside user and nice), idle and iowait, irq and softirq (no process's: the kernel
cannot say whose I/O they served, and a loader reading a GB/s pays its own; irq_cores, not judged) and steal (the
hypervisor ran another guest while a vCPU was ready; steal_cores, judged apart). ours = utime + stime + cutime +
cstime (all threads, and the children each reaped) summed over the job: the tree below its root, which is
torchrun's agent, our parent, where TORCHELASTIC_RUN_ID is set (its children are this node's ranks), else this
process. DataLoader workers, DALI's threads and the other local ranks are ours; another job is not, whoever
started it. Not a session or process-group rule: torchrun starts each rank in a session of its own, and a
shell's session holds every job started from it. The tree is read at both ends: a process of ours that ends in
the window moves its time into its reaper's c-fields, so the sums' difference holds it (one orphaned and reaped
by init counts as other: rare, and it errs towards busy). other = busy - ours (never below 0) over the wall
time, as cores and as a fraction of the machine's cores (cpuN lines): the whole machine, other containers too.

GPU, from NVML: the compute and graphics processes on the device and the throttle reasons, read at start, at
stop and every `interval` s by a background thread (three NVML calls; nothing in the step). A pid that is not
the job's at either end is another's; inside a container NVML gives host pids, none ours: then the compute
processes beyond one (ours) are counted as gpu_unmatched_processes.
"""

from __future__ import annotations

import os
import threading
import time

from rn50.system import telemetry  # NVML: its guarded pynvml import and its handle (telemetry.open_nvml)

# NVML's clock event (throttle) reasons by bit. Not named: gpu_idle (0x1, between steps), the applications
# clocks and display clock settings (0x2, 0x100: settings, not interference)
THROTTLE = {0x4: "sw_power_cap", 0x8: "hw_slowdown", 0x10: "sync_boost", 0x20: "sw_thermal_slowdown",
            0x40: "hw_thermal_slowdown", 0x80: "hw_power_brake_slowdown", 0x200: "board_limit", 0x400: "reliability"}

# judge's thresholds, justified in its docstring
THRESHOLDS = {"other_cpu_cores": 0.25, "steal_fraction": 0.01, "gpu_kinds": frozenset({"compute"}),
              "throttle_reasons": frozenset(set(THROTTLE.values()) - {"sw_power_cap"})}


def parse_proc_stat(text: str) -> dict:
    """/proc/stat: the aggregate "cpu" line's busy, irq (irq + softirq) and steal ticks, and the cpuN lines."""
    fields, cores = None, 0
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        if name == "cpu":
            fields = [int(v) for v in rest.split()] + [0] * 8  # kernels before 2.6.11 end before steal
        elif name.startswith("cpu") and name[3:].isdigit():
            cores += 1
    if fields is None:
        raise ValueError("no aggregate 'cpu' line in /proc/stat")
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return {"busy": user + nice + system, "irq": irq + softirq, "steal": steal, "cores": cores}


def parse_pid_stat(text: str) -> tuple[int, int]:
    """/proc/<pid>/stat: (ppid, utime + stime + cutime + cstime). The command name, the second field, is in
    parentheses and may hold spaces and parentheses itself: the fields are counted after the last ')'."""
    rest = text[text.rindex(")") + 1:].split()  # rest[0] is field 3 (state)
    return int(rest[1]), sum(int(v) for v in rest[11:15])  # ppid is field 4; utime..cstime fields 14..17


def job_root(environ, pid: int, ppid: int) -> int:
    """The root of this process's job: torchrun's agent, our parent, for a rank it started; else ourselves."""
    return ppid if environ.get("TORCHELASTIC_RUN_ID") and ppid > 1 else pid


def job_pids(parents: dict[int, int], root: int) -> set[int]:
    """The root and every process below it, from {pid: ppid}."""
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), [root]
    while todo:
        found.add(pid := todo.pop())
        todo += [child for child in children.get(pid, ()) if child not in found]
    return found


def snapshot(root: int, proc: str = "/proc", machine_first: bool = True) -> dict:
    """The machine's ticks, the job's ticks and pids, and the time. The machine is read first at a window's start
    and last at its end (`machine_first=False`), so its interval holds the job's and ours never outgrows it."""
    def machine():
        with open(f"{proc}/stat") as f:
            return {**parse_proc_stat(f.read()), "t": time.monotonic()}

    found = machine() if machine_first else {}
    parents, ticks = {}, {}
    for name in os.listdir(proc):
        if name.isdigit():
            try:
                with open(f"{proc}/{name}/stat") as f:
                    parents[int(name)], ticks[int(name)] = parse_pid_stat(f.read())
            except (OSError, ValueError):  # it ended between the listing and the read
                pass
    pids = job_pids(parents, root)
    found.update(ours=sum(ticks.get(p, 0) for p in pids), pids=pids)
    return found if machine_first else {**found, **machine()}


def difference(start: dict, stop: dict, hz: float) -> dict:
    """The window's CPU figures from two snapshots: CPU seconds over wall seconds, as cores."""
    wall = max(stop["t"] - start["t"], 1e-9)
    own = max(0, stop["ours"] - start["ours"]) / hz
    other = max(0.0, (stop["busy"] - start["busy"]) / hz - own)
    return {"wall_s": wall, "cores": stop["cores"], "own_cpu_cores": own / wall, "other_cpu_cores": other / wall,
            "other_cpu_fraction": other / wall / max(stop["cores"], 1),
            "steal_cores": (stop["steal"] - start["steal"]) / hz / wall,
            "irq_cores": (stop["irq"] - start["irq"]) / hz / wall}


def gpu_others(samples: list[tuple[list, int]], ours: set[int]) -> tuple[list[dict], int, list[str]]:
    """From NVML samples ([(pid, kind, used bytes or None)], throttle mask): the other processes seen (their
    largest memory), the compute processes beyond ours where no pid is ours (another pid namespace), and the
    throttle reasons named in any sample."""
    seen: dict[tuple[int, str], float | None] = {}
    for pid, kind, used in (p for processes, _ in samples for p in processes):
        mib = None if used is None else used / 2**20
        seen[pid, kind] = max((m for m in (seen.get((pid, kind)), mib) if m is not None), default=None)
    reasons = sorted({name for _, mask in samples for bit, name in THROTTLE.items() if mask & bit})
    if seen and not any(pid in ours for pid, _ in seen):
        return [], max(0, len({pid for pid, kind in seen if kind == "compute"}) - 1), reasons
    others = [{"pid": pid, "kind": kind, "used_mib": mib} for (pid, kind), mib in sorted(seen.items())
              if pid not in ours]
    return others, 0, reasons


def judge(figures: dict, thresholds: dict = THRESHOLDS) -> tuple[bool, list[str]]:
    """Busy, and why, from a window's (or a merged row's) figures; a figure that is None or absent says nothing.
    - other_cpu_cores > 0.25: /proc/stat and the processes' own times, both in 10 ms ticks, disagree by up to
      0.1 core over 0.5 s windows and 0.03 over 1-3 s ones (busy minus every process, 2 vCPUs, saturated);
      a quarter core sustained over a window is a job, and on a core it shares with a rank's main thread (the
      one that feeds the GPU) it takes up to that share of the thread's time. Windows under 0.5 s are noisier.
    - steal_cores / cores > 0.01: every thread loses about that share of its time, the size of the window-to-
      window spread that the verdicts already call noise; a dedicated instance steals nothing.
    - any other compute process on the GPU (or one beyond ours where pids cannot be matched): it time-slices the
      SMs and shares the memory, whatever its size. Graphics processes (a workstation's display server) are
      listed, not judged: they are always there and cost little.
    - any throttle reason but sw_power_cap (gpu_idle and the clock settings are never named): slowdowns, thermal,
      power brake, sync boost, board limit and reliability hold the clocks below what the card sustains; the
      power cap is the card's own ceiling reached by our own load on a healthy card, in the figures only."""
    why, worst = [], f" in the worst of {figures['windows']} windows" if figures.get("windows", 1) > 1 else ""
    cores, other = figures.get("cores"), figures.get("other_cpu_cores")
    if other is not None and other > thresholds["other_cpu_cores"]:
        why.append(f"other processes kept {other:.2f} CPU cores busy on average{worst} "
                   f"({figures.get('other_cpu_fraction') or 0:.0%} of the machine's {cores})")
    steal = figures.get("steal_cores")
    if steal is not None and cores and steal / cores > thresholds["steal_fraction"]:
        why.append(f"the hypervisor stole {steal / cores:.1%} of each vCPU's time{worst} ({steal:.2f} cores): "
                   "another virtual machine competes for this host")
    others = [p for p in figures.get("gpu_other_processes") or () if p["kind"] in thresholds["gpu_kinds"]]
    if others:
        why.append(f"{len(others)} other process(es) on the GPU: " + ", ".join(
            f"pid {p['pid']} ({p['kind']}, " + ("? MiB)" if p["used_mib"] is None else f"{p['used_mib']:.0f} MiB)")
            for p in others))
    if figures.get("gpu_unmatched_processes"):
        why.append(f"{figures['gpu_unmatched_processes']} compute process(es) on the GPU besides ours (NVML's pids "
                   "are another pid namespace's, e.g. the host's outside a container)")
    reasons = [r for r in figures.get("throttle_reasons") or () if r in thresholds["throttle_reasons"]]
    if reasons:
        why.append("the GPU's clocks were held down: " + ", ".join(reasons))
    return bool(why), why


MERGED_MAX = ("cores", "own_cpu_cores", "other_cpu_cores", "other_cpu_fraction", "steal_cores", "irq_cores",
              "gpu_unmatched_processes")


def merge(windows: list[dict], thresholds: dict = THRESHOLDS) -> dict:
    """One row's figures from its windows' (or its ranks'): the largest of each figure, the union of the GPU
    processes and throttle reasons, and the judgement again. The largest, not the mean: a row's img/s is the
    mean of its windows and its spread their range, so one disturbed window moves both, and a mean over three
    windows would let a full core of disturbance in one pass under the threshold at a third of its size."""
    cpu = [w for w in windows if w.get("available")]
    gpu = [w for w in windows if w.get("gpu_available")]
    out = {"available": bool(cpu), "reason": None if cpu else next((w["reason"] for w in windows), "no window"),
           "gpu_available": bool(gpu),
           "gpu_reason": None if gpu else next((w["gpu_reason"] for w in windows), "no window"),
           # merged figures count the windows they hold (a row's over its rounds, a run's over its rows)
           "windows": sum(w.get("windows", 1) for w in windows),
           "busy_windows": sum(w.get("busy_windows", int(bool(w.get("busy")))) for w in windows),
           "wall_s": sum(w.get("wall_s") or 0 for w in windows)}
    for key in MERGED_MAX:
        values = [w[key] for w in windows if w.get(key) is not None]
        out[key] = max(values, default=None)
    seen = sorted((p for w in windows for p in w.get("gpu_other_processes") or ()),  # the largest memory last
                  key=lambda p: (p["pid"], p["kind"], p["used_mib"] or 0))
    out["gpu_other_processes"] = list({(p["pid"], p["kind"]): p for p in seen}.values())
    out["throttle_reasons"] = sorted({r for w in windows for r in w.get("throttle_reasons") or ()})
    out["busy"], out["why"] = judge(out, thresholds)
    return out


class LoadMonitor:
    """The load besides this job between start() and stop(); stop() returns the figures, judged."""

    def __init__(self, device_index: int | None, interval: float = 1.0, thresholds: dict = THRESHOLDS,
                 proc: str = "/proc"):
        self.interval, self.thresholds, self.proc = interval, thresholds, proc
        self.root = job_root(os.environ, os.getpid(), os.getppid())
        self.reason = None if os.path.exists(f"{proc}/stat") else f"no {proc}/stat: the CPU figures need Linux"
        self.handle, self.gpu_reason = telemetry.open_nvml(device_index)
        self._start, self._samples, self._halt, self._thread = None, [], threading.Event(), None

    def _gpu_sample(self) -> tuple[list, int]:
        processes, mask = [], 0
        for kind, name in (("compute", "nvmlDeviceGetComputeRunningProcesses"),
                           ("graphics", "nvmlDeviceGetGraphicsRunningProcesses")):
            try:
                running = getattr(telemetry.pynvml, name)(self.handle)
                processes += [(p.pid, kind, p.usedGpuMemory) for p in running]
            except Exception:
                pass
        for name in ("nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons"):
            try:  # the newer name first; a driver may lack it where the binding has it
                mask = getattr(telemetry.pynvml, name)(self.handle)
                break
            except Exception:
                pass
        return processes, mask

    def _run(self) -> None:
        while not self._halt.wait(self.interval):
            self._samples.append(self._gpu_sample())

    def start(self) -> None:
        self._start = None
        if self.reason is None:
            try:
                self._start = snapshot(self.root, self.proc)
            except (OSError, ValueError) as exc:
                self.reason = f"/proc unreadable: {exc}"
        if self.handle is not None:
            self._samples, self._halt = [self._gpu_sample()], threading.Event()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()

    def stop(self) -> dict:
        unstarted = None if self._start or self.reason else "stop() without start()"
        figures = {"available": False, "reason": self.reason or unstarted, "gpu_available": self.handle is not None,
                   "gpu_reason": self.gpu_reason, "gpu_other_processes": [], "gpu_unmatched_processes": None,
                   "throttle_reasons": [], "job_root": self.root}
        ours = set()
        if self._start is not None:
            try:
                end = snapshot(self.root, self.proc, machine_first=False)
                figures.update(available=True, **difference(self._start, end, os.sysconf("SC_CLK_TCK")),
                               job_processes=len(end["pids"]))
                ours = self._start["pids"] | end["pids"]
            except (OSError, ValueError) as exc:
                figures["reason"] = f"/proc unreadable: {exc}"
        if self._thread is not None:
            self._halt.set()
            self._thread.join()
            self._thread = None
            self._samples.append(self._gpu_sample())
            ours = ours or {os.getpid()}
            others, unmatched, reasons = gpu_others(self._samples, ours)
            figures.update(gpu_samples=len(self._samples), gpu_other_processes=others,
                           gpu_unmatched_processes=unmatched, throttle_reasons=reasons)
        figures["busy"], figures["why"] = judge(figures, self.thresholds)
        return figures
