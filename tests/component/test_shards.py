"""Shards (issue 26): tools.shard, the loaders over tar members, and S3 from a real server on 127.0.0.1.

The S3 server is moto's (`moto[server]`, a test extra) in server mode with authentication on: training and
evaluation talk HTTP to it through boto3 exactly as to AWS or MinIO; wrong credentials are refused by it.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import socket
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines import build_loader
from pipelines.augmentation import Augmentation
from pipelines.errors import UserError
from pipelines.shards import list_shard_split
from tests.conftest import N_TRAIN_IMAGES, N_VAL_IMAGES, ROOT, run_cli
from tools import shard as shard_tool

PER_SHARD = 10  # 48 training images -> 5 shards, 44 validation images -> 5 shards


def _shard(src: Path, out: Path, *extra: str) -> None:
    with pytest.raises(SystemExit) as done:
        shard_tool.main([str(src), "--out", str(out), "--images-per-shard", str(PER_SHARD), "--quiet", *extra])
        raise SystemExit(0)
    assert done.value.code == 0


@pytest.fixture(scope="module")
def shards(data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "imagenet-shards"
    _shard(data_dir, out, "--verify")
    return out


def _meta(folder: Path) -> dict:
    return json.loads((folder / "dataset.json").read_text())


# ------------------------------------------------------------------------------------------ tools.shard


def test_dataset_json_counts_checksums_and_a_global_shuffle(shards, data_dir):
    meta = _meta(shards)
    assert meta["classes"] == sorted(p.name for p in (data_dir / "train").iterdir())
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    assert (train["count"], val["count"]) == (N_TRAIN_IMAGES, N_VAL_IMAGES)
    assert [s["count"] for s in train["shards"]] == [10, 10, 10, 10, 8]
    assert sum(train["class_counts"]) == N_TRAIN_IMAGES and len(set(train["class_counts"])) == 1
    for record in train["shards"] + val["shards"]:
        data = (shards / record["name"]).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (record["size"], record["sha256"])
        assert (shards / record["index"]).read_text().startswith(f"v1.2 {record['count']}\n")
    table = np.load(shards / train["members"]["name"])
    first = table[table[:, 0] == 0]
    assert len(set(first[:, 3].tolist())) > 1  # a shard is not one class
    # a member is the image's bytes, untouched: the same bytes as one of the source files
    shard_bytes = (shards / train["shards"][0]["name"]).read_bytes()
    member = shard_bytes[first[0, 1]:first[0, 1] + first[0, 2]]
    sources = {p.read_bytes() for p in (data_dir / "train").rglob("*.JPEG")}
    assert member in sources


def test_dali_webdataset_reader_reads_the_shards_and_their_labels(shards):
    from nvidia.dali import fn, pipeline_def

    train = _meta(shards)["splits"]["train"]
    tars = [str(shards / s["name"]) for s in train["shards"]]
    idx = [str(shards / s["index"]) for s in train["shards"]]

    @pipeline_def(batch_size=N_TRAIN_IMAGES, num_threads=1, device_id=None)
    def read():
        return tuple(fn.readers.webdataset(paths=tars, index_paths=idx, ext=["jpg", "cls"]))

    pipe = read()
    pipe.build()
    images, classes = pipe.run()
    table = np.load(shards / train["members"]["name"])
    assert [int(bytes(np.array(classes[i])).decode()) for i in range(len(table))] == table[:, 3].tolist()
    assert [np.array(images[i]).size for i in range(len(table))] == table[:, 2].tolist()


def test_writing_is_deterministic_and_resumes_after_an_interruption(shards, data_dir, tmp_path, monkeypatch):
    out = tmp_path / "again"
    real, written = shard_tool.write_shard, []

    def interrupted(*args):
        if len(written) == 3:
            raise KeyboardInterrupt  # Ctrl-C after three shards
        written.append(args[1])
        return real(*args)

    monkeypatch.setattr(shard_tool, "write_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _shard(data_dir, out)
    assert not (out / "dataset.json").exists() and len(glob.glob(str(out / "*.tar"))) == 3
    monkeypatch.setattr(shard_tool, "write_shard", lambda *a: (written.append(a[1]), real(*a))[1])
    _shard(data_dir, out)
    assert len(written) == 10  # 3 before the interruption, 7 after it: the finished ones were kept
    sums = lambda m: [(s["name"], s["sha256"]) for split in m["splits"].values() for s in split["shards"]]  # noqa: E731
    assert sums(_meta(out)) == sums(_meta(shards))  # byte-identical to the first run's shards


def test_bad_files_are_left_out_and_listed(data_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(data_dir, src)
    good = sorted((src / "train").rglob("*.JPEG"))[0]
    (good.parent / "cut.JPEG").write_bytes(good.read_bytes()[:300])
    (good.parent / "notes.JPEG").write_text("not an image\n")
    _shard(src, tmp_path / "out")
    train = _meta(tmp_path / "out")["splits"]["train"]
    assert train["count"] == N_TRAIN_IMAGES
    assert sorted(Path(b["path"]).name for b in train["left_out"]) == ["cut.JPEG", "notes.JPEG"]


def test_verify_finds_a_damaged_shard(shards, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    victim = copy / "train-000002.tar"
    data = bytearray(victim.read_bytes())
    data[5000] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(SystemExit) as done:
        shard_tool.main([str(copy), "--verify", "--quiet"])
    assert done.value.code == 1
    assert "train-000002.tar" in capsys.readouterr().err


def test_bad_input_is_one_line(data_dir, shards, tmp_path, capsys):
    for argv in ([str(tmp_path / "missing"), "--out", str(tmp_path / "o")],
                 [str(data_dir), "--out", str(shards)],
                 [str(data_dir), "--out", str(tmp_path / "o2"), "--shard-size", "lots"]):
        with pytest.raises(SystemExit) as done:
            shard_tool.main(argv)
        assert done.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ")
    assert not (tmp_path / "o2").exists()


# ------------------------------------------------------------------------------------------ the loaders


def _loader(kind, split, data, **kw):
    options = dict(batch_size=4, image_size=32, workers=0, dali_threads=1)
    options.update(kw)
    return build_loader(kind, split, data, **options)


@pytest.mark.parametrize("kind", ["dali-cpu", "torchvision", "torchvision-gpu"])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_equal_steps_per_rank_and_every_validation_image_once(shards, kind, world):
    steps, counted = set(), []
    for rank in range(world):
        train = _loader(kind, "train", shards, rank=rank, world_size=world)
        steps.add(len(train))
        val = _loader(kind, "val", shards, rank=rank, world_size=world)
        counted += [label for _, labels in val for label in labels.tolist()]
    assert steps == {N_TRAIN_IMAGES // world // 4}
    assert sorted(counted) == sorted(list_shard_split(str(shards), "val").labels)  # 44, each once


def _batches(loader, epoch):
    loader.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in loader]


def test_dali_mid_epoch_resume_is_bit_identical_across_progressive_resizing(shards):
    aug = Augmentation(min_res=32, max_res=64, start_ramp=0, end_ramp=2)  # 32, 32->64 ramp, 64 px
    make = lambda: _loader("dali-cpu", "train", shards, augmentation=aug, batch_size=8, seed=5)  # noqa: E731
    reference = make()
    epochs = [_batches(reference, e) for e in range(3)]
    assert [e[0][0].shape[-1] for e in epochs] == [aug.train_size(e) for e in range(3)]
    assert epochs[0][0][1].tolist() != epochs[1][0][1].tolist()  # a new global order each epoch
    first = make()
    first.set_epoch(0)
    _batches(first, 0)
    first.set_epoch(1)
    it = iter(first)
    for _ in range(2):
        next(it)
    state = first.state_dict()  # killed here, mid-epoch 1
    resumed = make()
    resumed.load_state_dict(state)
    rest = _batches(resumed, 1) + _batches(resumed, 2)
    expected = epochs[1][2:] + epochs[2]
    assert len(rest) == len(expected)
    for (x, y), (ex, ey) in zip(rest, expected):
        assert torch.equal(x, ex) and torch.equal(y, ey)


def test_torchvision_resume_continues_the_same_order(shards):
    reference = [y for _, y in _batches(_loader("torchvision", "train", shards, seed=2), 1)]
    first = _loader("torchvision", "train", shards, seed=2)
    first.set_epoch(1)
    it = iter(first)
    next(it)
    resumed = _loader("torchvision", "train", shards, seed=2)
    resumed.load_state_dict(first.state_dict())
    assert [y.tolist() for _, y in resumed] == [y.tolist() for y in reference[1:]]


def test_torchvision_gpu_reads_shards_as_torchvision_does_and_resumes_bit_for_bit(shards):
    """torchvision-gpu over tar members: validation equal to the torchvision loader's over the same shards
    (the loaders' contract, 0.005 mean abs; 1e-5 measured on folders), and a mid-epoch resume gives the
    same batches bit for bit (its augmentation is seeded by seed, rank, epoch and batch)."""
    ours = torch.cat([x.float() for x, _ in _loader("torchvision-gpu", "val", shards)])
    theirs = torch.cat([x.float() for x, _ in _loader("torchvision", "val", shards)])
    assert ours.shape == theirs.shape and (ours - theirs).abs().mean().item() < 0.005
    make = lambda: _loader("torchvision-gpu", "train", shards, seed=2)  # noqa: E731
    reference = _batches(make(), 1)
    first = make()
    first.set_epoch(1)
    it = iter(first)
    next(it)
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    rest = _batches(resumed, 1)
    assert len(rest) == len(reference) - 1
    for (x, y), (ex, ey) in zip(rest, reference[1:]):
        assert torch.equal(x, ex) and torch.equal(y, ey)


def test_shards_are_listed_by_the_one_listing_with_their_identity(shards, data_dir, tmp_path):
    from pipelines import list_data

    listing = list_data(shards, "train")
    assert listing.shards and listing.images is list_shard_split(str(shards), "train")
    assert listing.identity == {"count": N_TRAIN_IMAGES, "digest": _meta(shards)["splits"]["train"]["identity"]}
    with pytest.raises(UserError, match="--manifest lists files of class folders; with shards, shard from it"):
        _loader("torchvision", "train", shards, manifest=tmp_path)


@pytest.fixture(scope="module")
def reshuffled(data_dir, tmp_path_factory) -> Path:
    """The same images sharded in another global shuffle: another shard set, another data identity."""
    out = tmp_path_factory.mktemp("reshuffled") / "shards"
    _shard(data_dir, out, "--seed", "1")
    return out


def test_resume_on_other_shards_is_refused_by_the_run_check_alone(shards, reshuffled):
    """Other shards (the same images in another order) are another training list: the run's one data check
    (rn50.reliability.lifecycle.check_data, on the identity pipelines.list_data gives) refuses the resume in one
    line naming --allow-change data, or with it restarts the epoch. The loaders' states hold no identity and no
    second check of their own."""
    from rn50.core.loaders import data_identity
    from rn50.reliability.lifecycle import check_data

    saved, now = data_identity(shards, None, "dali-cpu"), data_identity(reshuffled, None, "torchvision")
    assert saved["count"] == now["count"] == N_TRAIN_IMAGES and saved["digest"] != now["digest"]
    assert saved == data_identity(shards, None, "torchvision")  # the data's identity, whatever reads it
    with pytest.raises(UserError) as refused:
        check_data({"data": saved}, now, None)
    message = str(refused.value)
    assert "\n" not in message and "--allow-change data" in message and saved["digest"] in message
    same, notes = check_data({"data": saved}, now, "data")
    assert not same and "the interrupted epoch restarts" in notes[0]
    for kind in ("dali-cpu", "torchvision"):
        state = _loader(kind, "train", shards).state_dict()
        assert "data" not in state
        _loader(kind, "train", reshuffled).load_state_dict(state)  # the run decides, not the loader


@pytest.mark.slow
def test_a_resume_on_other_shards_stops_in_one_line_naming_allow_change_data(shards, reshuffled, tmp_path):
    run = tmp_path / "run"
    args = [sys.executable, "-m", "rn50.train", "--loader", "dali-cpu", *TRAIN]
    done = run_cli([*args, "--data", str(shards), "--out", str(run)])
    assert done.returncode == 0, done.stderr[-2000:]
    refused = run_cli([*args, "--data", str(reshuffled), "--out", str(tmp_path / "again"),
                       "--resume", str(run / "checkpoint_0001.pt")])
    err = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(err) == 1, refused.stderr[-2000:]
    assert "another list of training files" in err[0] and "--allow-change data" in err[0]


# ------------------------------------------------------------------------------------------ S3, for real

SECRET = "s3cr3t-D0-N0T-LOG-7f3a9c"  # what the server knows as the key's secret is replaced by its own below


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(shards):
    """moto's S3 server on 127.0.0.1 with authentication on: an IAM user and key made through its API, a
    bucket holding the shards; stopped after the module."""
    os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = "3"  # create_user, create_access_key, put_user_policy
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup",
                       aws_secret_access_key="setup")
    iam.create_user(UserName="trainer")
    key = iam.create_access_key(UserName="trainer")["AccessKey"]
    iam.put_user_policy(UserName="trainer", PolicyName="all", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
           "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"], "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=key["AccessKeyId"],
                          aws_secret_access_key=key["SecretAccessKey"])
    client.create_bucket(Bucket="imagenet")
    for path in shards.iterdir():
        client.upload_file(str(path), "imagenet", f"shards/{path.name}")
    yield {"env": env, "port": port, "url": "s3://imagenet/shards", "secret": key["SecretAccessKey"]}
    server.stop()


TRAIN = ["--arch", "resnet18", "--image-size", "32", "--batch-size", "8", "--epochs", "1", "--dali-threads", "1",
         "--workers", "1"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dali-cpu", "torchvision"])
def test_train_and_evaluate_from_the_s3_server_and_no_secret_in_the_run(s3, kind, tmp_path):
    run = tmp_path / "run"
    done = run_cli([sys.executable, "-m", "rn50.train", "--data", s3["url"], "--out", str(run), "--loader", kind, *TRAIN], **s3["env"])
    assert done.returncode == 0, done.stderr[-2000:]
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["val/count"] == N_VAL_IMAGES
    assert json.loads((run / "summary.json").read_text())["data"] == s3["url"]
    evaluated = run_cli([sys.executable, "-m", "rn50.evaluate", "--data", s3["url"], "--weights", str(run / "checkpoint_0001.pt"),
                         "--out", str(run / "eval"), "--loader", kind, "--dali-threads", "1", "--workers", "1"],
                        **s3["env"])
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    for path in run.rglob("*"):
        if path.is_file():
            assert s3["secret"].encode() not in path.read_bytes(), path
    assert s3["secret"] not in done.stdout + done.stderr + evaluated.stdout + evaluated.stderr


@pytest.mark.slow
def test_s3_start_up_errors_are_one_line(s3, tmp_path):
    cases = {
        "does not exist": ({}, "s3://no-such-bucket/shards"),
        "refused the credentials": ({"AWS_SECRET_ACCESS_KEY": "wrong-" + SECRET}, s3["url"]),
        "cannot reach": ({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{_free_port()}"}, s3["url"]),
    }
    for n, (expected, (env, url)) in enumerate(cases.items()):
        out = tmp_path / f"run{n}"
        done = run_cli([sys.executable, "-m", "rn50.train", "--data", url, "--out", str(out), "--loader", "torchvision", *TRAIN],
                       timeout=120, **{**s3["env"], **env})
        errors = [line for line in done.stderr.splitlines() if line.strip()]
        assert done.returncode == 2 and len(errors) == 1 and expected in errors[0], done.stderr[-1500:]
        assert SECRET not in done.stderr and s3["secret"] not in done.stderr
        assert not out.exists() or not any(out.iterdir())


class CuttableProxy:
    """A TCP proxy on 127.0.0.1 in front of the S3 server that cuts every connection, and refuses new ones,
    after a given number of ranged GETs (a network that drops mid-epoch, at a point that does not depend on
    timing); `restore()` lets traffic through again."""

    def __init__(self, target: int, cut_after: int):
        self.target, self.cut_after, self.ranges, self.cut = target, cut_after, 0, False
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.sockets, self.lock = [], threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if self.cut:
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target))
            with self.lock:
                self.sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src, dst, requests):
        try:
            while data := src.recv(65536):
                if requests:
                    with self.lock:
                        self.ranges += data.count(b"Range: bytes=")
                        if self.ranges > self.cut_after and not self.cut:
                            self.cut = True
                            for s in self.sockets:
                                try:
                                    s.shutdown(socket.SHUT_RDWR)
                                except OSError:
                                    pass
                    if self.cut:
                        return
                dst.sendall(data)
        except OSError:
            pass

    def restore(self):
        self.cut, self.cut_after = False, 10**9

    def close(self):
        self.server.close()


def _weights(run: Path) -> dict:
    return torch.load(run / "checkpoint_0001.pt", map_location="cpu", weights_only=True)["model"]


@pytest.mark.slow
def test_a_dropped_connection_stops_with_a_checkpoint_and_resumes_exactly(s3, shards, tmp_path):
    args = ["--loader", "dali-cpu", *TRAIN, "--batch-size", "4", "--seed", "3"]
    reference = tmp_path / "reference"
    assert run_cli([sys.executable, "-m", "rn50.train", "--data", str(shards), "--out", str(reference), *args]).returncode == 0
    proxy = CuttableProxy(s3["port"], cut_after=N_TRAIN_IMAGES // 2)  # about half an epoch of images
    env = {**s3["env"], "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}", "RN50_S3_ATTEMPTS": "2"}
    run = tmp_path / "run"
    try:
        stopped = run_cli([sys.executable, "-m", "rn50.train", "--data", s3["url"], "--out", str(run), *args], **env)
        assert stopped.returncode == 75, stopped.stderr[-2000:]
        assert "failed 2 times" in stopped.stderr and "checkpoint saved" in stopped.stderr
        saved = sorted(run.glob("checkpoint_0000_step*.pt"))
        assert len(saved) == 1  # mid-epoch, at the last step trained
        proxy.restore()
        resumed = run_cli([sys.executable, "-m", "rn50.train", "--data", s3["url"], "--out", str(run), *args, "--resume", "auto"],
                          **env)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
    finally:
        proxy.close()
    a, b = _weights(reference), _weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)  # local shards and S3 with a drop: the same training


@pytest.mark.slow
def test_two_ranks_from_shards_count_validation_once(shards, tmp_path):
    from tests.conftest import torchrun

    run = tmp_path / "ddp"
    done = run_cli(torchrun(2, "-m", "rn50.train", "--data", str(shards), "--out", str(run), "--loader", "dali-cpu",
                            *TRAIN))
    assert done.returncode == 0, done.stderr[-2000:]
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["val/count"] == N_VAL_IMAGES
    assert ROOT.exists()


# ------------------------------------------------------------------------------------------ harness read mode


def test_read_mode_reads_the_same_bytes_from_folders_and_shards_and_judges_the_storage(data_dir, shards):
    from benchmarks import read

    folders, tars = read.measure(data_dir, images=10**6, threads=2), read.measure(shards, images=10**6, threads=2)
    assert (folders["kind"], tars["kind"]) == ("folders", "shards")
    assert folders["images"] == tars["images"] == N_TRAIN_IMAGES
    assert folders["bytes"] == tars["bytes"] == sum(p.stat().st_size for p in (data_dir / "train").rglob("*.JPEG"))
    rows = [{"mode": "synthetic", "loader": "synthetic", "img_per_s": 1000.0},
            {"mode": "loader", "loader": "a", "img_per_s": 400.0}, {"mode": "train", "loader": "a", "img_per_s": 390.0},
            {"mode": "loader", "loader": "b", "img_per_s": 2000.0}, {"mode": "train", "loader": "b", "img_per_s": 980.0}]
    assert {k: v["verdict"] for k, v in read.verdict(500.0, rows).items()} == {"a": "storage-bound", "b": "compute-bound"}
    assert read.verdict(5000.0, rows)["a"]["verdict"] == "decode-bound"


def test_report_md_shows_the_read_block_with_each_source_and_verdict():
    from benchmarks.report import storage_section

    block = {"sources": [{"source": "/data/folders", "kind": "folders", "images": 48, "img_per_s": 1000.0,
                          "bytes_per_s": 100 * 2**20},
                         {"source": "/data/shards", "kind": "shards", "images": 48, "img_per_s": 1500.0,
                          "bytes_per_s": 150 * 2**20}],
             "ratio": 1.5, "verdicts": {"dali-cpu": {"verdict": "storage-bound", "read_img_per_s": 1000.0,
                                                     "loader_img_per_s": 900.0, "train_img_per_s": None}}}
    text = "\n".join(storage_section(block))
    assert "| /data/folders | folders | 48 | 1,000.0 | 100.0 |" in text
    assert "| /data/shards | shards | 48 | 1,500.0 | 150.0 |" in text
    assert "shards reads at 1.50x the rate of folders" in text
    assert "| dali-cpu | storage-bound | 1,000.0 | 900.0 | n/a |" in text
    assert storage_section(None) == []  # no read mode: no section
