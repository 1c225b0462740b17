"""Which device a process trains on, and a clear stop when NVIDIA GPUs are present but CUDA is unusable.

A torch built for a newer CUDA than the driver supports (a CUDA 13 wheel on a CUDA 12 driver) reports
`torch.cuda.is_available() == False`; without this check a GPU machine would train on its CPU, slowly and
without a word.
"""

from __future__ import annotations

import os
import re
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from rn50.config.errors import UserError
from rn50.config.machine import DEVICES

# CUDA versions of the published torch wheels (download.pytorch.org/whl/cuXYZ), oldest first
TORCH_WHEEL_CUDA = ((11, 8), (12, 1), (12, 4), (12, 6), (12, 8), (12, 9), (13, 0))


@dataclass(frozen=True)
class CudaProbe:
    """What the machine has (GPUs the NVIDIA driver sees) against what torch can use."""
    gpus_visible: int  # GPUs the driver lists (/proc/driver/nvidia/gpus, nvidia-smi), whether or not torch can use them
    cuda_available: bool  # torch.cuda.is_available()
    torch_cuda: str | None  # the CUDA version torch was built for (torch.version.cuda)
    driver: str | None = None  # the NVIDIA driver version, e.g. "535.104.05"
    driver_cuda: str | None = None  # the newest CUDA the driver supports, e.g. "12.2"
    torch_reason: str | None = None  # torch's own warning when CUDA failed to initialise


def _nvidia_smi() -> str:
    try:
        return subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _driver_versions() -> tuple[str | None, str | None]:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            cuda = pynvml.nvmlSystemGetCudaDriverVersion_v2()  # e.g. 12020
            return pynvml.nvmlSystemGetDriverVersion(), f"{cuda // 1000}.{cuda % 1000 // 10}"
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML library: read nvidia-smi's banner instead
        text = _nvidia_smi()
        driver = re.search(r"Driver Version:\s*([\d.]+)", text)
        cuda = re.search(r"CUDA Version:\s*([\d.]+)", text)
        return (driver.group(1) if driver else None), (cuda.group(1) if cuda else None)


def _gpus_visible() -> int:
    gpus = Path("/proc/driver/nvidia/gpus")
    if gpus.is_dir():
        return sum(1 for _ in gpus.iterdir())
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in listing.splitlines() if line.startswith("GPU "))


def probe_cuda() -> CudaProbe:
    """Look at the machine; the driver is only asked when torch cannot use CUDA."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    if available:
        return CudaProbe(torch.cuda.device_count(), True, torch.version.cuda)
    visible = _gpus_visible()
    driver, driver_cuda = _driver_versions() if visible else (None, None)
    reason = next((str(w.message) for w in caught if "CUDA" in str(w.message)), None)
    return CudaProbe(visible, False, torch.version.cuda, driver, driver_cuda, reason)


def _version(text: str | None) -> tuple[int, ...] | None:
    return tuple(int(p) for p in text.split(".")[:2]) if text and re.fullmatch(r"\d+(\.\d+)*", text) else None


def _wheel_for(driver_cuda: str | None) -> str:
    """The newest torch wheel index whose CUDA this driver can run."""
    supported = _version(driver_cuda)
    fitting = [v for v in TORCH_WHEEL_CUDA if supported and v <= supported]
    tag = "cu{}{}".format(*fitting[-1]) if fitting else "cu118"
    return f"pip install --force-reinstall torch torchvision --index-url https://download.pytorch.org/whl/{tag}"


def cuda_unusable_message(probe: CudaProbe) -> str:
    """One line: what is there, why torch cannot use it, and what to do."""
    driver = f"driver {probe.driver or 'unknown'}" + (f", which supports CUDA up to {probe.driver_cuda}"
                                                      if probe.driver_cuda else "")
    built = f"torch {torch.__version__} is built for CUDA {probe.torch_cuda}" if probe.torch_cuda else \
        f"torch {torch.__version__} is a CPU-only build"
    too_new = _version(probe.torch_cuda) and _version(probe.driver_cuda) and \
        _version(probe.torch_cuda) > _version(probe.driver_cuda)
    cause = "a newer CUDA than the driver supports" if too_new else \
        (probe.torch_reason or "CUDA failed to initialise").rstrip(".")
    fix = (f"install the torch build for this driver ({_wheel_for(probe.driver_cuda)}) or update the NVIDIA "
           "driver" if too_new or not probe.torch_cuda else "check the driver with nvidia-smi")
    return (f"this machine has {probe.gpus_visible} NVIDIA GPU(s) ({driver}) but CUDA is unusable: {built}; "
            f"cause: {cause}. Fix: {fix}; or pass --device cpu to run on the CPU")


def choose_device(request: str = "auto", local_rank: int = 0, probe: CudaProbe | None = None) -> torch.device:
    """`auto`: this process's GPU when CUDA works, the CPU on a machine without NVIDIA GPUs, and a UserError
    when GPUs are there but CUDA is not usable. `cpu` (or CUDA_VISIBLE_DEVICES set empty) asks for the CPU."""
    if request not in DEVICES:
        raise UserError(f"unknown --device {request!r}; choose one of {', '.join(DEVICES)}")
    if request == "cpu":
        return torch.device("cpu")
    probe = probe or probe_cuda()
    if probe.cuda_available:
        return torch.device("cuda", local_rank)
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1")  # the GPUs hidden on purpose
    if probe.gpus_visible and not hidden:
        raise UserError(cuda_unusable_message(probe))
    if request == "cuda":
        raise UserError("--device cuda (or a preset's [machine] device = \"cuda\"), but this machine has no NVIDIA GPU "
                        "that torch can see; pass --device auto or --device cpu")
    return torch.device("cpu")
