"""The harness's thread budget (issue 37): how many CPU threads the training step and the loaders get, chosen
once from the cores this process has, and the same for every row, the synthetic ceiling included.

Why. torch's CPU ops run on an OpenMP team (libgomp) of `torch.get_num_threads()` threads, all the cores by
default, and the loaders' threads come on top. libgomp keeps a team's threads spinning about 3 ms (300,000
iterations) at every barrier and between regions, unless the process holds more libgomp threads than it has
cores: then every team in the process spins only 100 iterations and sleeps. So on a busy 2-core machine the
model step's 2-thread team burned its time slices spinning for a partner that was not running, and the row
collapsed (the synthetic ceiling at 3.3-12 img/s for ResNet-18 at 32 px, batch 8, beside two busy loops). The
torchvision-gpu loader's batch thread ran torch ops of its own, so libgomp gave it a team of its own: one
thread more than the cores, which switched the throttle on for the model's team too, and that row escaped the
collapse (33-60 img/s; "628% of the ceiling" in a harness report). Its batches made beforehand ran as fast
while its threads lived, and collapsed (3-8 img/s) once they were shut down. docs/benchmarks.md, "The thread
budget", has the figures.

The policy (`thread_budget`, a pure function):
- CPU: the cores split between the model step and the loader, the model step half (at least 1) and the loader
  the rest (at least 1), so together they do not oversubscribe the cores (2 cores: 1 + 1; 16: 8 + 8). A
  1-thread model step has no team to wait for; a loader's threads do not start one (pipelines.torchvision_gpu
  runs its torch ops on one thread each, as torch's own DataLoader pin-memory thread does).
- CUDA: one thread for the model step, whose CPU side is launching kernels; the rest of the cores are the
  loaders', which keep their own settings there (4 DALI threads per GPU, NVIDIA's reference; DataLoader
  workers up to 8): benchmarks.plan.recipe_defaults sets no loader threads on a GPU machine.
The cores are the process's (its CPU affinity) shared by the ranks on the node (LOCAL_WORLD_SIZE).

No torch at import: benchmarks/plan.py reads this before the harness imports torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ThreadBudget:
    cores: int  # the cores this rank may use: its share of the process's CPU affinity
    device_type: str  # "cpu" or "cuda": where the training step runs
    model_threads: int  # torch intra-op threads of the training step (the harness's main thread)
    loader_threads: int  # the loader's CPU threads: DALI threads, DataLoader workers, torchvision-gpu readers
    why: str

    def to_dict(self) -> dict:
        """report.json's `threads` block."""
        return {"cores": self.cores, "model": self.model_threads, "loader": self.loader_threads, "why": self.why}


def thread_budget(cores: int, device_type: str, local_ranks: int = 1) -> ThreadBudget:
    """The model step's and the loader's threads for a rank that shares `cores` with `local_ranks - 1` others,
    training on `device_type` ("cpu" or "cuda"). A pure function; the module's docstring says why."""
    per_rank = max(1, max(1, cores) // max(1, local_ranks))
    shared = f" ({cores} cores shared by {local_ranks} ranks)" if local_ranks > 1 else ""
    if device_type == "cuda":
        return ThreadBudget(per_rank, device_type, 1, max(1, per_rank - 1),
                            f"GPU: the training step's CPU side launches kernels, one thread; the other "
                            f"{max(1, per_rank - 1)} of {per_rank} cores{shared} are the loaders', which keep "
                            f"their own thread settings")
    model = max(1, per_rank // 2)
    loader = max(1, per_rank - model)
    if per_rank == 1:
        why = (f"CPU: 1 core{shared}, shared by the training step (1 torch thread) and the loader (1), "
               f"the same in every row")
    else:
        why = (f"CPU: {per_rank} cores{shared} split between the training step ({model} torch "
               f"thread{'s' if model > 1 else ''}) and the loader ({loader}), so that together they do not "
               f"oversubscribe the cores, the same in every row")
    return ThreadBudget(per_rank, device_type, model, loader, why)


def machine_cores() -> int:
    """The cores this process may run on: its CPU affinity (os.cpu_count() where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def local_ranks() -> int:
    """The processes on this node sharing its cores: LOCAL_WORLD_SIZE under torchrun, else 1."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))


def this_machine(device_type: str) -> ThreadBudget:
    """The budget of this process on this machine, for `device_type`."""
    return thread_budget(machine_cores(), device_type, local_ranks())


def apply_model_threads(budget: ThreadBudget) -> None:
    """Sets the calling thread's torch intra-op threads (and the inter-op pool, where it has not started) to
    the budget's model threads. Called by the harness's main thread, which runs every row's training step,
    before the first row: every row then runs the step on the same threads. Reading the count back also fixes
    it for this thread: torch takes a thread's count when it first runs a parallel op, from the last
    torch.set_num_threads of any thread."""
    import torch

    torch.set_num_threads(budget.model_threads)
    try:
        torch.set_num_interop_threads(budget.model_threads)
    except RuntimeError:  # the inter-op pool has started (it runs no part of the step) or was set before
        pass
    check_model_threads(budget)


def check_model_threads(budget: ThreadBudget, where: str = "") -> None:
    """Raises when the calling thread's torch intra-op threads are not the budget's: something (a loader)
    changed how the training step runs."""
    import torch

    seen = torch.get_num_threads()
    if seen != budget.model_threads:
        raise RuntimeError(f"the training step runs on {seen} torch threads{' ' + where if where else ''}, "
                           f"not the {budget.model_threads} of the harness's thread budget")
