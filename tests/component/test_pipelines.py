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
        for kind in ("dali-cpu", "torchvision", "torchvision-gpu", "synthetic"):
            images, labels = next(iter(loader(kind, split, data_dir, dtype=torch.float16)))
            assert images.is_contiguous(memory_format=torch.channels_last), kind
            shapes.add((tuple(images.shape), images.dtype, labels.dtype, images.stride()))
        assert len(shapes) == 1, shapes


def test_dali_validation_is_pixel_equivalent_to_torchvision(data_dir):
    # Resize(int(S / 0.875)) + CenterCrop(S), computed as torchvision computes them
    # (docs/design.md#validation-transform-dali-vs-torchvision)
    dali = torch.cat([x for x, _ in loader("dali-cpu", "val", data_dir)])
    tv = torch.cat([x for x, _ in loader("torchvision", "val", data_dir)])
    assert dali.shape == tv.shape == (N_VAL, 3, 32, 32)
    per_image = (dali - tv).abs().mean(dim=(1, 2, 3))
    assert per_image.max() < 0.01, per_image.max()


@pytest.mark.parametrize("fused", [True, False])
def test_training_augmentation_differs_between_epochs_and_images(one_image_data, fused):
    # Colour jitter off, so only the random crop and flip can make the copies differ (jitter has its own
    # test below): a crop stream repeated every epoch, or shared by the images of a batch, fails here.
    out = loader("dali-cpu", "train", one_image_data, fused_decode=fused, color_jitter=0.0)
    epoch0, epoch1 = batches(out), batches(out)
    assert len(epoch0) == len(epoch1) == 1
    a, b = epoch0[0][0].float(), epoch1[0][0].float()
    # Mean absolute difference in normalised units (pixel std = 1). Measured on this data with seed 0: the
    # same image in two epochs 0.33-0.44; two images of one batch 0.26 and up (median 0.42); a crop shifted
    # by one pixel 0.20-0.32 (the generated images are detailed). Decoder rounding is below 0.01 (the
    # validation pixel-equivalence test), float noise far below that. 0.1: well above noise, below a real crop.
    across_epochs = (a - b).abs().mean(dim=(1, 2, 3))
    assert across_epochs.min() > 0.1, across_epochs  # every image, not just one, is re-augmented
    within_batch = torch.stack([(a[i] - a[j]).abs().mean() for i in range(8) for j in range(i + 1, 8)])
    assert within_batch.min() > 0.1, within_batch  # the same source image, augmented 8 ways in one batch


def test_validation_is_deterministic(one_image_data):
    out = loader("dali-cpu", "val", one_image_data)
    (a, _), (b, _) = batches(out)[0], batches(out)[0]
    assert torch.equal(a, b) and torch.equal(a[0], a[7])


@pytest.fixture()
def flat_colour_data(tmp_path):
    """Eight copies of a JPEG of one flat colour: every crop, resize and flip of it is the same flat image,
    so the per-image colour can change only through colour jitter."""
    from PIL import Image

    for split in ("train", "val"):
        (tmp_path / split / "c0").mkdir(parents=True)
        for i in range(8):
            Image.new("RGB", (64, 48), (150, 90, 60)).save(tmp_path / split / "c0" / f"{i}.JPEG", quality=95)
    return tmp_path


def colour_spread(kind, data, color_jitter):
    """Per-channel standard deviation, over 16 outputs (2 epochs x 8 images), of each image's mean colour;
    and the largest spatial standard deviation within one image."""
    out = loader(kind, "train", data, color_jitter=color_jitter)
    images = torch.cat([x.float() for x, _ in batches(out) + batches(out)])
    return images.mean(dim=(2, 3)).std(dim=0), images.std(dim=(2, 3)).max()


@pytest.mark.parametrize("kind", ["dali-cpu", "torchvision", "torchvision-gpu"])
def test_colour_jitter_switch(flat_colour_data, kind):
    on, _ = colour_spread(kind, flat_colour_data, 0.4)
    weak, _ = colour_spread(kind, flat_colour_data, 0.1)
    off, flatness = colour_spread(kind, flat_colour_data, 0.0)
    assert flatness < 1e-3  # the fixture works: the outputs are flat, whatever the crop
    # Measured (normalised units, R/G/B), dali-cpu: off 0 exactly; 0.1 -> 0.15/0.08/0.08; 0.4 -> 0.56/0.32/0.33;
    # torchvision: off 0 exactly; 0.1 -> 0.14/0.09/0.09; 0.4 -> 0.58/0.37/0.36.
    # Jitter ignored when on: `on` is 0. Jitter applied when off (e.g. a default strength): `off` is as
    # large as `on`. The strength ignored (a fixed range): `weak` equals `on` instead of about a quarter.
    assert (off < 1e-4).all(), off
    assert (on > 0.15).all(), on
    assert (weak > 0.02).all() and (weak < 0.5 * on).all(), (weak, on)


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


@pytest.mark.parametrize("kind", ["dali-cpu", "torchvision", "torchvision-gpu", "synthetic"])
def test_training_steps_equal_on_every_rank(data_dir, kind):
    lengths = [len(loader(kind, "train", data_dir, rank=r, world_size=3, batch_size=5)) for r in range(3)]
    assert lengths == [N_TRAIN // 3 // 5] * 3  # 16 images per rank -> 3 full batches


@pytest.mark.parametrize("kind", ["dali-cpu", "torchvision", "torchvision-gpu"])
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


def test_bad_input_is_one_clear_error(data_dir, tmp_path, monkeypatch):
    with pytest.raises(UserError, match="does not exist"):
        loader("dali-cpu", "train", tmp_path / "missing")
    with pytest.raises(UserError, match="larger than this rank's share"):
        loader("dali-cpu", "train", data_dir, batch_size=N_TRAIN + 1)
    # the GPU loader on a CPU device: refused on any machine, CUDA or not
    with pytest.raises(UserError, match="CUDA.*--loader dali-cpu"):
        loader("dali", "train", data_dir)
    # the GPU loader asked for a CUDA device where CUDA is missing: CUDA's absence is simulated, so this
    # runs on GPU machines too (the check happens before anything touches the device)
    with monkeypatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: False)
        with pytest.raises(UserError, match="CUDA.*--loader dali-cpu"):
            loader("dali", "train", data_dir, device="cuda:0")
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


def test_preflight_error_counts_bad_files_of_every_split(data_dir, tmp_path):
    """Issue 14 item 8: 2 bad files in train and 1 in val are "and 2 more", whichever loader stops first."""
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    (data / "train" / "n00000000" / "empty.JPEG").write_bytes(b"")
    (data / "train" / "n00000001" / "page.JPEG").write_text("<html>404 Not Found</html>\n")
    (data / "val" / "n00000002" / "empty.JPEG").write_bytes(b"")
    for split in ("train", "val"):
        with pytest.raises(UserError) as stopped:
            loader("dali-cpu", split, data)
        message = str(stopped.value)
        assert "\n" not in message
        assert "cannot be trained on" in message and "and 2 more (3 bad files: 2 in train, 1 in val)" in message
        assert f"python -m tools.scan {data} --out SCAN" in message and "--manifest SCAN" in message


def test_the_pre_flight_takes_each_kinds_decodes_by_content_from_build_loader(data_dir, tmp_path, capsys):
    """build_loader hands the pre-flight the kind's own record (pipelines.folder reads no registry): a PNG and a
    CMYK JPEG behind .JPEG names stop torchvision-gpu, a GPU decoder (on the CPU too, as on CUDA); dali-cpu and
    torchvision decode them by content: one line on stderr, and the loader is built."""
    from conftest import with_odd_files
    from pipelines.folder import check_files

    data = with_odd_files(data_dir, tmp_path)
    with pytest.raises(UserError, match="cannot be trained on .* and 1 more"):
        loader("torchvision-gpu", "train", data)
    for kind in ("dali-cpu", "torchvision"):
        check_files.cache_clear()  # once per process and list otherwise: its note would be printed once
        assert len(loader(kind, "train", data)) > 0
        assert "2 files decode by content: 1 CMYK JPEG, 1 PNG behind a .JPEG name" in capsys.readouterr().err, kind


def test_one_listing_for_the_loaders_and_the_checkpoints(data_dir):
    """pipelines.list_data is the listing build_loader reads and the identity checkpoints record: the same
    count and digest as ever (ImageList.identity), so an older checkpoint still matches."""
    from pipelines import list_data
    from rn50.core.loaders import data_identity

    files = list_split(str(data_dir), "train")
    listing = list_data(data_dir, "train")
    assert listing.images == files and not listing.shards and len(listing) == N_TRAIN
    assert listing.identity == {"count": N_TRAIN, "digest": files.identity}
    assert data_identity(data_dir, None, "dali-cpu") == data_identity(data_dir, None, "auto") == listing.identity
    assert data_identity(data_dir, None, "synthetic") is None and data_identity(None, None, "dali-cpu") is None
    assert list_data(None, "train") is None
    assert loader("torchvision", "train", data_dir).num_samples == len(files)


def test_randaugment_silences_only_dalis_own_deprecation_warnings(one_image_data, monkeypatch):
    """Issue 14 item 10: DALI's auto_aug calls its own deprecated fn.experimental.filter/equalize (about 70
    lines of warnings); those are dropped, any other DeprecationWarning, even one raised while the
    RandAugment graph is built, still comes through."""
    import warnings

    import pipelines.dali

    dali_rand_augment = pipelines.dali.rand_augment.rand_augment

    def noisy_rand_augment(*args, **kwargs):  # a warning of someone else's, raised where DALI's are
        warnings.warn("some_other_api is deprecated", DeprecationWarning)
        return dali_rand_augment(*args, **kwargs)

    monkeypatch.setattr(pipelines.dali.rand_augment, "rand_augment", noisy_rand_augment)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        augmented = loader("dali-cpu", "train", one_image_data, randaugment_magnitude=9,
                           randaugment_magnitude_std=0.5)
        next(iter(augmented))
        warnings.warn("unrelated test deprecation", DeprecationWarning)
    messages = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    assert not [m for m in messages if "nvidia.dali.fn.experimental" in m], messages
    assert "unrelated test deprecation" in messages
    assert messages.count("some_other_api is deprecated") == 5  # one per RandAugment branch (m-2..m+2)


def test_a_forked_child_never_frees_a_dali_pipeline_left_as_garbage(data_dir):
    """A forked child (a torchvision DataLoader worker, a harness row after a DALI one) that frees a DALI
    pipeline hangs in its destructor, waiting for DALI threads the child does not have (seen: the suite hung
    at a torchvision loader test). pipelines.dali collects in the parent before every fork, so the child
    finds nothing to free. Without that hook this child hangs (checked by hand)."""
    import gc
    import os
    import time

    loader = build_loader("dali-cpu", "val", data_dir, batch_size=4, image_size=32)
    next(iter(loader))  # its pipeline built, its threads running
    loader.cycle = loader  # cyclic garbage once the name goes, as a traceback's frames would leave it
    del loader
    gc.disable()  # nothing but the fork hook may collect it in the parent
    try:
        pid = os.fork()
        if pid == 0:  # the child: free whatever garbage came with the fork, then leave
            gc.collect()
            os._exit(0)
    finally:
        gc.enable()
    deadline = time.monotonic() + 120  # the child needs well under a second; a hang never ends
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    if done[0] == 0:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung freeing a DALI pipeline left as garbage in its parent")
    assert os.waitstatus_to_exitcode(done[1]) == 0
