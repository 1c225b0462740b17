"""The GPU path's decisions, checked without a GPU: the batch dtype rule, the device choice (GPUs present but
CUDA unusable), the GPU pipelines' graphs (decoder flags, where each operator's arguments live), and the
process count of the NCCL test. What needs a GPU to run is in test_gpu.py."""

from __future__ import annotations

import re

import pytest
import torch
from nvidia.dali import pipeline_def

from pipelines.dali import describe_decode, training_pipeline, validation_pipeline
from rn50.system.device import CudaProbe, choose_device, cuda_unusable_message
from rn50.system.dist import DistEnv
from rn50.config.errors import UserError
from rn50.core.loaders import build_split, loader_options
from rn50.core.precision import autocast_dtype, batch_dtype
from pipelines.augmentation import Augmentation
from pipelines.settings import LoaderSettings
from rn50.config.machine import Machine
from rn50.config.recipe import with_fields
from rn50.core.step import build_training, train_step

from conftest import N_TRAIN_IMAGES, gpu_ddp_processes

CUDA = torch.device("cuda", 0)


@pytest.mark.parametrize("amp, amp_dtype, device, expected", [
    (True, "float16", CUDA, torch.float16),  # AMP fp16: the dtype the first convolution casts to anyway
    (True, "bfloat16", CUDA, torch.float16),  # DALI has no bf16 output; fp16 holds normalised pixels finer
    (False, "float16", CUDA, torch.float32),  # --no-amp on a GPU: an fp32 model takes fp32 batches
    (True, "float16", torch.device("cpu"), torch.float32),  # fp16 AMP asked of the CPU: fp32 (said at start-up)
    (True, "bfloat16", torch.device("cpu"), torch.float16),  # CPU autocast in bf16: the same rule as on a GPU
])
def test_the_batch_dtype_follows_the_precision_of_the_step(amp, amp_dtype, device, expected):
    recipe = with_fields(amp=amp, amp_dtype=amp_dtype)
    assert loader_options(recipe, Machine(), device)["dtype"] == expected
    assert batch_dtype(autocast_dtype(amp, amp_dtype, device)) == expected


def test_an_fp32_step_refuses_fp16_batches_and_takes_what_the_rule_gives(data_dir):
    """The bug the rule prevents, reproduced on the CPU: without autocast an fp16 batch meets fp32 weights."""
    recipe = with_fields(arch="resnet18", batch_size=8, image_size=32)
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    parts = build_training(recipe, 4, env)
    images, labels = next(iter(build_split(recipe, Machine(dali_threads=1), "dali-cpu", "train", data_dir, env)))
    assert images.dtype == torch.float32
    assert torch.isfinite(train_step(parts, images, labels))
    with pytest.raises(RuntimeError, match="should be the same|same dtype|expected scalar type"):
        train_step(parts, images.half(), labels)


def test_bf16_autocast_asked_of_the_cpu_is_honoured_and_fp16_amp_is_named():
    """`--amp --amp-dtype bfloat16` on the CPU trained in fp32 without a word (amp_in_use null); torch's CPU
    autocast runs bf16: the step computes in it. fp16 AMP, the default, stays fp32 there and says so once."""
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    parts = build_training(with_fields(arch="resnet18", batch_size=4, amp_dtype="bfloat16"), 4, env)
    assert parts.amp_dtype == torch.bfloat16 and not parts.scaler.is_enabled() and not parts.notes
    computed_in = []
    parts.model.fc.register_forward_hook(lambda module, args, out: computed_in.append(out.dtype))
    images = torch.randn(4, 3, 32, 32).to(batch_dtype(parts.amp_dtype)).contiguous(memory_format=torch.channels_last)
    assert torch.isfinite(train_step(parts, images, torch.arange(4)))
    assert computed_in == [torch.bfloat16]
    for amp, said in ((True, True), (False, False)):
        fp16 = build_training(with_fields(arch="resnet18", amp=amp, amp_dtype="float16"), 4, env)
        assert fp16.amp_dtype is None
        named = [note for note in fp16.notes if "fp32" in note and "--amp-dtype bfloat16" in note]
        assert len(named) == said, fp16.notes


# --- the device: GPUs present but CUDA unusable ------------------------------------------------------

CUDA13_ON_CUDA12_DRIVER = CudaProbe(gpus_visible=4, cuda_available=False, torch_cuda="13.0",
                                    driver="535.104.05", driver_cuda="12.2")


def test_gpus_with_unusable_cuda_stop_the_start_naming_both_versions_and_the_fix():
    with pytest.raises(UserError) as error:
        choose_device("auto", 0, CUDA13_ON_CUDA12_DRIVER)
    message = str(error.value)
    assert "4 NVIDIA GPU(s)" in message and "535.104.05" in message
    assert "CUDA up to 12.2" in message and "built for CUDA 13.0" in message
    assert "download.pytorch.org/whl/cu121" in message  # the newest torch wheel whose CUDA <= 12.2
    assert "--device cpu" in message and "\n" not in message


def test_the_cpu_is_used_when_asked_for_or_when_there_is_no_gpu(monkeypatch):
    assert choose_device("cpu", 0, CUDA13_ON_CUDA12_DRIVER) == torch.device("cpu")
    no_gpu = CudaProbe(gpus_visible=0, cuda_available=False, torch_cuda="13.0")
    assert choose_device("auto", 0, no_gpu) == torch.device("cpu")
    with pytest.raises(UserError, match="--device cuda"):
        choose_device("cuda", 0, no_gpu)
    working = CudaProbe(gpus_visible=2, cuda_available=True, torch_cuda="13.0")
    assert choose_device("auto", 1, working) == torch.device("cuda", 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # GPUs hidden on purpose: the CPU, no error
    assert choose_device("auto", 0, CUDA13_ON_CUDA12_DRIVER) == torch.device("cpu")


def test_an_unusable_cuda_that_is_not_a_version_mismatch_passes_on_torchs_reason():
    probe = CudaProbe(gpus_visible=1, cuda_available=False, torch_cuda="12.4", driver="550.54", driver_cuda="12.4",
                      torch_reason="CUDA initialization: CUDA driver initialization failed.")
    message = cuda_unusable_message(probe)
    assert "CUDA driver initialization failed" in message and "nvidia-smi" in message


# --- the GPU pipelines' graphs, built without a GPU ------------------------------------------------

def gpu_graph(define, placement="gpu", aug=Augmentation(image_size=32), **options):
    """The operators of a GPU ("mixed" decode) or hybrid pipeline, as DALI builds its graph (no GPU needed)."""
    pipe = pipeline_def(lambda: define(["a.jpg", "b.jpg"], [0, 1], shard_id=0, num_shards=1, aug=aug,
                                       placement=placement, dtype=torch.float16,
                                       hw_decoder_load=LoaderSettings().hw_decoder_load, **options),
                        batch_size=2, num_threads=1, device_id=None,
                        enable_conditionals=aug.auto_augment)()
    pipe.serialize()  # builds the graph
    return pipe._ops


@pytest.mark.parametrize("placement", ["gpu", "hybrid"])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("aug", [Augmentation(image_size=32), Augmentation(image_size=32, color_jitter=0.0),
                                 Augmentation(image_size=32, randaugment_magnitude=9, randaugment_magnitude_std=0.5),
                                 Augmentation(image_size=32, trivial_augment=True, random_erase=0.5)],
                         ids=["jitter", "no jitter", "randaugment", "trivialaugment and erasing"])
def test_every_operator_of_the_gpu_graphs_has_an_implementation_on_its_device(placement, fused, aug):
    """What DALI can check of a GPU pipeline without a GPU: the graph defines (argument names and types checked
    against each operator's schema), and each operator placed on "gpu" or "mixed" has a kernel registered for
    that device in this DALI build (RandAugment's ~1,800 operators included; TrivialAugment's, and random
    erasing's fn.erase on the GPU with its region drawn on the CPU). That the kernels run, and give
    the CPU pipeline's pixels within tolerance, waits for tests/gpu/test_gpu.py."""
    from nvidia.dali.ops import _registry

    registered = {"cpu": _registry.cpu_ops(), "gpu": _registry.gpu_ops(), "mixed": _registry.mixed_ops()}
    graphs = [gpu_graph(training_pipeline, placement, aug, fused_decode=fused)]
    if not aug.auto_augment and not aug.random_erase and aug.color_jitter > 0:  # validation: no augmentation
        graphs.append(gpu_graph(validation_pipeline, placement))
    specs = [repr(op.spec) for ops in graphs for op in ops]
    placed = [(re.match(r"OpSpec for (\w+):", spec).group(1), re.search(r"device: (\w+)", spec).group(1)) for spec in specs]
    assert {device for _, device in placed} == {"cpu", "gpu", "mixed" if placement == "gpu" else "cpu"}
    missing = sorted({(schema, device) for schema, device in placed if schema not in registered[device]})
    assert not missing, missing


GPU_PIPELINES = {"train fused": (training_pipeline, {"fused_decode": True}),
                 "train unfused": (training_pipeline, {"fused_decode": False}),
                 "val": (validation_pipeline, {})}


@pytest.mark.parametrize("name", GPU_PIPELINES)
def test_gpu_decoders_upsample_chroma_as_libjpeg_turbo(name):
    define, options = GPU_PIPELINES[name]
    decoders = [op for op in gpu_graph(define, **options) if "device: mixed" in repr(op.spec)]
    assert len(decoders) == 1
    assert re.search(r"jpeg_fancy_upsampling: True", repr(decoders[0].spec)), repr(decoders[0].spec)


@pytest.mark.parametrize("name", GPU_PIPELINES)
def test_hybrid_pipelines_decode_and_crop_on_the_cpu_and_do_the_rest_on_the_gpu(name):
    define, options = GPU_PIPELINES[name]
    ops = gpu_graph(define, "hybrid", **options)
    decoders = [op for op in ops if "_module: nvidia.dali.fn.decoders" in repr(op.spec)]
    assert len(decoders) == 1 and "device: cpu" in repr(decoders[0].spec), [op.name for op in ops]
    assert not any("device: mixed" in repr(op.spec) for op in ops)
    resize = [op for op in ops if "Resize" in op.name or "RandomResizedCrop" in op.name]
    normalise = [op for op in ops if "CropMirrorNormalize" in op.name]
    assert resize and normalise
    assert all(op.inputs[0].device == "gpu" for op in resize + normalise), \
        [(op.name, op.inputs[0].device) for op in resize + normalise]
    if name == "train fused":  # the crop is part of the CPU decode
        assert "_display_name: image_random_crop" in repr(decoders[0].spec)


@pytest.mark.parametrize("placement", ["gpu", "hybrid"])
@pytest.mark.parametrize("name", GPU_PIPELINES)
def test_gpu_operators_take_their_arguments_from_the_cpu(name, placement):
    """A GPU operator whose anchor, shape or random parameters live on the GPU copies them to the host and
    synchronises every batch; only the images themselves may come from the GPU."""
    define, options = GPU_PIPELINES[name]
    ops = gpu_graph(define, placement, **options)
    on_gpu = [op for op in ops if op.inputs and op.inputs[0].device == "gpu"]
    assert on_gpu, "no GPU operator found: the graph inspection no longer sees DALI's operators"
    for op in on_gpu:
        assert [i.device for i in op.inputs[1:]] == ["cpu"] * (len(op.inputs) - 1), \
            (op.name, [(i.name, i.device) for i in op.inputs])
    if name == "val":
        assert any(op.name.startswith("__Slice") for op in on_gpu)


def test_the_decode_path_is_named_for_the_report():
    assert "fused with RandomResizedCrop" in describe_decode(True, "gpu", True, 0.65)
    assert "hw_decoder_load 0.65" in describe_decode(True, "gpu", True, 0.65)
    assert "--no-fused-decode" in describe_decode(True, "gpu", False, 0.65)
    assert "libjpeg-turbo" in describe_decode(True, "cpu", True, 0.65)
    hybrid = describe_decode(True, "hybrid", True, 0.65)
    assert "CPU threads" in hybrid and "the rest on the GPU" in hybrid


# --- the NCCL test's process count --------------------------------------------------------------------

@pytest.mark.parametrize("gpus", [1, 2, 4, 7, 8, 16])
def test_the_nccl_test_fits_its_data_on_any_gpu_count(gpus):
    """test_gpu.py's NCCL run: batch 8 per rank must fit each rank's share of the 48 training images."""
    processes = gpu_ddp_processes(gpus)
    assert 1 <= processes <= min(gpus, 2)
    assert N_TRAIN_IMAGES // processes >= 8
