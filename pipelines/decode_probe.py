"""The fused GPU decode tried in a child process before the first GPU training pipeline is built (issue 36).

`fn.decoders.image_random_crop(device="mixed")` decodes only the crop's region through nvImageCodec, and
nvImageCodec 0.9 (the only series DALI 2.4 takes) has an open report (NVIDIA/nvImageCodec#55) of
NVIMGCODEC_STATUS_INTERNAL_ERROR or SIGSEGV there on A100, H100 and B200. A segfault cannot be caught in the
process that hits it: it would end a training run, the harness or pytest with no word on the way out. So the
training pipeline's own definition runs first in a child, on this rank's GPU, over a few of the run's own
training images, batch 2, two batches; a child that dies by a signal, exits non-zero or hangs becomes one
UserError naming `--no-fused-decode` (decode the whole image, then crop), which does not take this path and
so runs no probe. docs/usage.md#troubleshooting-the-gpu-path is the user's side of it.

The probe knows the pipeline definition only as the callable it is given: the child imports it by its module
and name, so this module imports no loader (pipelines.dali imports this one).

The child: `python -m pipelines.decode_probe REQUEST`, REQUEST a JSON object (`_request`).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from pipelines.augmentation import Augmentation
from pipelines.errors import UserError

CHILD = (sys.executable, "-m", "pipelines.decode_probe")
IMAGES = 4  # two batches of 2: each image decoded once
BATCH = 2
# importing torch and DALI, a CUDA context and nvJPEG's scratch buffers take seconds; a hang past this is a failure
TIMEOUT_S = 120.0
TROUBLESHOOTING = "docs/usage.md#troubleshooting-the-gpu-path"
# DALI repeats this after every pipeline error; the operator's own error comes before it
_DALI_BOILERPLATE = "Current pipeline object is no longer valid."
# the child's line naming what failed: DALI's threads may log more after it (nvImageCodec's own errors)
_CAUSE = "probe failed: "
_COLOUR = re.compile(r"\x1b\[[0-9;]*m")  # nvImageCodec colours its log lines

# the outcome per device (None: the CPU) for this process: None when the probe passed, else the error's message.
# The harness builds many pipelines; one child per device is enough.
_outcomes: dict[int | None, str | None] = {}


def probe_images(image_list, count: int = IMAGES) -> list[bytes]:
    """`count` images of the list spread over it (several classes, not the first class's first files), as
    their encoded bytes: a file of class folders, a tar member of a shard set (pipelines.shards.ShardList.read)."""
    n = len(image_list)
    picks = sorted({i * n // count for i in range(count)})
    if hasattr(image_list, "read"):  # shards: the bytes live inside tar files, maybe in an object store
        return [image_list.read(i) for i in picks]
    return [Path(image_list.files[i]).read_bytes() for i in picks]


def probe_fused_decode(images: list[bytes], device_id: int | None, *, define, aug: Augmentation, dtype,
                       hw_decoder_load: float, command=CHILD, timeout: float = TIMEOUT_S) -> None:
    """Run the training pipeline `define` (pipelines.dali.training_pipeline) with its fused decode over `images`
    in a child process on GPU `device_id` (None: DALI's CPU operators); return when the child succeeds, else
    raise UserError. Once per process and device: a later call repeats the first outcome without a child.
    `command`: the child's command line without its request (a test substitutes one that crashes)."""
    if device_id not in _outcomes:
        _outcomes[device_id] = _run_child(images, device_id, define, aug, dtype, hw_decoder_load, command, timeout)
    if _outcomes[device_id] is not None:
        raise UserError(_outcomes[device_id])


def _run_child(images, device_id, define, aug, dtype, hw_decoder_load, command, timeout) -> str | None:
    """The child's outcome: None when it exited 0, else the one-line message."""
    with tempfile.TemporaryDirectory(prefix="fused-decode-probe-") as folder:
        files = []
        for i, data in enumerate(images):
            path = Path(folder, f"image{i}")
            path.write_bytes(data)
            files.append(str(path))
        request = _request(files, device_id, define, aug, dtype, hw_decoder_load)
        try:
            done = subprocess.run([*command, request], capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return _message(device_id, f"the probe did not finish in {timeout:g} s and was killed")
    if done.returncode == 0:
        return None
    last = _last_error(done.stderr)
    if done.returncode < 0:
        try:
            name = signal.Signals(-done.returncode).name
        except ValueError:  # a signal without a name (a real-time one)
            name = f"signal {-done.returncode}"
        return _message(device_id, f"the probe process died of {name} (last error line: {last})")
    return _message(device_id, f"the probe process exited with status {done.returncode}: {last}")


def _last_error(stderr: str) -> str:
    """The child's own cause line where it wrote one, else (a crash) the last line it wrote, quoted."""
    lines = [line for line in (_COLOUR.sub("", line).strip() for line in stderr.splitlines()) if line]
    causes = [line.removeprefix(_CAUSE) for line in lines if line.startswith(_CAUSE)]
    return f"'{(causes or lines)[-1]}'" if lines else "no error output"


def _message(device_id: int | None, what: str) -> str:
    where = "the CPU" if device_id is None else f"GPU {device_id}"
    return (f"the fused decode (decoders.image_random_crop, nvImageCodec's region-of-interest decode) failed in a "
            f"start-up probe on {where}: {what}; rerun with --no-fused-decode (decodes the whole image, then crops: "
            f"the same augmentation), see {TROUBLESHOOTING}")


def _request(files, device_id, define, aug, dtype, hw_decoder_load) -> str:
    return json.dumps({"define": f"{define.__module__}:{define.__qualname__}", "files": files, "device_id": device_id,
                       "aug": dataclasses.asdict(aug), "dtype": str(dtype).removeprefix("torch."),
                       "hw_decoder_load": hw_decoder_load})


def _cause(exc: Exception) -> str:
    """One line for the parent: DALI's error names the operator, then after "encountered:" its own error
    (an nvImageCodec status, say), then boilerplate; any other error, the first line of its message."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if "encountered:" in lines:
        lines = lines[lines.index("encountered:") + 1:]
    lines = [line for line in lines if line != _DALI_BOILERPLATE]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def main(argv: list[str]) -> int:
    """The child: build and run the pipeline the request names; a failure is one stderr line after _CAUSE."""
    request = json.loads(argv[0])
    module, name = request["define"].split(":")
    define = getattr(importlib.import_module(module), name)
    import torch
    from nvidia.dali import pipeline_def

    aug = Augmentation(**{k: tuple(v) if isinstance(v, list) else v for k, v in request["aug"].items()})
    files, device_id = request["files"], request["device_id"]
    options = dict(shard_id=0, num_shards=1, aug=aug, placement="cpu" if device_id is None else "gpu",
                   dtype=getattr(torch, request["dtype"]), hw_decoder_load=request["hw_decoder_load"],
                   fused_decode=True)
    try:
        pipe = pipeline_def(lambda: define(files, [0] * len(files), **options), batch_size=BATCH, num_threads=1,
                            device_id=device_id, seed=0,
                            enable_conditionals=aug.auto_augment)()  # RandAugment and TrivialAugment need them
        pipe.build()
        for _ in range(-(-len(files) // BATCH)):
            pipe.run()
    except Exception as exc:  # noqa: BLE001 - whatever failed, the parent quotes this one line
        print(_CAUSE + _cause(exc), file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
