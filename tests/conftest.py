"""Shared fixtures: one small generated dataset per session, real DALI CPU operators, no network; the tiers (each
folder marks its tests) and the shared tiny runs (docs/testing.md). Imports torch, pytest and the standard library
alone at the top, so tests/gpu imports with torch, torchvision, numpy, pillow, pytest and DALI."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# 4 classes; 48 training images; 44 validation images: not divisible by 2 ranks x batch 8
CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 4, 12, 11
N_TRAIN_IMAGES, N_VAL_IMAGES = CLASSES * TRAIN_PER_CLASS, CLASSES * VAL_PER_CLASS


TIERS = ("unit", "component", "e2e")  # tests/<tier>/: the folder is the tier (setup.cfg's markers say what each is)


@pytest.hookimpl(trylast=True)  # after pytest's tmpdir plugin has made its TempPathFactory
def pytest_configure(config):
    """What the tools under test write beside their outputs goes into this session's pytest folder, not into /tmp
    or ~ (issue 32): TMPDIR for this process and every command it starts (torchrun's torchelastic_* folders,
    multiprocessing's pymp-*, MLflow's and W&B's temporary files), matplotlib's and W&B's config and cache
    folders. One exception: inductor's compile cache stays where torch keeps it by default
    (/tmp/torchinductor_<user>, 150 MB of it precompiled headers), so a session's --compile tests compile in
    seconds from the previous one's."""
    import getpass
    import tempfile

    # torch._inductor.runtime.cache_dir_utils.default_cache_dir() (importing it costs 1.5 s), before TMPDIR moves;
    # a pytest-xdist worker inherits the variable from the controller, whose TMPDIR has moved already
    default = Path(tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}")
    inductor = Path(os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(default)))
    base = config._tmp_path_factory.getbasetemp()  # the session's folder (setup.cfg: retention)
    for variable, name in (("TMPDIR", "tmp"), ("MPLCONFIGDIR", "matplotlib"), ("WANDB_CACHE_DIR", "wandb-cache"),
                           ("WANDB_CONFIG_DIR", "wandb-config"), ("WANDB_DATA_DIR", "wandb-data")):
        folder = base / name
        folder.mkdir(exist_ok=True)
        os.environ[variable] = str(folder)
    tempfile.tempdir = None  # gettempdir() reads TMPDIR again
    # parts of inductor ignore TORCHINDUCTOR_CACHE_DIR and build the path from TMPDIR (its precompiled headers):
    # a link to the same cache (deleting the session's folder deletes the link, not what it points to)
    inductor.mkdir(exist_ok=True)
    (base / "tmp" / inductor.name).symlink_to(inductor, target_is_directory=True)


# The shared runs (session fixtures below: about 0.2 GB of checkpoints each) are read by the test files that
# name them, as a fixture argument or through request.getfixturevalue
SHARED_RUN_NAMES = re.compile(r"\bshared_(ddp_)?run\b")
# this process's: how many tests of those files are still to run, and the shared runs' folders
_shared_runs = {"left": 0, "folders": []}


@functools.lru_cache(maxsize=None)
def reads_shared_runs(test_file: str) -> bool:
    """`test_file`: relative to the repository (a node id's file part) or absolute."""
    return SHARED_RUN_NAMES.search((ROOT / test_file).read_text()) is not None


@pytest.hookimpl(optionalhook=True, tryfirst=True)  # a pytest-xdist hook; before its own scheduler's
def pytest_xdist_make_scheduler(config, log):
    """`make test`'s `-n 2 --dist loadfile`: a worker takes whole files, so a module fixture is built once,
    and the files that read the shared runs count as one, so the runs train once per session, not once per
    worker (twice the time, and 1.1 GB at the peak). pytest-xdist's own loadgroup cannot say so with
    pytest 9.2: it renames the tests' node ids through an attribute pytest no longer reads."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class SharedRunsTogether(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            test_file = super()._split_scope(nodeid)
            return "the shared runs' readers" if reads_shared_runs(test_file) else test_file

    return SharedRunsTogether(config, log)


def pytest_collection_modifyitems(config, items):
    for item in items:
        folder = Path(str(item.fspath)).parent.name
        if folder in TIERS:
            item.add_marker(getattr(pytest.mark, folder))
        elif folder == "gpu":  # tests/gpu/: needs CUDA, whatever its own marks say
            item.add_marker(pytest.mark.gpu)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_collection_finish(session):
    _shared_runs["left"] = sum(reads_shared_runs(str(item.path)) for item in session.items)  # after -k and -m


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    """The shared runs' folders deleted once the last test of the files that read them is done, unless a test
    failed: a session fixture's folder otherwise stays until the session ends, and these two were most of the
    suite's temporary-folder peak (docs/testing.md). Under pytest-xdist those files are one scope of the
    scheduler above, so the worker that trained the runs is the one that runs every reader."""
    if not reads_shared_runs(str(item.path)):
        return
    _shared_runs["left"] -= 1
    if _shared_runs["left"] == 0 and item.session.testsfailed == 0:
        import shutil

        for folder in _shared_runs["folders"]:
            shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    from tools.make_dataset import make_dataset  # here, not at the top: tests/gpu imports need torch, not tqdm

    out = tmp_path_factory.mktemp("data") / "imagenet-like"
    make_dataset(out, CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS, seed=7, min_side=48, max_side=64)
    return out


@pytest.fixture()
def one_image_data(data_dir, tmp_path):
    """Eight copies of one JPEG in one class (train and val): whatever differs between outputs is augmentation."""
    import shutil

    from pipelines.folder import list_split

    source = list_split(str(data_dir), "train").files[0]
    for split in ("train", "val"):
        (tmp_path / split / "c0").mkdir(parents=True)
        for i in range(8):
            shutil.copy(source, tmp_path / split / "c0" / f"{i}.JPEG")
    return tmp_path


@pytest.fixture
def uninitialised_memory_is_nan():
    """torch.empty and empty_like return NaN-filled memory (deterministic mode fills what they allocate), so a
    value read from memory that nothing wrote shows as NaN on every machine, not only where the allocator
    happens to hand back old bytes (freshly mapped pages are zeros, which would hide the read)."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    assert torch.utils.deterministic.fill_uninitialized_memory
    yield
    torch.use_deterministic_algorithms(was)


def fixture_folders(request, tmp_path_factory, *names: str) -> tuple[Path, ...]:
    """Folders for a module-scoped fixture (tmp_path_factory.mktemp(name) each), deleted at its teardown unless
    a test failed meanwhile: what tmp_path_retention_policy = failed (setup.cfg) does for tmp_path, where a
    session's folders would otherwise stay until the session ends (issue 32)."""
    import shutil

    folders = tuple(tmp_path_factory.mktemp(name) for name in names)
    failed = request.session.testsfailed

    def remove():
        if request.session.testsfailed == failed:
            for folder in folders:
                shutil.rmtree(folder, ignore_errors=True)

    request.addfinalizer(remove)
    return folders


def with_odd_files(data_dir: Path, tmp_path: Path) -> Path:
    """A copy of the generated data with two files raw ImageNet holds in train/: a PNG and a CMYK JPEG, each
    behind a .JPEG name (issue 17)."""
    import shutil

    from PIL import Image

    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    c = data / "train" / "n00000001"
    Image.new("RGB", (320, 300), (9, 99, 199)).save(c / "png_inside.JPEG", format="PNG")
    Image.new("CMYK", (320, 300), (9, 99, 199, 0)).save(c / "cmyk.JPEG", format="JPEG")
    return data


def run_cli(args: list[str], timeout: float = 300, **env) -> subprocess.CompletedProcess:
    """Run a command of ours (`-m module ...` or torchrun) from the project root, one thread per process
    so that two processes share two cores without oversubscription."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **env}
    return subprocess.run(args, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def run_clis(commands: list[list[str]], timeout: float = 300, **env) -> list[subprocess.CompletedProcess]:
    """run_cli for independent commands, all at once (issue 32): most of a short command's time is its start-up
    (importing torch and DALI, a few seconds of one core), so several side by side take the time of the slowest
    on two cores rather than the sum. The results in the order of the commands."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=len(commands)) as pool:
        return list(pool.map(lambda args: run_cli(args, timeout, **env), commands))


# --- the shared tiny run ---------------------------------------------------------------------------------
# One real `python -m rn50.train` per session that many e2e assertions read instead of each starting its own
# (issue 25): resnet18 at 32 px on the generated data, 2 epochs of 6 steps, a checkpoint every 2 steps (two
# mid-epoch ones in each epoch), the last 4 kept, started with `--resume auto` on an empty folder. It is read-only:
# a test that writes into a run folder copies it first (shared_run.copy_to).
# A ResNet-18 checkpoint is about 90 MB (weights and momentum) and a session folder lives until the session ends
# (issue 32): once the run is done, the names of the checkpoints it kept are recorded (SharedRun.checkpoints) and
# its mid-epoch checkpoints, which no test reads, are deleted; the epoch-end ones and the best stay.
SHARED_RUN_FLAGS = ["--epochs", "2", "--checkpoint-every", "2", "--keep-checkpoints", "4", "--loader", "dali-cpu",
                    "--arch", "resnet18", "--image-size", "32", "--batch-size", "8", "--dali-threads", "1",
                    "--warmup-epochs", "1", "--lr-milestones", "2", "--seed", "3", "--log-every", "1"]


@dataclass(frozen=True)
class SharedRun:
    dir: Path  # the run folder (--out)
    args: list[str]  # its command without --out and --resume: run it again with other flags, same recipe
    done: subprocess.CompletedProcess  # its exit code, stdout and stderr
    checkpoints: tuple[str, ...] = ()  # checkpoint_*.pt as the run left them (sorted; mid-epoch ones and the best)

    def copy_to(self, dest: Path) -> Path:
        """A copy to write into. The checkpoints are hard links (no space, no time): rn50.train never writes into
        a checkpoint file, it replaces or deletes it (a new file renamed over the name, an unlink), which leaves
        the shared run's file as it was; a test must not write into one in place either. The rest is copied."""
        import os
        import shutil

        def link_checkpoints(src, dst):
            if src.endswith(".pt"):
                os.link(src, dst)
            else:
                shutil.copy2(src, dst)

        shutil.copytree(self.dir, dest, copy_function=link_checkpoints)
        return dest


def finished_shared_run(out: Path, args: list[str], done: subprocess.CompletedProcess) -> SharedRun:
    """The finished run as SharedRun: the names of its checkpoints recorded, then its mid-epoch checkpoints
    (and their .sha256 sidecars) deleted; every name stays in `checkpoints`."""
    from rn50.reliability.checkpoint import regular_checkpoints  # here: tests/gpu imports without rn50's deps

    names = tuple(sorted(p.name for p in out.glob("checkpoint_*.pt")))
    for path in regular_checkpoints(out):
        if "_step" in path.name:
            path.unlink()
            path.with_suffix(".sha256").unlink(missing_ok=True)
    return SharedRun(out, args, done, names)


@pytest.fixture(scope="session")
def shared_run(data_dir, tmp_path_factory) -> SharedRun:
    args = [sys.executable, "-m", "rn50.train", "--data", str(data_dir), *SHARED_RUN_FLAGS]
    out = tmp_path_factory.mktemp("shared-run") / "run"
    _shared_runs["folders"].append(out.parent)
    done = run_cli([*args, "--out", str(out), "--resume", "auto"], timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return finished_shared_run(out, args, done)


@pytest.fixture(scope="session")
def shared_ddp_run(data_dir, tmp_path_factory) -> SharedRun:
    """The same flags on two ranks through torchrun (real gloo DDP), base LR 0.4 (peak 0.4 x 16 / 256): 3 steps
    per epoch, so checkpoints at steps 2, 3 (epoch 1's end), 4 and 6 (epoch 2's end)."""
    args = torchrun(2, "-m", "rn50.train", "--data", str(data_dir), *SHARED_RUN_FLAGS, "--base-lr", "0.4")
    out = tmp_path_factory.mktemp("shared-ddp-run") / "run"
    _shared_runs["folders"].append(out.parent)
    done = run_cli([*args, "--out", str(out)], timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return finished_shared_run(out, args, done)


def torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *args]


def gpu_ddp_processes(gpus: int) -> int:
    """Processes for the NCCL test: two when there are two GPUs (NCCL across ranks; one process per GPU),
    never more, so its 48 training images keep a batch of 8 on every rank whatever the GPU count."""
    return max(1, min(gpus, 2))


class SleepyLoader:
    """Yields a batch after sleeping `delay` seconds: an input pipeline of known cost (the harness's stall
    tests, on the CPU and on the GPU timeline)."""

    def __init__(self, delay, batch=4, steps=50):
        self.delay, self.batch, self.steps = delay, batch, steps

    def set_epoch(self, epoch):
        pass

    def __iter__(self):
        for _ in range(self.steps):
            time.sleep(self.delay)
            yield torch.zeros(self.batch, 3, 2, 2), torch.zeros(self.batch, dtype=torch.long)
