"""Named profiler ranges: torch.profiler.record_function, and NVTX on CUDA so that `nsys profile` shows the
same names. Off (a shared no-op, about 0.2 us) unless a profiled step window turned them on: an idle
record_function still costs several microseconds. rn50/observe/profiling.py owns the switch; it lives here because
the loaders name their host-to-device copy and pipelines/ imports nothing of rn50/.
"""

from __future__ import annotations

import contextlib

import torch

_OFF = contextlib.nullcontext()
_on = False
_nvtx = False


def enable(on: bool, nvtx: bool = False) -> None:
    """Turn the ranges on (with NVTX beside them when `nvtx`: a CUDA device) or off."""
    global _on, _nvtx
    _on, _nvtx = on, on and nvtx


class _Range:
    __slots__ = ("name", "record", "nvtx")

    def __init__(self, name: str):
        self.name, self.record, self.nvtx = name, torch.profiler.record_function(name), _nvtx

    def __enter__(self):
        if self.nvtx:
            torch.cuda.nvtx.range_push(self.name)
        self.record.__enter__()
        return self

    def __exit__(self, *exc):
        self.record.__exit__(*exc)
        if self.nvtx:
            torch.cuda.nvtx.range_pop()
        return False


def named_range(name: str):
    """`with named_range("forward"): ...`: a range of that name in the torch trace and the nsys timeline."""
    return _Range(name) if _on else _OFF
