"""Loaders behind one interface: real DALI CPU operators, the torchvision baseline, synthetic data."""

from __future__ import annotations

import shutil

import pytest
import torch
from nvidia.dali import pipeline_def

from pipelines import build_loader
from pipelines.dali import _reader, make_iterator
from pipelines.errors import UserError
from pipelines.folder import list_split

from conftest import CLASSES, N_TRAIN_IMAGES as N_TRAIN, N_VAL_IMAGES as N_VAL

CPU_OPTIONS = dict(dali_threads=1, workers=0)


def loader(kind, split, data, **kw):
    return build_loader(kind, split, data, **{"batch_size": 8, "image_size": 32, **CPU_OPTIONS, **kw})


def batches(it):
    return [(x.clone(), y.clone()) for x, y in it]


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_dali_cpu_output_contract(data_dir, split, dtype):
    out = loader("dali-cpu", split, data_dir, dtype=dtype)
    images, labels = next(iter(out))
    assert images.shape == (8, 3, 32, 32) and images.dtype == dtype
    assert images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()
    assert labels.dtype == torch.int64 and labels.shape == (8,)
    assert 0 <= labels.min() and labels.max() < CLASSES
    # normalised with ImageNet mean/std: pixel 0 -> -2.12, pixel 255 -> +2.64, mean near 0
    assert -2.2 <= images.float().min() < -0.5 and 0.5 < images.float().max() <= 2.7
    assert out.num_samples == (N_TRAIN if split == "train" else N_VAL) and out.num_classes == CLASSES


def test_dali_and_torchvision_batches_match_in_shape_dtype_and_layout(data_dir):
    for split in ("train", "val"):
        shapes = set()
        for kind in ("dali-cpu", "torchvision", "synthetic"):
            images, labels = next(iter(loader(kind, split, data_dir, dtype=torch.float16)))
            assert images.is_contiguous(memory_format=torch.channels_last), kind
            shapes.add((tuple(images.shape), images.dtype, labels.dtype, images.stride()))
        assert len(shapes) == 1, shapes


def test_dali_validation_is_pixel_equivalent_to_torchvision(data_dir):
    # Resize(int(S / 0.875)) + CenterCrop(S), computed as torchvision computes them (FACTS.md)
    dali = torch.cat([x for x, _ in loader("dali-cpu", "val", data_dir)])
    tv = torch.cat([x for x, _ in loader("torchvision", "val", data_dir)])
    assert dali.shape == tv.shape == (N_VAL, 3, 32, 32)
    per_image = (dali - tv).abs().mean(dim=(1, 2, 3))
    assert per_image.max() < 0.01, per_image.max()


@pytest.fixture()
def one_image_data(data_dir, tmp_path):
    """Eight copies of one JPEG in one class: whatever differs between outputs is augmentation."""
    source = list_split(str(data_dir), "train").files[0]
    for split in ("train", "val"):
        (tmp_path / split / "c0").mkdir(parents=True)
        for i in range(8):
            shutil.copy(source, tmp_path / split / "c0" / f"{i}.JPEG")
    return tmp_path


@pytest.mark.parametrize("fused", [True, False])
def test_training_augmentation_differs_between_epochs_and_images(one_image_data, fused):
    out = loader("dali-cpu", "train", one_image_data, fused_decode=fused)
    epoch0, epoch1 = batches(out), batches(out)
    assert len(epoch0) == len(epoch1) == 1
    a, b = epoch0[0][0], epoch1[0][0]
    assert not torch.equal(a, b)
    assert not torch.equal(a[0], a[1])  # the same source image, augmented two ways in one batch


def test_validation_is_deterministic(one_image_data):
    out = loader("dali-cpu", "val", one_image_data)
    (a, _), (b, _) = batches(out)[0], batches(out)[0]
    assert torch.equal(a, b) and torch.equal(a[0], a[7])


def test_colour_jitter_switch(one_image_data):
    # the same seed and crop stream; only the jitter differs
    on = batches(loader("dali-cpu", "train", one_image_data, color_jitter=0.4))[0][0]
    off = batches(loader("dali-cpu", "train", one_image_data, color_jitter=0.0))[0][0]
    assert not torch.equal(on, off)


def sample_ids(files, shard, shards, batch, epochs):
    """Run the training reader exactly as the DALI loader configures it, with each file's index as its
    label, and return the ids each epoch delivers to this shard."""
    def ids_pipeline():
        _, ids = _reader(files, range(len(files)), shard, shards, training=True)
        return ids, ids  # the iterator's two outputs (images, labels): here both the ids

    pipe = pipeline_def(ids_pipeline, batch_size=batch, num_threads=1, device_id=None, seed=1000 + shard)()
    iterator = make_iterator(pipe, training=True)
    return [[int(i) for out in iterator for i in out[0]["labels"].view(-1)] for _ in range(epochs)], len(iterator)


def test_shards_partition_the_data_and_the_order_changes_every_epoch(data_dir):
    files = list_split(str(data_dir), "train").files  # 48 files, 2 shards of 24, batch 4
    (s0, len0), (s1, len1) = (sample_ids(files, shard, 2, 4, epochs=3) for shard in (0, 1))
    assert len0 == len1 == 6
    for epoch in range(3):
        assert len(s0[epoch]) == len(s1[epoch]) == 24
        assert not set(s0[epoch]) & set(s1[epoch])  # no overlap
        assert sorted(s0[epoch] + s1[epoch]) == list(range(48))  # together: every image once
    assert s0[0] != s0[1] != s0[2] and set(s0[0]) != set(s0[1])  # a global reshuffle, not a fixed split


def test_uneven_shards_get_equal_step_counts(data_dir):
    # 45 images over 2 shards (22 and 23), batch 4: DDP needs the same step count on both ranks
    files = list_split(str(data_dir), "train").files[:45]
    (s0, len0), (s1, len1) = (sample_ids(files, shard, 2, 4, epochs=2) for shard in (0, 1))
    assert len0 == len1 == 5
    assert [len(e) for e in s0] == [len(e) for e in s1] == [20, 20]


@pytest.mark.parametrize("kind", ["dali-cpu", "torchvision", "synthetic"])
def test_training_steps_equal_on_every_rank(data_dir, kind):
    lengths = [len(loader(kind, "train", data_dir, rank=r, world_size=3, batch_size=5)) for r in range(3)]
    assert lengths == [N_TRAIN // 3 // 5] * 3  # 16 images per rank -> 3 full batches


@pytest.mark.parametrize("kind", ["dali-cpu", "torchvision"])
def test_validation_counts_every_image_once_over_two_ranks(data_dir, kind):
    seen = []
    for rank in (0, 1):
        for _, labels in loader(kind, "val", data_dir, rank=rank, world_size=2):
            seen += labels.tolist()
    assert len(seen) == N_VAL  # 44 = not a multiple of 2 ranks x batch 8
    assert sorted(seen) == sorted(list_split(str(data_dir), "val").labels)


def test_synthetic_validation_counts_exactly(data_dir):
    total = sum(len(y) for r in (0, 1) for _, y in loader("synthetic", "val", data_dir, rank=r, world_size=2))
    assert total == N_VAL


def test_loader_state_round_trip_continues_the_epoch_sequence(data_dir):
    first = loader("dali-cpu", "train", data_dir)
    batches(first)  # epoch 0
    state = first.state_dict()
    expected = batches(first)  # epoch 1
    resumed = loader("dali-cpu", "train", data_dir)
    resumed.load_state_dict(state)
    got = batches(resumed)
    assert len(got) == len(expected)
    assert all(torch.equal(a, b) and torch.equal(la, lb) for (a, la), (b, lb) in zip(got, expected))


def test_bad_input_is_one_clear_error(data_dir, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        loader("dali-cpu", "train", tmp_path / "missing")
    with pytest.raises(UserError, match="larger than this rank's share"):
        loader("dali-cpu", "train", data_dir, batch_size=N_TRAIN + 1)
    with pytest.raises(UserError, match="CUDA is not available"):
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
        loader("dali", "train", data_dir)
    (tmp_path / "d" / "train" / "a").mkdir(parents=True)
    (tmp_path / "d" / "train" / "b").mkdir(parents=True)
    (tmp_path / "d" / "val" / "z").mkdir(parents=True)
    shutil.copy(list_split(str(data_dir), "train").files[0], tmp_path / "d" / "train" / "a" / "x.JPEG")
    with pytest.raises(UserError, match="holds no .JPEG files"):
        loader("dali-cpu", "train", tmp_path / "d")
    shutil.copy(list_split(str(data_dir), "train").files[0], tmp_path / "d" / "train" / "b" / "x.JPEG")
    with pytest.raises(UserError, match="does not have"):
        loader("torchvision", "val", tmp_path / "d")


@pytest.mark.parametrize("magnitude_std", [0.0, 0.5])
def test_randaugment_runs_inside_the_dali_cpu_pipeline(one_image_data, magnitude_std):
    plain = batches(loader("dali-cpu", "train", one_image_data, color_jitter=0.0))[0][0]
    augmented = loader("dali-cpu", "train", one_image_data, color_jitter=0.0, randaugment_magnitude=9,
                       randaugment_magnitude_std=magnitude_std)
    out = batches(augmented)[0][0]
    assert out.shape == plain.shape and out.dtype == plain.dtype
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert not torch.equal(out, plain)  # the same seed and crops; RandAugment changed the pixels


def test_repeated_augmentation_shards_every_copy_once(data_dir):
    """k = 3 copies of each of 48 images, 2 shards: each of our epochs gives every rank 24 images
    (N / world, as without repetition), and 3 epochs together hold every copy exactly once."""
    from collections import Counter

    files = list_split(str(data_dir), "train").files
    k = 3
    repeated = [f for f in files for _ in range(k)]
    ids = [i for i in range(len(files)) for _ in range(k)]
    seen, lengths = Counter(), []
    for shard in (0, 1):
        def ids_pipeline():
            _, labels = _reader(repeated, ids, shard, 2, training=True)
            return labels, labels

        pipe = pipeline_def(ids_pipeline, batch_size=4, num_threads=1, device_id=None, seed=shard)()
        iterator = make_iterator(pipe, training=True, epoch_size=len(files) // 2)
        for _ in range(k):
            epoch = [int(i) for out in iterator for i in out[0]["labels"].view(-1)]
            lengths.append(len(epoch))
            seen.update(epoch)
    assert lengths == [24] * 6
    assert seen == Counter({i: k for i in range(len(files))})


def test_repeated_augmentation_loader_keeps_the_epoch_length(data_dir):
    plain = loader("dali-cpu", "train", data_dir, rank=0, world_size=2)
    repeated = loader("dali-cpu", "train", data_dir, rank=0, world_size=2, repeated_aug=3)
    assert len(plain) == len(repeated) == N_TRAIN // 2 // 8
    assert sum(len(y) for _, y in repeated) == len(repeated) * 8
