"""The harness's thread budget (issue 37, item 1): every row runs the training step on the same threads, and no
loader changes how the step runs.

The bug: the torchvision-gpu loader's batch thread ran its torch ops on an OpenMP team of its own (as many
threads as the training step's), one libgomp thread more than the cores, which switched libgomp's spin-wait
throttle on for the whole process; beside busy cores the training step then ran 5 to 18 times faster than on
synthetic data (docs/benchmarks.md, "The thread budget"). What is pinned here is what the code controls,
deterministically: the torch threads each thread runs on, the threads the process holds, and the step's
inputs and switches. No wall-clock rate."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from benchmarks.plan import bench_config, recipe_defaults
from benchmarks.threads import ThreadBudget, apply_model_threads, check_model_threads, thread_budget, this_machine
from rn50.config.machine import Machine
from rn50.config.recipe import with_fields
from rn50.core.loaders import build_split
from rn50.core.step import build_training, train_step
from rn50.system.dist import DistEnv

ROOT = Path(__file__).resolve().parents[2]
PIPELINES = str(ROOT / "pipelines")
CPU = DistEnv(0, 1, 0, torch.device("cpu"))
CPU_LOADERS = ("synthetic", "dali-cpu", "torchvision", "torchvision-gpu")


@pytest.fixture
def main_threads():
    """The test changes this thread's torch threads (and torch's default for threads yet to start): put back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# --- the policy: a pure function ----------------------------------------------------------------------------

@pytest.mark.parametrize("cores, model, loader", [(1, 1, 1), (2, 1, 1), (3, 1, 2), (4, 2, 2), (16, 8, 8)])
def test_a_cpu_machines_cores_are_split_between_the_model_step_and_the_loader(cores, model, loader):
    budget = thread_budget(cores, "cpu")
    assert (budget.cores, budget.model_threads, budget.loader_threads) == (cores, model, loader)
    assert budget.to_dict() == {"cores": cores, "model": model, "loader": loader, "why": budget.why}
    assert budget.why.startswith("CPU:") and ("oversubscribe" in budget.why or cores == 1)


def test_the_budget_never_oversubscribes_the_cores_it_splits():
    for cores in range(2, 129):
        for ranks in (1, 2, 4, 8):
            budget = thread_budget(cores, "cpu", ranks)
            assert budget.cores == max(1, cores // ranks)
            assert budget.model_threads >= 1 and budget.loader_threads >= 1
            if budget.cores >= 2:
                assert budget.model_threads + budget.loader_threads == budget.cores


def test_on_a_gpu_the_model_step_gets_one_thread_and_the_loader_the_rest():
    assert (thread_budget(32, "cuda").model_threads, thread_budget(32, "cuda").loader_threads) == (1, 31)
    eight = thread_budget(64, "cuda", local_ranks=8)  # 8 GPUs, one process each
    assert (eight.cores, eight.model_threads, eight.loader_threads) == (8, 1, 7)
    assert "8 ranks" in eight.why and eight.why.startswith("GPU:")
    assert (thread_budget(1, "cuda").model_threads, thread_budget(1, "cuda").loader_threads) == (1, 1)


def test_the_harness_gives_every_cpu_loader_the_budgets_loader_threads():
    """The CPU defaults gave every loader all the cores, on top of the model step's all the cores."""
    sixteen = thread_budget(16, "cpu")
    assert recipe_defaults(False, sixteen) == {"batch_size": 32, "dali_threads": 8, "workers": 8}
    assert recipe_defaults(True, thread_budget(16, "cuda")) == {}  # the loaders' own settings on a GPU
    from benchmarks.run import parse_args

    config = bench_config(parse_args(["--data", "d", "--out", "o"]), "cpu")
    assert config.threads == this_machine("cpu")
    assert config.machine.dali_threads == config.machine.workers == config.threads.loader_threads
    flagged = bench_config(parse_args(["--data", "d", "--out", "o", "--dali-threads", "3"]), "cpu")
    assert flagged.machine.dali_threads == 3  # a flag still beats the default


# --- the model step's threads are the harness's, whatever a loader does -------------------------------------

def test_a_loader_thread_cannot_change_the_harness_main_thread_once_applied():
    """torch takes a thread's intra-op count when the thread first runs an op, from the last
    torch.set_num_threads of any thread: a loader thread's set_num_threads(1) before the main thread's first op
    made the training step single-threaded. apply_model_threads fixes the main thread's count at once. A fresh
    interpreter: in this one the main thread has run ops long ago."""
    script = (
        "import threading, torch\n"
        "from benchmarks.threads import ThreadBudget, apply_model_threads, check_model_threads\n"
        "from pipelines.settings import one_torch_thread\n"
        "budget = ThreadBudget(6, 'cpu', 3, 3, '')\n"
        "apply_model_threads(budget)\n"
        "loader = threading.Thread(target=one_torch_thread); loader.start(); loader.join()\n"
        "torch.ones(1 << 20).mul(2).sum()\n"
        "check_model_threads(budget, 'after a loader thread started')\n"
        "print('threads', torch.get_num_threads())\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("threads 3")


def test_check_model_threads_names_a_changed_step(main_threads):
    budget = thread_budget(4, "cpu")
    apply_model_threads(budget)
    check_model_threads(budget)
    torch.set_num_threads(1)
    with pytest.raises(RuntimeError, match="1 torch threads .*not the 2"):
        check_model_threads(budget, "in a row")


def native_threads() -> int:
    """The process's threads that Python did not start: OpenMP's and DALI's among them."""
    return len(os.listdir("/proc/self/task")) - threading.active_count()


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts the process's threads in /proc")
def test_torchvision_gpus_threads_start_no_openmp_team_beside_the_model_step(data_dir, main_threads):
    """The cause of issue 37's end-to-end rows above the ceiling, pinned: the batch thread ran its batched ops on
    as many torch threads as the training step (2 here), so libgomp gave it a team of its own, one native
    thread more in the process. Now each of the loader's threads runs torch on itself alone."""
    torch.set_num_threads(2)  # what a thread started now would run its torch ops on, unless it says otherwise
    torch.ones(1 << 20).mul(2).sum()  # this thread's own team exists before the count below
    recipe = with_fields(arch="resnet18", batch_size=8, image_size=64)
    loader = build_split(recipe, Machine(workers=2), "torchvision-gpu", "train", data_dir, CPU)
    seen = {"stage": set(), "read": set()}
    prepare, read = loader._prepare, loader._read

    def recorded_prepare(*args):
        seen["stage"].add(torch.get_num_threads())
        return prepare(*args)

    def recorded_read(*args):
        seen["read"].add(torch.get_num_threads())
        return read(*args)

    loader._prepare, loader._read = recorded_prepare, recorded_read
    before = native_threads()
    batches = iter(loader)
    for _ in range(3):  # the loader stays alive, its threads idle between batches as in a harness row
        next(batches)
    during = native_threads()
    assert seen == {"stage": {1}, "read": {1}}
    assert during <= before, f"the loader started {during - before} native (OpenMP) threads"
    assert torch.get_num_threads() == 2  # the training thread's own are untouched
    del batches, loader


def step_state(images: torch.Tensor, labels: torch.Tensor) -> tuple:
    """How the training step runs, as its caller's thread sees it: threads, the batch's form, the switches."""
    return (
        ("torch threads", torch.get_num_threads()),
        ("batch", images.dtype, images.device.type, tuple(images.shape),
         images.is_contiguous(memory_format=torch.channels_last), labels.dtype, labels.device.type),
        ("autocast", torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")),
        ("grad", torch.is_grad_enabled(), torch.is_inference_mode_enabled()),
        ("defaults", torch.get_default_dtype(), torch.get_float32_matmul_precision(),
         torch.are_deterministic_algorithms_enabled()),
        ("backends", torch.backends.mkldnn.enabled, torch.backends.cudnn.enabled, torch.backends.cudnn.benchmark),
    )


def run_a_row(kind: str, data_dir: Path, budget: ThreadBudget) -> tuple[set, set]:
    """A harness row in small: the loader feeding the training step for 3 steps. Returns the states the step saw
    and the torch threads of every Python thread that the loader started while feeding it and ran its own code
    in (on returns from that code: a thread's start-up, one_torch_thread included, has run)."""
    recipe = with_fields(arch="resnet18", batch_size=4, image_size=32)
    machine = Machine(dali_threads=budget.loader_threads, workers=budget.loader_threads)
    loader_threads = set()

    def profile(frame, event, arg):
        if event == "return" and frame.f_code.co_filename.startswith(PIPELINES):
            loader_threads.add(torch.get_num_threads())

    loader = build_split(recipe, machine, kind, "train", data_dir, CPU)
    parts = build_training(recipe, loader.num_classes, CPU, machine)
    # threads started from now on, while the loader feeds the step (not the data check's, which reads headers
    # as the loader is built)
    threading.setprofile(profile)
    try:
        states = set()
        for step, (images, labels) in enumerate(loader):
            states.add(step_state(images, labels))
            train_step(parts, images, labels)
            if step == 2:
                break
        check_model_threads(budget, f"beside {kind}")
        del loader, parts
    finally:
        threading.setprofile(None)
    return states, loader_threads


@pytest.fixture(scope="module")
def budget():
    """4 cores' budget: 2 threads for the model step, so one that a loader's thread takes on shows."""
    before = torch.get_num_threads()
    budget = thread_budget(4, "cpu")
    apply_model_threads(budget)
    yield budget
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def synthetic_row(data_dir, budget):
    return run_a_row("synthetic", data_dir, budget)


@pytest.mark.parametrize("kind", CPU_LOADERS)
def test_no_loader_changes_how_the_model_step_runs(kind, data_dir, budget, synthetic_row):
    """Each CPU loader feeding the step: the step sees what it sees on synthetic data (the ceiling row), and
    every thread of the loader's that runs torch ops runs them on one thread, no OpenMP team of its own."""
    states, loader_threads = run_a_row(kind, data_dir, budget)
    (reference,) = synthetic_row[0]
    assert states == {reference}
    assert reference[0] == ("torch threads", budget.model_threads)
    assert loader_threads <= {1}, f"{kind}'s threads ran torch ops on {sorted(loader_threads)} threads"
    if kind == "torchvision-gpu":  # its reading and batch threads are watched: the check above is not empty
        assert loader_threads
