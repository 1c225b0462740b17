"""The DALI wheel matches torch's CUDA major version (a CUDA 12 DALI beside a CUDA 13 torch fails on the GPU)."""

import subprocess
import sys

import pytest
import torch

from pipelines.dali_wheel import installed_wheels, mismatch, requirement, wheel_for
from pipelines.errors import UserError


def test_the_wheel_follows_torchs_cuda_major_version():
    assert wheel_for("13.0") == "nvidia-dali-cuda130"
    assert wheel_for("12.8") == "nvidia-dali-cuda120"
    assert wheel_for(None) == "nvidia-dali-cuda130"  # CPU-only torch: CPU operators, any flavour
    with pytest.raises(UserError, match="CUDA 11.8"):
        wheel_for("11.8")


def test_a_mismatched_pair_is_one_line_with_the_exact_pip_command():
    line = mismatch("13.0", ["nvidia-dali-cuda120"])
    assert "\n" not in line
    assert "pip uninstall -y nvidia-dali-cuda120 && pip install nvidia-dali-cuda130" in line
    assert mismatch("13.0", ["nvidia-dali-cuda130"]) is None
    assert "nvidia-dali-cuda120" in mismatch("13.0", ["nvidia-dali-cuda120", "nvidia-dali-cuda130"])
    assert mismatch(None, ["nvidia-dali-cuda120"]) is None  # CPU operators only: either works
    assert mismatch("13.0", []) is None  # no DALI: the loader says so when asked for


def test_this_environment_holds_the_wheel_for_its_torch():
    """What `make venv` installed: exactly the wheel matching torch.version.cuda."""
    assert installed_wheels() == [wheel_for(torch.version.cuda)], (installed_wheels(), torch.version.cuda)
    assert mismatch(torch.version.cuda, installed_wheels()) is None


def test_the_module_prints_the_requirement_make_venv_installs():
    out = subprocess.run([sys.executable, "-m", "pipelines.dali_wheel"], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == requirement(torch.version.cuda)
    unwanted = subprocess.run([sys.executable, "-m", "pipelines.dali_wheel", "--unwanted"], capture_output=True,
                              text=True, check=True).stdout.split()
    assert wheel_for(torch.version.cuda) not in unwanted
