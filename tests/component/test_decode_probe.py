"""The fused decode's start-up probe (issue 36, pipelines/decode_probe.py): the real child on DALI's CPU operators,
children that crash or fail in the ways nvImageCodec 0.9's region-of-interest decode does on a GPU, the one-line
error naming `--no-fused-decode`, one child per process and device, and where the DALI loaders call it. On a GPU
the real child runs wherever a `dali` training loader with the fused decode is built (tests/gpu/test_gpu.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import pipelines.decode_probe as decode_probe
from pipelines.augmentation import Augmentation
from pipelines.dali import DaliLoader, training_pipeline
from pipelines.dali_shards import ShardDaliLoader
from pipelines.decode_probe import probe_fused_decode, probe_images
from pipelines.errors import UserError
from pipelines.folder import list_split
from pipelines.shards import list_shard_split
from tools import shard as shard_tool

from conftest import CLASSES, TRAIN_PER_CLASS

AUG = Augmentation(image_size=32)


def _child(code: str) -> tuple[str, ...]:
    """A stand-in for the probe's child: `code` run by this Python (the request arrives as its argument)."""
    return (sys.executable, "-c", code)


SEGFAULT = _child("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
INTERNAL_ERROR = "RuntimeError: nvImageCodec failure: NVIMGCODEC_STATUS_INTERNAL_ERROR"
FAILS = _child(f"import sys; print('decoding...', file=sys.stderr); print({INTERNAL_ERROR!r}, file=sys.stderr); "
               "sys.exit(1)")


@pytest.fixture(autouse=True)
def fresh_outcomes(monkeypatch):
    """Each test starts as a new process does: no device probed yet."""
    monkeypatch.setattr(decode_probe, "_outcomes", {})


@pytest.fixture(scope="module")
def images(data_dir) -> list[bytes]:
    return probe_images(list_split(str(data_dir), "train"))


@pytest.fixture(scope="module")
def shards(data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "imagenet-shards"
    shard_tool.main([str(data_dir), "--out", str(out), "--images-per-shard", "16", "--quiet"])  # exits on failure
    return out


def _probe(images, device_id, **kw):
    probe_fused_decode(images, device_id, define=training_pipeline, aug=AUG, dtype=torch.float32,
                       hw_decoder_load=0.65, **kw)


def test_the_real_child_runs_the_fused_cpu_decode_over_the_data_and_passes(images, data_dir):
    """The plumbing for real: the request, the child's import of training_pipeline, its fused decode (DALI's CPU
    operators) over four of the data's JPEGs, one from each class, and exit 0."""
    files = list_split(str(data_dir), "train").files
    assert images == [Path(files[c * TRAIN_PER_CLASS]).read_bytes() for c in range(CLASSES)]
    _probe(images, None)
    assert decode_probe._outcomes == {None: None}


def test_the_real_child_quotes_the_decoders_own_error(images):
    """The child really decodes what it is given, and its last error line is the decoder's error (nvImageCodec's,
    found under DALI's operator traceback), not DALI's closing boilerplate."""
    with pytest.raises(UserError) as error:
        _probe([images[0], b"\xff\xd8\xff\xe0 not a JPEG past its first bytes" * 20], None)
    message = str(error.value)
    assert "on the CPU" in message and "exited with status 1: 'RuntimeError: nvImageCodec failure" in message
    assert "no longer valid" not in message


def test_a_child_killed_by_sigsegv_is_one_line_naming_the_signal_the_gpu_and_the_way_out(images):
    with pytest.raises(UserError) as error:
        _probe(images, 3, command=SEGFAULT)
    message = str(error.value)
    assert "\n" not in message
    assert "died of SIGSEGV" in message and "on GPU 3" in message and "decoders.image_random_crop" in message
    assert "rerun with --no-fused-decode" in message and "docs/usage.md#troubleshooting-the-gpu-path" in message


def test_a_child_that_exits_1_has_its_last_error_line_quoted(images):
    with pytest.raises(UserError) as error:
        _probe(images, 0, command=FAILS)
    message = str(error.value)
    assert "\n" not in message
    assert f"on GPU 0: the probe process exited with status 1: '{INTERNAL_ERROR}'" in message
    assert "decoding..." not in message and "--no-fused-decode" in message


def test_a_child_that_hangs_is_killed_at_the_timeout(images):
    with pytest.raises(UserError, match=r"on GPU 1: the probe did not finish in 1 s and was killed; .*"
                                        r"--no-fused-decode"):
        _probe(images, 1, command=_child("import time; time.sleep(60)"), timeout=1)


def test_one_child_per_device_and_a_failure_repeats_without_one(images, tmp_path):
    runs = tmp_path / "runs"
    counting = _child(f"open({str(runs)!r}, 'a').write('x')")
    _probe(images, 0, command=counting)
    _probe(images, 0, command=SEGFAULT)  # the harness's next pipeline: the passed probe is remembered
    assert runs.read_text() == "x"
    with pytest.raises(UserError, match="SIGSEGV"):
        _probe(images, 1, command=SEGFAULT)  # another GPU: its own child
    with pytest.raises(UserError, match="SIGSEGV"):
        _probe(images, 1, command=counting)  # the failure is remembered too
    assert runs.read_text() == "x"


def test_shard_members_are_probed_by_their_bytes(data_dir, shards):
    """The shard loader's reader is an external source over tar members: the probe reads members' bytes, and the
    child decodes them as it does files."""
    members = probe_images(list_shard_split(str(shards), "train"))
    folder = {Path(f).read_bytes() for f in list_split(str(data_dir), "train").files}
    assert len(members) == 4 and set(members) <= folder
    _probe(members, None)


class _Probed(Exception):
    """Stops a loader's construction right after the probe's place (its reader's set-up comes next)."""


def _stop(self, **kw):
    raise _Probed


@pytest.mark.parametrize("loader", [DaliLoader, ShardDaliLoader])
@pytest.mark.parametrize("placement, split, fused, probed", [
    ("gpu", "train", True, True),
    ("gpu", "train", False, False),  # --no-fused-decode: the way out runs no probe
    ("gpu", "val", True, False),  # validation decodes whole images
    ("hybrid", "train", True, False),  # decoded on DALI's CPU threads
    ("cpu", "train", True, False),
])
def test_the_dali_loaders_probe_before_their_first_gpu_training_pipeline(loader, placement, split, fused, probed,
                                                                         data_dir, shards, monkeypatch):
    calls = []
    monkeypatch.setattr("pipelines.dali.probe_fused_decode", lambda *args, **kw: calls.append((args, kw)))
    monkeypatch.setattr(loader, "_reading", _stop)
    image_list = (list_shard_split(str(shards), split) if loader is ShardDaliLoader
                  else list_split(str(data_dir), split))
    with pytest.raises(_Probed):
        loader(split, image_list=image_list, batch_size=2, aug=AUG, rank=0, world_size=1, local_rank=5, seed=0,
               device="cpu", dtype=torch.float16, placement=placement, threads=1, prefetch=2, hw_decoder_load=0.65,
               fused_decode=fused)
    if not probed:
        assert calls == []
        return
    [(args, kw)] = calls
    assert args == (probe_images(image_list), 5)  # this loader's images, on this rank's GPU
    assert kw == dict(define=training_pipeline, aug=AUG, dtype=torch.float16, hw_decoder_load=0.65)
