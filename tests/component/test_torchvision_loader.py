"""The torchvision loader's workers make the batch (issue 39 item 3): the training dtype, normalised, channels_last,
so that the main process only moves it to the device; validation as torchvision's documented transforms give it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

import pipelines.torchvision_loader as module
from pipelines import build_loader
from pipelines.augmentation import Augmentation
from pipelines.folder import list_split

from conftest import N_VAL_IMAGES as N_VAL


def loader(split, data, **kw):
    return build_loader("torchvision", split, data, **{"batch_size": 8, "image_size": 32, "workers": 1, **kw})


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_the_workers_collate_the_training_dtype_channels_last(data_dir, split, dtype):
    out = loader(split, data_dir, dtype=dtype)
    images, labels = next(iter(out._loader))  # as the worker process hands the batch over, before __iter__
    assert images.dtype == dtype and images.shape == (8, 3, 32, 32)
    assert images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()
    assert labels.dtype == torch.int64
    delivered, _ = next(iter(out))
    assert delivered.dtype == dtype and delivered.is_contiguous(memory_format=torch.channels_last)


def test_validation_is_torchvisions_documented_transforms(data_dir):
    ours = torch.cat([x for x, _ in loader("val", data_dir, dtype=torch.float16)])
    aug = Augmentation(image_size=32)
    documented = v2.Compose([v2.PILToTensor(), v2.Resize(aug.val_resize_to, antialias=True), v2.CenterCrop(32),
                             v2.ToDtype(torch.float32, scale=True), v2.Normalize(aug.mean, aug.std)])
    files = list_split(str(data_dir), "val").files
    theirs = torch.stack([documented(Image.open(f).convert("RGB")) for f in files]).half()
    assert ours.shape == theirs.shape == (N_VAL, 3, 32, 32)
    # one scale and shift in float32 instead of a division by 255 and one by std: measured equal here and on 128
    # photo-like 400x350 JPEGs; a value may round one fp16 step away (2**-9 at the largest magnitudes, near 2.6).
    # A wrong mean, std, crop or decoder is far above that
    assert (ours.float() - theirs.float()).abs().max() <= 2 ** -9


def test_pillow_simd_resizes_what_pil_decodes(data_dir, tmp_path, monkeypatch):
    for split in ("train", "val"):
        shutil.copytree(data_dir / split, tmp_path / split)
    folder = sorted((tmp_path / "train").iterdir())[0]
    with Image.open(sorted(folder.iterdir())[0]) as image:
        image.convert("RGB").save(folder / "extra.png")  # read by PIL, whatever the JPEG decoder
    monkeypatch.setattr(module, "pillow_simd", lambda: True)  # the detection alone: pillow-simd is not installed
    training = loader("train", tmp_path, dtype=torch.float16, workers=0, batch_size=4)
    assert "(pillow-simd resize)" in training.decode
    dataset = training._loader.dataset
    kinds = {type(module.jpeg_decoders.read_pixels(Path(f).read_bytes(), dataset.decoder, dataset.keep_pil)).__name__
             for f in dataset.list.files}
    assert kinds == {"Tensor", "Image"}  # the PNG stays a PIL image for PIL's resize; JPEGs are tensors
    for images, _ in training:
        assert images.dtype == torch.float16 and images.is_contiguous(memory_format=torch.channels_last)
    assert "(torch resize)" in loader("val", tmp_path).decode  # validation: torch's resize always
