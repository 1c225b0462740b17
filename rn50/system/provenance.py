"""Where a result came from: versions, hardware, code revision (carried by every summary and report)."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch
import torchvision


def _dali_version() -> str | None:
    try:
        import nvidia.dali

        return nvidia.dali.__version__
    except ImportError:
        return None


def _git_commit() -> str | None:
    if os.environ.get("RN50_GIT_COMMIT"):  # set where the source has no .git (containers)
        return os.environ["RN50_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _git_dirty() -> bool | None:
    """Whether the source differs from the commit (results from uncommitted code say so)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
        return bool(out.stdout.strip()) if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _driver_version() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML, no GPU: not available, never an error
        return None


def environment() -> dict:
    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "dali": _dali_version(),
        "cuda": torch.version.cuda if cuda else None,
        "driver": _driver_version() if cuda else None,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "cpu_cores": os.cpu_count(),
        "hostname": platform.node(),
        "git_commit": _git_commit(),
        "git_dirty": _git_dirty(),
    }
