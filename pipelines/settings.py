"""How a machine runs its input pipeline: the one home of the loader settings' defaults.

These settings change how fast batches come, never which batches come (the recipe's augmentation owns
that). The configuration (rn50.config.recipe.Machine) takes its defaults from here, flags and presets override
them there, and every loader receives a complete LoaderSettings: no loader keeps a default of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.errors import UserError

AUTO_WORKERS = -1  # workers: the cores this process may use, shared by the node's ranks (default_workers)
MAX_AUTO_WORKERS = 8


@dataclass(frozen=True)
class LoaderSettings:
    dali_threads: int = 4  # DALI CPU threads per process
    # share of JPEG decoding sent to the A100/H100/H200 hardware decoder (the rest to nvJPEG's CUDA decoder);
    # GPUs without one (RTX 3090, V100) ignore it. 0.65 is NVIDIA's reference setting
    hw_decoder_load: float = 0.65
    fused_decode: bool = True  # decode fused with RandomResizedCrop: only the crop's region is decoded
    prefetch: int = 2  # DALI's prefetch queue depth; torchvision-gpu: batches prepared ahead
    workers: int = AUTO_WORKERS  # torchvision: worker processes; torchvision-gpu: file-reading threads

    def validate(self) -> "LoaderSettings":
        for name in ("dali_threads", "prefetch"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.workers < AUTO_WORKERS:
            raise UserError(f"workers must be 0 or more (or {AUTO_WORKERS}: as many as this machine's cores "
                            f"allow), got {self.workers}")
        if not 0.0 <= self.hw_decoder_load <= 1.0:
            raise UserError(f"hw_decoder_load must lie in [0, 1], got {self.hw_decoder_load}")
        return self

    def resolved_workers(self) -> int:
        return default_workers() if self.workers == AUTO_WORKERS else self.workers


def default_workers() -> int:
    """Worker processes (torchvision) or reading threads (torchvision-gpu) per rank when --workers is not
    given: the cores this process may run on (os.sched_getaffinity) shared by the ranks on this node
    (LOCAL_WORLD_SIZE, set by torchrun), at least 1 and at most 8. On a 2-core machine: 2 for one process."""
    import os

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, min(MAX_AUTO_WORKERS, cores // local_ranks))


def one_torch_thread() -> None:
    """Run in each of the loader's threads as it starts: its torch ops on that thread alone, as torch's own
    DataLoader pin-memory thread does (torch.set_num_threads sets the calling thread's OpenMP and MKL threads;
    a training thread that has run a torch op keeps its own; torch takes a thread's count at its first op,
    from the last set_num_threads of any thread, so the harness fixes its own first). Otherwise the batch
    thread's batched ops open an OpenMP team of their own, as many threads as the training step's; one libgomp
    thread more than the cores switches libgomp's spin-wait throttle on for the whole process, and the
    training step then ran faster beside this loader than on synthetic data (issue 37: 628% of the ceiling on
    2 busy cores). The loader's CPU parallelism is its reading threads (`workers`), the count the benchmark
    harness budgets for."""
    import torch  # here: the settings stay importable without torch (rn50.config reads them)

    torch.set_num_threads(1)


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
KEPT_FREE_BYTES = 1 << 30  # free memory glibc keeps at the top of its heap instead of handing it back


def keep_freed_memory() -> bool:
    """glibc's malloc keeps the memory the CPU pipeline frees for its next batch, instead of handing it back to
    the kernel and page-faulting it in again. DALI's CPU buffers are a batch each (19 MB: 64 images, 224 px,
    fp16), allocated and freed every batch by its threads; a thread's own malloc arena grows in heaps of at most
    64 MB, unmapped when they empty, and blocks above 32 MB are always mmap'd: 30-60 page faults per image (3-6%
    of dali-cpu's CPU time by the medians of three A/B sets, whose run-to-run ranges overlap). So: one arena for
    every thread created from now on, large blocks from the heap too (no mmap), and the top of the heap trimmed
    only past KEPT_FREE_BYTES. 3 page faults per image then, once the heap has grown to the pipeline's working set.

    Process-wide, for the process's life: the dali-cpu loader sets it before its pipeline starts its threads
    (a thread takes its arena at its first allocation; threads made earlier keep theirs, and later ones may share
    them). False where the C library has no mallopt (not glibc): nothing changes there."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, KEPT_FREE_BYTES))
    return all(mallopt(parameter, value) == 1 for parameter, value in settings)
