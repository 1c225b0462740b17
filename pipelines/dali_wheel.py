"""Which DALI wheel belongs beside the installed torch.

DALI ships one wheel per CUDA major version (nvidia-dali-cuda120, nvidia-dali-cuda130). Each one's GPU
operators load the CUDA libraries of its own major version (NPP, cuFFT, its own nvJPEG), so a torch built
for CUDA 13 beside `nvidia-dali-cuda120` fails on the GPU for want of CUDA 12 libraries. The CPU operators
work with either wheel. `make venv` installs the wheel printed by `python -m pipelines.dali_wheel`, and the
GPU loaders refuse a mismatched pair at start-up with the exact pip command (check_matches_torch).

Runs without importing DALI, and without importing torch when asked only for a wheel name.
"""

from __future__ import annotations

from importlib import metadata

from pipelines.errors import UserError

# CUDA major version -> the DALI wheel built for it
WHEELS = {12: "nvidia-dali-cuda120", 13: "nvidia-dali-cuda130"}
# A CPU-only torch needs no CUDA libraries from DALI: the newest flavour (the smaller wheel) serves its CPU operators
NEWEST = max(WHEELS)


def wheel_for(torch_cuda: str | None) -> str:
    """The DALI wheel for a torch built for CUDA `torch_cuda` ("13.0"; None for a CPU-only torch)."""
    if torch_cuda is None:
        return WHEELS[NEWEST]
    major = int(torch_cuda.split(".")[0])
    if major not in WHEELS:
        raise UserError(f"no DALI wheel is known for CUDA {torch_cuda} (torch.version.cuda); DALI ships "
                        f"{', '.join(WHEELS.values())}: install torch built for CUDA {' or '.join(map(str, WHEELS))}")
    return WHEELS[major]


def installed_wheels() -> list[str]:
    """The DALI wheels installed in this environment (normally one)."""
    found = []
    for name in WHEELS.values():
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        found.append(name)
    return found


def mismatch(torch_cuda: str | None, installed: list[str]) -> str | None:
    """One line saying what is wrong with the installed DALI wheels for this torch, or None.

    A CPU-only torch runs DALI's CPU operators only, which every flavour has: nothing to say."""
    if torch_cuda is None or not installed:
        return None
    wanted = wheel_for(torch_cuda)
    if installed == [wanted]:
        return None
    others = [w for w in installed if w != wanted]
    return (f"DALI wheel {' and '.join(others)} does not match torch, which is built for CUDA {torch_cuda}: "
            "its GPU operators load CUDA libraries of another major version. Fix: "
            f"pip uninstall -y {' '.join(others)} && pip install {wanted}")


def check_matches_torch() -> None:
    """Refuse, in one line, a DALI wheel whose CUDA major version differs from torch's (GPU loaders only)."""
    import torch

    problem = mismatch(torch.version.cuda, installed_wheels())
    if problem:
        raise UserError(problem)


# The oldest DALI release with a CUDA 13 wheel; the features used here (checkpointing, auto_aug) are older
MIN_VERSION = "1.51"


def requirement(torch_cuda: str | None) -> str:
    return f"{wheel_for(torch_cuda)}>={MIN_VERSION}"


if __name__ == "__main__":
    # `python -m pipelines.dali_wheel`: the requirement `make venv` installs for this torch;
    # `--unwanted`: the installed DALI wheels of another CUDA version, which make venv removes
    import sys

    import torch

    wanted = wheel_for(torch.version.cuda)
    if sys.argv[1:] == ["--unwanted"]:
        print("\n".join(w for w in installed_wheels() if w != wanted))
    else:
        print(requirement(torch.version.cuda))
