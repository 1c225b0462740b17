"""Every user-caused failure: one sentence naming the cause and the fix, exit code 2, no traceback."""

from __future__ import annotations

import shutil

import pytest
import torch

import pipelines.dali
import rn50.system.device
from pipelines.folder import list_split
from rn50.reliability.checkpoint import load_checkpoint
from rn50.system.device import CudaProbe
from rn50.train import main

SMALL = ["--loader", "dali-cpu", "--arch", "resnet18", "--image-size", "32", "--batch-size", "8",
         "--dali-threads", "1", "--epochs", "1"]


def copy_of(data_dir, tmp_path):
    target = tmp_path / "data"
    shutil.copytree(data_dir, target)
    list_split.cache_clear()
    return target


def empty_class(data_dir, tmp_path, monkeypatch):
    data = copy_of(data_dir, tmp_path)
    (data / "train" / "n99999999").mkdir()
    return ["--data", str(data)]


def empty_folder(data_dir, tmp_path, monkeypatch):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    return ["--data", str(tmp_path / "empty")]


def unsplit_folder(data_dir, tmp_path, monkeypatch):
    """Issue 38, 8: a folder of class folders (not split yet) said "train is missing" without naming tools.split."""
    shutil.copytree(data_dir / "train", tmp_path / "unsplit")
    return ["--data", str(tmp_path / "unsplit")]


def other_world_size(data_dir, tmp_path, monkeypatch):
    assert main(["--data", str(data_dir), "--out", str(tmp_path / "first"), *SMALL]) is None
    checkpoint = load_checkpoint(tmp_path / "first" / "checkpoint_0001.pt")
    checkpoint["world_size"] = 4
    torch.save(checkpoint, tmp_path / "four.pt")
    return ["--data", str(data_dir), "--resume", str(tmp_path / "four.pt")]


def corrupt_checkpoint(data_dir, tmp_path, monkeypatch):
    (tmp_path / "bad.pt").write_bytes(b"\x00" * 100)
    return ["--data", str(data_dir), "--resume", str(tmp_path / "bad.pt")]


def unwritable_out(data_dir, tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("")
    return ["--data", str(data_dir), "--out", str(tmp_path / "a_file" / "run")]


def no_dali(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(pipelines.dali, "fn", None)  # what a failed `import nvidia.dali` leaves
    return ["--data", str(data_dir)]


def gpus_without_usable_cuda(data_dir, tmp_path, monkeypatch):
    """A CUDA 13 torch on a CUDA 12 driver: the GPUs are there, torch.cuda.is_available() is false."""
    monkeypatch.setattr(rn50.system.device, "probe_cuda", lambda: CudaProbe(
        gpus_visible=8, cuda_available=False, torch_cuda="13.0", driver="535.104.05", driver_cuda="12.2"))
    return ["--data", str(data_dir)]


CASES = {
    "missing data folder": (lambda d, t, m: ["--data", str(t / "nowhere")], "does not exist", "--data"),
    "empty data folder": (empty_folder, "has no class folders", "train/<class>"),
    "empty class folder": (empty_class, "holds no .JPEG files", "remove the folder"),
    "unsplit class folders": (unsplit_folder, "holds class folders directly", "`python -m tools.split "),
    "batch larger than the shard": (lambda d, t, m: ["--data", str(d), "--batch-size", "1000"], "larger than",
                                    "lower --batch-size"),
    "gpu loader without cuda": (lambda d, t, m: ["--data", str(d), "--loader", "dali", "--device", "cpu"],
                                "CUDA is not available", "--loader dali-cpu"),
    "gpus present, cuda unusable": (gpus_without_usable_cuda, "CUDA up to 12.2", "whl/cu121"),
    "dali not installed": (no_dali, "DALI is not installed", "pip install 'nvidia-dali"),
    "resume with another world size": (other_world_size, "written by 4 processes", "--reshard"),
    "corrupt checkpoint": (corrupt_checkpoint, "cannot be read", "earlier checkpoint"),
    "unwritable output folder": (unwritable_out, "cannot write to the run folder", "writable --out"),
    "unknown flag": (lambda d, t, m: ["--data", str(d), "--epoch", "3"], "unknown argument", "did you mean"),
    "sync-bn without cuda": (lambda d, t, m: ["--data", str(d), "--sync-bn", "--device", "cpu"], "needs CUDA GPUs",
                             "drop --sync-bn"),
    "cuda graphs without cuda": (lambda d, t, m: ["--data", str(d), "--cuda-graphs", "--device", "cpu"],
                                 "needs a CUDA GPU", "drop --cuda-graphs"),
    # argparse's own mistakes: one line too, not its usage dump
    "flag of the wrong type": (lambda d, t, m: ["--data", str(d), "--epochs", "two"], "--epochs",
                               "takes a whole number, got 'two'"),
    "list flag of the wrong type": (lambda d, t, m: ["--data", str(d), "--crop-area", "a,b"], "--crop-area",
                                    "takes comma-separated numbers"),
    "flag without its value": (lambda d, t, m: ["--data", str(d), "--epochs"], "--epochs", "expected one argument"),
}


@pytest.mark.parametrize("case", CASES)
def test_user_error_is_one_line_with_cause_and_fix(case, data_dir, tmp_path, capsys, monkeypatch):
    make_args, cause, fix = CASES[case]
    args = make_args(data_dir, tmp_path, monkeypatch)
    capsys.readouterr()
    argv = [*SMALL, "--out", str(tmp_path / "run"), *args]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2
    assert out == "", out  # nothing before an error found at start-up: it stands alone
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert cause in lines[0] and fix in lines[0], lines[0]
    assert "Traceback" not in err


def test_dali_only_augmentations_refused_on_the_torchvision_loader(data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*SMALL, "--loader", "torchvision", "--data", str(data_dir), "--out", str(tmp_path / "r"),
              "--randaugment-magnitude", "7"])
    assert exit_info.value.code == 2 and "run inside the DALI pipelines" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for CUDA on a machine without it")
def test_a_presets_machine_device_is_honoured(data_dir, tmp_path, capsys):
    """The device comes from the resolved machine settings, a preset's [machine] table included: resolved
    before the process group and the device exist (it was read from the raw --device flag, so a preset's
    `device = "cuda"` trained on the CPU without a word). On a machine without CUDA, asking for it is one line."""
    preset = tmp_path / "gpu.toml"
    preset.write_text('[machine]\ndevice = "cuda"\n')
    with pytest.raises(SystemExit) as exit_info:
        main(["--data", str(data_dir), "--out", str(tmp_path / "run"), "--preset", str(preset), *SMALL])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "device cuda" in err and "no NVIDIA GPU" in err, err
    assert not (tmp_path / "run").exists()
    # the same preset with --device cpu given: the flag wins, and the run trains on the CPU
    assert main(["--data", str(data_dir), "--out", str(tmp_path / "cpu"), "--preset", str(preset),
                 "--device", "cpu", *SMALL]) is None
    assert (tmp_path / "cpu" / "summary.json").is_file()
