"""--compile: the compiled step follows the eager one, checkpoints move between compiled and eager models both
ways (no `_orig_mod.` in the keys), validation compiles once per shape, an exact mid-epoch resume stays bit for
bit, and the compile time is reported apart (compile_s), never counted in img/s.

Compiling ResNet-18 takes about a minute on 2 cores the first time (inductor keeps its cache on disk, so later
compiles of the same graphs take seconds): the tests that compile are marked slow, and each compiled model serves
several assertions.
"""

from __future__ import annotations

import io
import json
import logging
import re
import signal
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision
from torch._dynamo.utils import counters

from rn50.reliability.checkpoint import restore_training, training_state
from rn50.system.dist import DistEnv
from rn50.core.validation import evaluate
from rn50.core.model import build_model
from rn50.reliability.exits import EXIT_PREEMPTED
from rn50.config.machine import Machine
from rn50.config.recipe import with_fields
from rn50.core.schedule import set_lr
from rn50.core.step import build_training, train_step

from conftest import CLASSES, ROOT, run_cli, run_clis
from test_reliability import SMALL, epoch_losses, final_weights, kill_when_checkpointed, same_weights, step_losses

CPU = DistEnv(0, 1, 0, torch.device("cpu"))


def batches(n, batch=4, size=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, size, size, generator=generator).contiguous(memory_format=torch.channels_last),
             torch.randint(0, CLASSES, (batch,), generator=generator)) for _ in range(n)]


def train(parts, data, lr=0.01):
    losses = []
    for images, labels in data:
        set_lr(parts.optimizer, lr)
        losses.append(train_step(parts, images, labels))
    return torch.stack(losses)


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def state(parts) -> dict:
    """What a checkpoint of `parts` holds, through torch.save and torch.load as a checkpoint file goes (the
    state dicts hold the live tensors: sharing them would tie the two models' momentum buffers together)."""
    buffer = io.BytesIO()
    torch.save(training_state(parts, epochs_done=0, step=4, steps_per_epoch=8, plateau={}, loader_states=[],
                              loader_kind="synthetic", recipe={}, world_size=1, history=[], elapsed_s=0.0), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def one_step(parts, images, labels, lr=0.01):
    """One training step from the parts' current state: (loss, gradients, weight updates, weights before).
    One step is not chaotic; several SGD steps on random data are (a 1e-6 relative nudge to every weight of
    resnet18 has changed the 4th step's loss from 2.49 to 2.02), so compiled and eager are compared one step
    at a time from equal states."""
    before = {name: p.detach().clone() for name, p in parts.raw_model.named_parameters()}
    set_lr(parts.optimizer, lr)
    loss = train_step(parts, images, labels)
    grads = {name: p.grad.detach().clone() for name, p in parts.raw_model.named_parameters()}
    updates = {name: p.detach() - before[name] for name, p in parts.raw_model.named_parameters()}
    return loss, grads, updates, before


# Measured on resnet18, batch 4, 32 px, lr 0.01 (AVX-512 CPU, 1 thread), as the largest |difference| over a
# tensor divided by the tensor's largest |value|: compiled vs eager, first step: loss 1 ulp (1.2e-7), gradients
# 4.2e-6, updates 4.6e-5; eager vs eager with every weight scaled by (1 + 1e-6 noise): gradients 2.8e-5.
# STEP_RTOL is 20x the largest of them.
STEP_RTOL = 1e-3
LOSS_RTOL = 1e-5  # 80x the measured 1.2e-7
EPS = torch.finfo(torch.float32).eps


def assert_same_step(got, expected):
    """Loss, every gradient and every update of one step within the measured spread; on failure the
    message names the tensor and keeps torch's figures (greatest difference, where, the tolerance)."""
    (loss_g, grads_g, updates_g, before_g), (loss_e, grads_e, updates_e, before_e) = got, expected
    assert all(torch.equal(before_g[n], before_e[n]) for n in before_e)  # the two started from equal weights
    torch.testing.assert_close(loss_g, loss_e, rtol=LOSS_RTOL, atol=0)
    for name in grads_e:
        # an update is a difference of two weights: it carries their rounding (half an ulp of the weight),
        # which a weight-decay-only update (a zero-initialised residual branch) is not much larger than
        for what, a, b, floor in (("gradient", grads_g[name], grads_e[name], 0.0),
                                  ("update", updates_g[name], updates_e[name], 2 * EPS * before_e[name].abs().max())):
            atol = STEP_RTOL * b.abs().max().item() + float(floor) + 1e-12
            torch.testing.assert_close(a, b, rtol=0, atol=atol,
                                       msg=lambda text, what=what, name=name: f"{what} of {name}: {text}")


@pytest.mark.slow
def test_compiled_step_follows_eager_and_checkpoints_move_both_ways():
    recipe = with_fields(arch="resnet18", batch_size=4)
    eager = build_training(recipe, CLASSES, CPU)
    compiled = build_training(recipe, CLASSES, CPU, Machine(compile=True))
    keys = list(torchvision.models.resnet18(num_classes=CLASSES).state_dict())
    assert list(compiled.raw_model.state_dict()) == list(eager.raw_model.state_dict()) == keys  # no _orig_mod.

    (images, labels), = batches(1)
    assert_same_step(one_step(compiled, images, labels), one_step(eager, images, labels))  # the first compiles
    after_training = graphs()

    # a compiled run's checkpoint loads strictly into plain models
    saved = state(compiled)
    torchvision.models.resnet18(num_classes=CLASSES).load_state_dict(saved["model"])
    build_model("resnet18", CLASSES, True).load_state_dict(saved["model"])
    # an eager checkpoint (weights, optimizer, scaler) continues in the compiled model, which then computes
    # with the loaded weights and steps as the eager model does
    restore_training(compiled, state(eager))
    (images, labels), = batches(1, seed=1)
    assert_same_step(one_step(compiled, images, labels), one_step(eager, images, labels))
    # and back: the compiled model's state into a fresh eager one, which validates as the compiled one does
    fresh = build_training(recipe, CLASSES, CPU)
    restore_training(fresh, state(compiled))
    val = batches(3) + batches(1, batch=2, seed=2)  # 14 images, batch 4: a partial last batch

    # validation compiles once per shape (eval mode: the full batch and the partial last one), not per batch
    before = graphs()
    result = evaluate(compiled.raw_model, val)
    assert result["val/count"] == 14
    assert graphs() - before == 2
    again = graphs()
    assert evaluate(compiled.raw_model, val) == result
    assert graphs() == again
    expected_val = evaluate(fresh.raw_model, val)
    # equal weights, one forward each: logits within rounding (loss measured equal to 1e-7 relative); a
    # prediction whose two best logits tie within rounding may flip, so top-1 may differ by one image of 14
    assert abs(result["val/top1"] - expected_val["val/top1"]) <= 100 / 14 + 1e-9, (result, expected_val)
    assert result["val/loss"] == pytest.approx(expected_val["val/loss"], rel=1e-4)
    # and training after validation runs the training graph it compiled first
    train(compiled, batches(1, seed=3))
    assert graphs() == again and after_training <= before


@pytest.mark.slow
def test_compiled_run_resumes_exactly_and_reports_compile_time_apart(data_dir, tmp_path):
    args = [sys.executable, "-m", "rn50.train", "--data", str(data_dir), "--epochs", "2", "--checkpoint-every", "2",
            "--keep-checkpoints", "1", *SMALL, "--compile"]  # the newest checkpoint alone is read (90 MB each)
    done = run_cli([*args, "--out", str(tmp_path / "a")], timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("compiled in ") == 1, done.stdout[-2000:]
    assert NOTE not in done.stderr, done.stderr[-2000:]

    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    first, second = [r for r in records if "val/count" in r]
    assert 0 < first["compile_s"] < first["train/epoch_s"] and "compile_s" not in second
    # img/s covers the 5 steps after the compiling one, over the epoch's time without it
    assert first["train/img_per_s"] == pytest.approx(5 * 8 / (first["train/epoch_s"] - first["compile_s"]))
    assert second["train/img_per_s"] == pytest.approx(6 * 8 / second["train/epoch_s"])
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["compile_s"] == first["compile_s"]
    weights = final_weights(tmp_path / "a")
    assert not [key for key in weights if "_orig_mod" in key]
    torchvision.models.resnet18(num_classes=CLASSES).load_state_dict(weights)  # strict

    code, output = kill_when_checkpointed([*args, "--out", str(tmp_path / "b")], tmp_path / "b", signal.SIGTERM)
    assert code == EXIT_PREEMPTED, output[-2000:]
    assert max(step_losses(tmp_path / "b")) < 12  # it really stopped early (2 epochs x 6 steps)
    resumed = run_cli([*args, "--out", str(tmp_path / "b"), "--resume", "auto"], timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "compiled in " in resumed.stdout  # the resumed process compiles again, and says so
    assert step_losses(tmp_path / "a") == step_losses(tmp_path / "b")  # every step, bit for bit
    assert epoch_losses(tmp_path / "a") == epoch_losses(tmp_path / "b")
    assert same_weights(weights, final_weights(tmp_path / "b"))


@pytest.mark.slow
def test_harness_reports_compile_time_apart(data_dir, tmp_path):
    done = run_cli([sys.executable, "-m", "benchmarks.run", "--data", str(data_dir), "--out", str(tmp_path / "bench"),
                    "--arch", "resnet18", "--image-size", "32", "--batch-size", "4", "--modes", "synthetic",
                    "--loaders", "", "--warmup-steps", "1", "--steps", "2", "--repeats", "1", "--compile"],
                   timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "bench" / "report.json").read_text())["results"]
    assert rows and all(row["compile_s"] > 0 for row in rows)


NOTE = "No CUDA runtime is found, using CUDA_HOME"
IMPORT_AFTER_BUILD = """
import logging, torch
from rn50.system.dist import DistEnv
from rn50.config.machine import Machine
from rn50.config.recipe import with_fields
from rn50.core.step import build_training
build_training(with_fields(arch="resnet18", batch_size=4), 4, DistEnv(0, 1, 0, torch.device("cpu")),
               Machine(compile={compile}))
import torch.utils.cpp_extension  # what inductor imports when it compiles; the note is logged on import
logging.getLogger("torch.utils.cpp_extension").warning("another warning of that logger")
"""


def test_compile_silences_the_no_cuda_runtime_note_and_nothing_else():
    """Without --compile the import prints the note on a CPU machine with a CUDA toolkit (the control);
    with it, the note is gone and the logger's other warnings still come out."""
    plain, quiet = run_clis([[sys.executable, "-c", IMPORT_AFTER_BUILD.format(compile=compile)]
                             for compile in (False, True)],  # side by side
                            timeout=300, CUDA_HOME=str(ROOT))  # any existing folder: torch takes it as the toolkit
    assert plain.returncode == 0, plain.stderr[-2000:]
    if torch.cuda.is_available():
        pytest.skip("with a GPU, torch prints no such note")
    assert NOTE in plain.stderr, plain.stderr[-2000:]
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert NOTE not in quiet.stderr and "another warning of that logger" in quiet.stderr, quiet.stderr[-2000:]


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _ddp_compile_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        records = Records()  # DDPOptimizer says at INFO how many buckets it split the graph into
        logger = logging.getLogger("torch._dynamo.backends.distributed")
        logger.setLevel(logging.INFO)
        logger.addHandler(records)
        env = DistEnv(rank, 2, rank, torch.device("cpu"))
        parts = build_training(with_fields(arch="resnet18", batch_size=2), CLASSES, env,
                               Machine(compile=True, ddp_bucket_mb=5))
        (images, labels), = batches(1, batch=2, seed=rank)
        set_lr(parts.optimizer, 0.01)
        train_step(parts, images, labels)
        # the parameters, not the BN statistics: those are each rank's own until DDP's next forward broadcasts
        # rank 0's (training broadcasts them before validating)
        weights = [p.detach().clone() for p in parts.raw_model.parameters()]
        result = {"lines": records.lines, "keys": list(parts.raw_model.state_dict()),
                  "weights": [float(w.double().sum()) for w in weights]}
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_compiled_ddp_splits_its_graph_at_the_buckets_and_keeps_torchvision_keys(tmp_path):
    """DDPOptimizer splits the compiled graph at DDP's bucket boundaries, so each bucket's all-reduce can
    overlap the rest of the backward. The module is compiled in place before DDP wraps it, and its frames
    compile inside DDP's forward, where dynamo finds the active DDP module and uses DDPOptimizer (checked
    with two gloo processes; resnet18's 45 MB of fp32 gradients in 5 MiB buckets: several buckets). About
    5 minutes on 2 cores the first time (each process compiles its graphs), under a minute from inductor's
    disk cache."""
    mp.spawn(_ddp_compile_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    keys = list(torchvision.models.resnet18(num_classes=CLASSES).state_dict())
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    # one all-reduced step from equal weights: the same weights on both ranks, bit for bit
    assert results[0]["weights"] == results[1]["weights"]
    for rank, result in enumerate(results):
        split = [re.search(r"created (\d+) buckets", line) for line in result["lines"]]
        counts = [int(m[1]) for m in split if m]
        assert counts and all(n > 1 for n in counts), (rank, result["lines"])
        assert result["keys"] == keys, (rank, sorted(set(result["keys"]) ^ set(keys))[:8], len(result["keys"]))
