"""`--cuda-graphs`: the whole training step captured once in a CUDA graph and replayed every step after.

What one replay runs is the body of `rn50.core.step.train_step`, captured as it is (there is one copy of the
step): the forward pass under autocast, the loss (distillation included: the frozen teacher's forward has
static shapes and no host sync), the scaled backward pass with DDP's all-reduce, GradScaler's inf check,
the fused optimizer step and the scale update. The shape that makes this capturable, from PyTorch's CUDA
semantics notes ("Whole-network capture", "Usage with DistributedDataParallel") and the torch source:

- **Static inputs.** Each batch is copied into buffers that the graph reads (the training loaders drop the
  last partial batch, so the shape stays fixed within an epoch). A batch of a new shape (progressive resizing
  changes the image size between epochs) drops the graph, which frees its memory, and warms up and captures
  again at that shape.
- **The LR as device tensors.** `set_lr` writes Python floats into the param groups every step; a captured
  float would stay the LR of the capture step forever. Each call copies the groups' floats into one device
  tensor per group, and the captured step reads those (the fused kernels take the LR as a tensor).
- **GradScaler without host syncs.** With a fused optimizer (`_step_supports_amp_scaling`), `scaler.step`
  hands the optimizer the scale and the found-inf flag as tensors and the kernel skips the update on an
  overflow; `scaler.update` is `_amp_update_scale_`, on the device. The unfused path reads found_inf with
  `.item()`, so --cuda-graphs needs the fused optimizer. bf16 and fp32 steps have no scaler at all.
  --clip-grad-norm is captured too: `scaler.unscale_` (an on-device inf check and multiply) and torch's
  `clip_grad_norm_` (foreach norms, a clamped coefficient, a foreach multiply; error_if_nonfinite=False reads
  nothing back). --accum-steps above 1 is refused: the graph holds one batch per optimizer step.
- **Warm-up, then capture.** The first `warmup_steps` calls are real, eager training steps on a side stream
  (lazy state: momentum buffers, the scaler's tensors, cuDNN's choice of kernels, DDP's bucket rebuild).
  DDP needs at least 11 of them and must be built on the same stream (`build_training` does); the capture
  reuses that stream. The next call captures the step (capture runs nothing) and replays it: that replay is
  its training step. Every call after that is a copy into the static buffers and one replay. At a new shape,
  `WARMUP_STEPS` eager steps (cuDNN chooses its kernels for the shape) come before the next capture.
- **Autocast's weight cache off** during warm-up and capture (the cached casts must not outlive the capture).
- **thread_local capture mode:** DALI's worker threads keep launching their own GPU work during the capture.

What stays outside the graph, run eagerly each call (both have host-side logic that capture forbids):
- Mixup/CutMix draw lambda and the box on the host; their output (the same image shape, soft labels
  `[N, classes]`) is what is copied into the static buffers.
- The EMA update: `AveragedModel.update_parameters` tests `n_averaged` on the host. It runs after the
  replay and reads the weights the replay wrote in place, as the eager step does.

What cannot be captured is refused at start-up (`check_capturable`). Verified on a GPU only by the tests
marked `gpu` (tests/component/test_graphs.py); on the CPU those tests check this orchestration with the capture and
replay replaced by eager calls.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import weakref

import torch

from rn50.config.errors import UserError

WARMUP_STEPS = 3  # eager steps before the capture in one process (torch's whole-network example)
WARMUP_STEPS_DDP = 11  # torch's CUDA-graph notes: at least 11 DDP-enabled eager iterations before capture


def check_capturable(recipe, machine) -> None:
    """Combinations the captured step cannot run, refused at start-up with the flag to change."""
    if recipe.optimisation.optimizer == "lamb":
        raise UserError("--cuda-graphs cannot capture LAMB (timm's keeps its step count on the host, and its "
                        "GradScaler path reads found_inf with a host sync); use --optimizer sgd or adamw, or drop "
                        "--cuda-graphs")
    if not machine.fused_optimizer:
        raise UserError("--cuda-graphs needs the fused optimizer (it takes the LR as a device tensor and the "
                        "scaler's inf check without a host sync); drop --no-fused-optimizer or --cuda-graphs")
    if recipe.optimisation.accum_steps > 1:  # the graph holds one batch's forward, backward and optimizer step
        raise UserError(f"--cuda-graphs captures one batch per optimizer step, not --accum-steps "
                        f"{recipe.optimisation.accum_steps} micro-batches; use --accum-steps 1 or drop --cuda-graphs")
    if machine.compile and machine.compile_mode != "default":
        raise UserError(f"--compile-mode {machine.compile_mode} captures CUDA graphs of its own, which cannot nest "
                        "inside --cuda-graphs' capture; use --compile-mode default with --cuda-graphs, or drop "
                        "--cuda-graphs")


def capture_stream(device: torch.device) -> torch.cuda.Stream:
    """The one side stream that DDP is built on, the warm-up runs on and the capture uses."""
    return torch.cuda.Stream(device)


def on_stream(stream: torch.cuda.Stream | None):
    """`stream` as the current stream (DDP's construction for a capture), or nothing when None."""
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


class GraphedStep:
    """`train_step` for `--cuda-graphs`: `parts.graphed`, called by `rn50.core.step.train_step` in its place.

    `step` is the eager step (`rn50.core.step.train_step`); it runs, with the mixing and the EMA left out, for
    the warm-up and inside the capture. Returns the step's loss as a fresh tensor, without a host sync.
    """

    def __init__(self, parts, step, stream: torch.cuda.Stream | None, warmup_steps: int):
        # a weak reference: `parts.graphed` is this object, and a cycle would keep the model, the optimizer
        # and the graph's memory pool alive until the garbage collector ran (the harness builds many)
        self._parts = weakref.ref(parts)
        self.step, self.stream, self.warmup_steps = step, stream, warmup_steps
        self.calls = 0
        self.warmup_left = warmup_steps  # eager steps still to run before the next capture
        self.captures = 0  # one per batch shape met (progressive resizing), usually 1
        self.graph = None
        self.capture_s: float | None = None  # seconds the last capture took (synchronised)
        self.static_images = self.static_labels = self.static_loss = None
        self.lrs: list[torch.Tensor] = []  # one per param group, read by the captured optimizer step

    @property
    def parts(self):
        """The TrainingParts this step belongs to (held weakly: they hold this step)."""
        return self._parts()

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        parts = self.parts
        if parts.mix is not None:  # host-side random draws: eagerly, before the graph; the shapes stay fixed
            images, labels = parts.mix(images, labels)
        self._load(images, labels)
        if self.captured:
            self._replay()
            loss = self.static_loss
        elif self.warmup_left > 0:
            loss = self._on_side_stream(lambda: self._body(capturing=False))
            self.warmup_left -= 1
        else:
            self._sync()
            started = time.perf_counter()
            self.static_loss = self._capture(lambda: self._body(capturing=True))
            self._sync()
            self.capture_s = time.perf_counter() - started
            self.captures += 1
            self._replay()  # capturing ran nothing: this replay is this call's training step
            loss = self.static_loss
        self.calls += 1
        if parts.ema is not None:  # tests n_averaged on the host: eagerly, on the weights the step wrote
            parts.ema.update_parameters(parts.raw_model)
        # a copy on the current stream: the next replay overwrites the static loss, and callers keep losses
        return loss.detach().clone()

    def _load(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Copy the batch into the static buffers, and the groups' LRs (floats from set_lr) into theirs."""
        groups = self.parts.optimizer.param_groups
        if self.static_images is None:
            self.static_images, self.static_labels = torch.empty_like(images), torch.empty_like(labels)
            # the fused CUDA kernels read the LR as float32; elsewhere float64 keeps the float's exact value
            dtype = torch.float32 if images.device.type == "cuda" else torch.float64
            self.lrs = [torch.zeros((), dtype=dtype, device=images.device) for _ in groups]
        elif (images.shape, images.dtype, labels.shape, labels.dtype) != (
                self.static_images.shape, self.static_images.dtype, self.static_labels.shape, self.static_labels.dtype):
            # a new shape (progressive resizing): drop the graph and its memory (the step body sets the grads
            # that lived in its pool to None), warm up at this shape, capture again
            if self.captured:
                self._sync()  # the last replay has finished before its graph goes
            self.graph = self.static_loss = None
            self.static_images, self.static_labels = torch.empty_like(images), torch.empty_like(labels)
            self.warmup_left = WARMUP_STEPS
        self.static_images.copy_(images)
        self.static_labels.copy_(labels)
        for group, lr in zip(groups, self.lrs):
            lr.fill_(group["lr"])

    def _body(self, capturing: bool) -> torch.Tensor:
        """The eager step on the static buffers, with the LR tensors in the groups (AdamW's groups also
        marked capturable while capturing) and autocast's weight cache off; the groups are restored after,
        so checkpoints hold the same optimizer state as an eager run's."""
        groups = self.parts.optimizer.param_groups
        saved = [(group["lr"], group.get("capturable")) for group in groups]
        cache = torch.is_autocast_cache_enabled()
        eager = dataclasses.replace(self.parts, mix=None, ema=None, graphed=None)
        try:
            torch.set_autocast_cache_enabled(False)
            for group, lr in zip(groups, self.lrs):
                group["lr"] = lr
                if capturing and "capturable" in group:
                    group["capturable"] = True
            return self.step(eager, self.static_images, self.static_labels)
        finally:
            torch.set_autocast_cache_enabled(cache)
            for group, (lr, capturable) in zip(groups, saved):
                group["lr"] = lr
                if capturable is not None:
                    group["capturable"] = capturable

    # the CUDA parts, apart so that the CPU tests can replace them with eager calls
    def _on_side_stream(self, work):
        current = torch.cuda.current_stream(self.stream.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            out = work()
        current.wait_stream(self.stream)
        return out

    def _capture(self, work) -> torch.Tensor:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
            out = work()
        self.graph = graph
        return out

    def _replay(self) -> None:
        self.graph.replay()

    def _sync(self) -> None:
        torch.cuda.synchronize(self.stream.device)
