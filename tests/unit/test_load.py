"""rn50/system/load.py (issue 37): the /proc arithmetic on fixed text, the job's processes, the judgement at its
thresholds, the merge, the NVML paths with NVML absent and faked, and one real window on this machine in which
another job's busy loop counts as other and this job's own work does not."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from rn50.system import load, telemetry

HZ = 100
PROC_STAT = """cpu  186279 7 31632 69545 457 11 73 231 40 3
cpu0 86675 0 14012 43049 160 0 17 102 0 0
cpu1 99604 7 17620 26496 297 11 56 129 40 3
intr 1234 0 0 5
ctxt 5678
btime 1700000000
processes 20000
procs_running 3
procs_blocked 0
softirq 1 2 3
"""


def pid_stat(pid: int, comm: str, ppid: int, utime: int, stime: int, cutime: int = 0, cstime: int = 0) -> str:
    """A /proc/<pid>/stat line: fields 5-13 (pgrp .. cmajflt) between ppid and utime, 18-52 after cstime."""
    return (f"{pid} ({comm}) S {ppid} {pid} {pid} 0 -1 4194560 120 0 0 0 {utime} {stime} {cutime} {cstime} "
            "20 0 3 0 4242 12345678 900 18446744073709551615 1 1 0 0 0 0 0 16781312 2 0 0 0 17 1 0 0 0 0 0\n")


def test_proc_stat_busy_is_user_nice_system_and_guest_is_not_counted_twice():
    machine = load.parse_proc_stat(PROC_STAT)
    # guest (40) and guest_nice (3) are inside user and nice already; idle, iowait, irq, softirq, steal are not busy
    assert machine == {"busy": 186279 + 7 + 31632, "irq": 11 + 73, "steal": 231, "cores": 2}
    old_kernel = load.parse_proc_stat("cpu  10 0 5 100 0 0 0\ncpu0 10 0 5 100 0 0 0\n")  # no steal field
    assert old_kernel["steal"] == 0 and old_kernel["busy"] == 15 and old_kernel["cores"] == 1
    with pytest.raises(ValueError):
        load.parse_proc_stat("intr 1 2\n")


@pytest.mark.parametrize("comm", ["python", "my worker", "a) S 1 (b", ")) ((", "pt_main_thread) 9 9 9"])
def test_pid_stat_reads_the_fields_after_the_last_parenthesis_whatever_the_command_name(comm):
    """The command name may hold spaces and parentheses (prctl PR_SET_NAME, or a file named so): a parser that
    splits on spaces or stops at the first ')' reads the wrong fields."""
    assert load.parse_pid_stat(pid_stat(4242, comm, 77, 150, 30, 7, 3)) == (77, 150 + 30 + 7 + 3)


def test_the_job_is_the_tree_below_its_root_and_torchruns_agent_is_a_ranks_root():
    #        1 ── 10 (agent) ── 11 (rank 0) ── 13 (worker) ── 15
    #        │              └── 12 (rank 1)
    #        └── 20 (another job) ── 21
    parents = {1: 0, 10: 1, 11: 10, 12: 10, 13: 11, 15: 13, 20: 1, 21: 20}
    assert load.job_pids(parents, 11) == {11, 13, 15}  # rank 0 alone: rank 1 would be "other"
    assert load.job_pids(parents, 10) == {10, 11, 12, 13, 15}  # the whole job on this node
    assert load.job_pids(parents, 99) == {99}  # a root that ended: itself only
    assert load.job_root({"TORCHELASTIC_RUN_ID": "abc"}, pid=11, ppid=10) == 10
    assert load.job_root({}, pid=11, ppid=10) == 11  # not under torchrun: this process
    assert load.job_root({"TORCHELASTIC_RUN_ID": "abc"}, pid=11, ppid=1) == 11  # orphaned: never all of init


def test_difference_is_cpu_seconds_over_wall_seconds():
    start = {"busy": 1000, "irq": 10, "steal": 5, "cores": 4, "ours": 200, "t": 50.0}
    stop = {"busy": 1000 + 600, "irq": 10 + 20, "steal": 5 + 40, "cores": 4, "ours": 200 + 200, "t": 52.0}
    figures = load.difference(start, stop, HZ)
    # 6 busy CPU seconds in 2 s, 2 of them ours: others kept 2 cores busy, half of the machine's 4
    assert figures["wall_s"] == pytest.approx(2.0)
    assert figures["own_cpu_cores"] == pytest.approx(1.0)
    assert figures["other_cpu_cores"] == pytest.approx(2.0)
    assert figures["other_cpu_fraction"] == pytest.approx(0.5)
    assert figures["steal_cores"] == pytest.approx(0.2) and figures["irq_cores"] == pytest.approx(0.1)
    # rounding can make ours exceed the machine's busy ticks: other never goes below 0
    assert load.difference(start, {**stop, "busy": 1100}, HZ)["other_cpu_cores"] == 0.0


def write_proc(root, processes: dict[int, tuple[str, int, tuple[int, int, int, int]]], busy: int) -> None:
    root.mkdir(exist_ok=True)
    (root / "stat").write_text(f"cpu  {busy} 0 0 9999 0 0 0 0 0 0\ncpu0 {busy} 0 0 9999 0 0 0 0 0 0\n")
    for name in root.iterdir():
        if name.is_dir():
            (name / "stat").unlink()
            name.rmdir()
    for pid, (comm, ppid, ticks) in processes.items():
        (root / str(pid)).mkdir()
        (root / str(pid) / "stat").write_text(pid_stat(pid, comm, ppid, *ticks))


def test_a_process_of_ours_that_ends_in_the_window_is_still_ours(tmp_path):
    """Snapshots of a fixed /proc tree. Our worker 11 ran 30 ticks before the window, 50 in it, and was reaped by
    100: its 80 ticks moved into 100's cutime. The other job's 20 ran 300 ticks in the window; 21, its child,
    whose command name looks like a /proc/stat line, ran 10."""
    proc = tmp_path / "proc"
    write_proc(proc, {1: ("init", 0, (5, 5, 0, 0)), 100: ("python", 1, (100, 20, 0, 0)),
                      11: ("pt_data_worker", 100, (25, 5, 0, 0)), 20: ("other job", 1, (1000, 0, 0, 0)),
                      21: ("cpu  1 2 3) S 100", 20, (0, 0, 0, 0))}, busy=5000)
    start = load.snapshot(100, str(proc))
    assert start["pids"] == {100, 11} and start["ours"] == 150
    write_proc(proc, {1: ("init", 0, (5, 5, 0, 0)), 100: ("python", 1, (160, 30, 70, 10)),
                      20: ("other job", 1, (1300, 0, 0, 0)), 21: ("cpu  1 2 3) S 100", 20, (10, 0, 0, 0))},
               busy=5000 + 70 + 50 + 300 + 10)
    stop = load.snapshot(100, str(proc), machine_first=False)
    # ours: 100's own 70 ticks plus the worker's 50 in the window (its 30 before it were in the start sum)
    assert stop["ours"] - start["ours"] == 70 + 50
    figures = load.difference({**start, "t": 0.0}, {**stop, "t": 1.0}, HZ)
    assert figures["own_cpu_cores"] == pytest.approx(1.2) and figures["other_cpu_cores"] == pytest.approx(3.1)


def figures(**given) -> dict:
    base = {"cores": 8, "other_cpu_cores": 0.0, "other_cpu_fraction": 0.0, "steal_cores": 0.0,
            "gpu_other_processes": [], "gpu_unmatched_processes": 0, "throttle_reasons": []}
    return {**base, **given}


def test_judge_at_and_around_its_thresholds():
    assert load.judge(figures()) == (False, [])
    assert load.judge(figures(other_cpu_cores=0.25, other_cpu_fraction=0.25 / 8))[0] is False  # at: not busy
    busy, why = load.judge(figures(other_cpu_cores=0.26, other_cpu_fraction=0.26 / 8))
    assert busy and why == ["other processes kept 0.26 CPU cores busy on average (3% of the machine's 8)"]
    assert load.judge(figures(steal_cores=0.08))[0] is False  # 1% of each of 8 vCPUs: at the threshold
    busy, why = load.judge(figures(steal_cores=0.09))
    assert busy and why[0].startswith("the hypervisor stole 1.1% of each vCPU's time")
    xorg = {"pid": 900, "kind": "graphics", "used_mib": 40.0}
    assert load.judge(figures(gpu_other_processes=[xorg]))[0] is False  # a display server: listed, not judged
    busy, why = load.judge(figures(gpu_other_processes=[xorg, {"pid": 901, "kind": "compute", "used_mib": None}]))
    assert busy and why == ["1 other process(es) on the GPU: pid 901 (compute, ? MiB)"]
    assert load.judge(figures(gpu_unmatched_processes=1))[0] is True
    assert load.judge(figures(throttle_reasons=["sw_power_cap"]))[0] is False  # the card's own power ceiling
    busy, why = load.judge(figures(throttle_reasons=["hw_slowdown", "sw_power_cap", "sw_thermal_slowdown"]))
    assert busy and why == ["the GPU's clocks were held down: hw_slowdown, sw_thermal_slowdown"]
    stricter = {**load.THRESHOLDS, "other_cpu_cores": 0.1}
    assert load.judge(figures(other_cpu_cores=0.2), stricter)[0] is True
    # what was not measured says nothing
    assert load.judge({"available": False, "reason": "no /proc/stat", "other_cpu_cores": None}) == (False, [])


def test_merge_takes_each_figures_largest_and_the_union_of_what_was_seen():
    quiet = {**figures(other_cpu_cores=0.05, other_cpu_fraction=0.05 / 8, steal_cores=0.01), "available": True,
             "reason": None, "gpu_available": True, "gpu_reason": None, "wall_s": 2.0, "busy": False}
    loud = {**quiet, "other_cpu_cores": 0.9, "other_cpu_fraction": 0.9 / 8, "throttle_reasons": ["sync_boost"],
            "gpu_other_processes": [{"pid": 7, "kind": "compute", "used_mib": 500.0}], "busy": True}
    later = {**quiet, "gpu_other_processes": [{"pid": 7, "kind": "compute", "used_mib": 900.0}]}
    row = load.merge([quiet, loud, later])
    assert row["other_cpu_cores"] == 0.9 and row["steal_cores"] == 0.01 and row["wall_s"] == 6.0
    assert row["gpu_other_processes"] == [{"pid": 7, "kind": "compute", "used_mib": 900.0}]
    assert row["throttle_reasons"] == ["sync_boost"] and row["windows"] == 3 and row["busy_windows"] == 1
    assert row["busy"] and len(row["why"]) == 3
    assert row["why"][0] == "other processes kept 0.90 CPU cores busy on average in the worst of 3 windows (11% of " \
                            "the machine's 8)"
    # a mean would have hidden the loud window: (0.05 + 0.9 + 0.05) / 3 = 0.33 is near the threshold, 0.9 is not
    assert load.merge([quiet, quiet])["busy"] is False
    nothing = {"available": False, "reason": "no /proc/stat", "gpu_available": False, "gpu_reason": "no GPU"}
    merged = load.merge([nothing, nothing])
    assert merged["available"] is False and merged["reason"] == "no /proc/stat" and merged["busy"] is False


def test_without_nvml_or_proc_the_figures_say_why_and_nothing_crashes(monkeypatch, tmp_path):
    monkeypatch.setattr(telemetry, "pynvml", None)
    monitor = load.LoadMonitor(0)
    monitor.start()
    result = monitor.stop()
    assert result["available"] is True and result["reason"] is None  # the CPU part is still measured
    assert result["other_cpu_cores"] is not None and result["job_processes"] >= 1
    assert result["gpu_available"] is False and "pynvml" in result["gpu_reason"]
    assert load.LoadMonitor(None).gpu_reason == "no GPU"
    elsewhere = load.LoadMonitor(None, proc=str(tmp_path / "no-proc"))  # macOS, Windows
    elsewhere.start()
    result = elsewhere.stop()
    assert result["available"] is False and "Linux" in result["reason"] and result["busy"] is False
    assert load.LoadMonitor(None).stop()["reason"] == "stop() without start()"


class FakeNvml:
    """pynvml's calls that the monitor makes, on a device that another process (pid 999999) shares, at clocks
    held down by a hardware slowdown; the driver lacks the newer clock-events call."""

    def __init__(self, ours: int):
        self.ours = ours

    def nvmlInit(self):
        pass

    def nvmlDeviceGetHandleByIndex(self, index):
        return f"handle{index}"

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        return [SimpleNamespace(pid=self.ours, usedGpuMemory=2 * 2**30),
                SimpleNamespace(pid=999999, usedGpuMemory=300 * 2**20)]

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle):
        raise RuntimeError("NVMLError_NotSupported")

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle):
        raise RuntimeError("NVMLError_FunctionNotFound")

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle):
        return 0x1 | 0x4 | 0x8  # idle, power cap, hardware slowdown


def test_the_nvml_path_names_other_processes_and_throttle_reasons(monkeypatch):
    monkeypatch.setattr(telemetry, "pynvml", FakeNvml(os.getpid()))
    monkeypatch.setattr(telemetry, "nvml_index", lambda index: index)
    monitor = load.LoadMonitor(0, interval=0.01)
    monitor.start()
    time.sleep(0.1)
    result = monitor.stop()
    assert result["gpu_available"] is True and result["gpu_samples"] >= 2  # start and stop, and the thread's
    assert result["gpu_other_processes"] == [{"pid": 999999, "kind": "compute", "used_mib": 300.0}]
    assert result["throttle_reasons"] == ["hw_slowdown", "sw_power_cap"]
    assert result["busy"] and any("pid 999999 (compute, 300 MiB)" in w for w in result["why"])
    # inside a container NVML gives the host's pids: none is ours, so all but one compute process are others
    monkeypatch.setattr(telemetry, "pynvml", FakeNvml(ours=888888))
    monitor = load.LoadMonitor(0, interval=0.01)
    monitor.start()
    result = monitor.stop()
    assert result["gpu_other_processes"] == [] and result["gpu_unmatched_processes"] == 1 and result["busy"]


# A busy loop until the process has used 0.6 CPU seconds (however long that takes on a loaded machine), then
# its CPU seconds written to argv[1]
BUSY = ("import sys, time\nwhile time.process_time() < 0.6:\n    pass\n"
        "open(sys.argv[1], 'w').write(repr(time.process_time()))\n")
# Another job: started through a launcher that exits at once, in a session of its own, so it is no descendant of
# this process (init adopts it and reaps it) and its time never reaches our cutime. A plain child would be ours
# under the rule, start_new_session or not, as a DataLoader worker is.
LAUNCH = ("import subprocess, sys\n"  # the loop must not hold our pipe open: run() would wait for its end
          "print(subprocess.Popen([sys.executable, '-c', sys.argv[1], sys.argv[2]], start_new_session=True,\n"
          "                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid)\n")


def ended(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] in "ZX"  # a zombie's times are final
    except OSError:
        return True


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="Linux /proc")
def test_another_jobs_busy_loop_counts_as_other_and_this_jobs_work_as_ours(tmp_path, monkeypatch):
    """The bounds are relations the code controls, whatever else runs. The other job spins until it has used
    0.6 CPU seconds: on a loaded machine it takes longer, not less CPU. It writes the CPU seconds it had (0.6 or
    a tick more); the machine's busy time less ours holds them, less the ticks' rounding (10 ms ticks: 0.1 s is
    10 of them), so other >= 0.5 CPU seconds, and the test asserts the conservative > 0.3 as well. Other work
    on the machine (two more busy loops) only adds to other. Our own work, a busy loop of 0.5 CPU seconds in
    this thread and one of 0.6 in a child that we reap (a DataLoader worker's place), is counted as ours: at
    least the CPU seconds os.times() gives this process and its reaped children, less the rounding."""
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monitor = load.LoadMonitor(None)
    monitor.start()
    before = os.times()
    launched = subprocess.run([sys.executable, "-c", LAUNCH, BUSY, str(tmp_path / "other")], check=True,
                              capture_output=True, text=True)
    other = int(launched.stdout)
    with open(f"/proc/{other}/stat") as f:
        if load.parse_pid_stat(f.read())[0] == os.getpid():  # PID 1 of a container, or a subreaper
            pytest.skip("this process adopts orphans: what it starts cannot be another job")
    worker = subprocess.Popen([sys.executable, "-c", BUSY, str(tmp_path / "worker")])  # ours: a child
    started = time.thread_time()
    while time.thread_time() - started < 0.5:  # ours: this thread
        pass
    worker.wait()
    deadline = time.time() + 60
    while not ended(other) and time.time() < deadline:
        time.sleep(0.05)
    assert ended(other), "the other job's busy loop did not end"
    result = monitor.stop()
    after = os.times()
    theirs = float((tmp_path / "other").read_text())
    own_s = sum(after[:4]) - sum(before[:4])  # user, system, children's user, children's system
    other_s = result["other_cpu_cores"] * result["wall_s"]
    assert theirs >= 0.6 and other_s > theirs - 0.1 and other_s > 0.3, (other_s, theirs, result)
    assert result["own_cpu_cores"] * result["wall_s"] > own_s - 0.1, (own_s, result)
    assert result["busy"] and result["job_root"] == os.getpid()
