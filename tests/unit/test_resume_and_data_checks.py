"""Issue 23: resume checks (architecture, optimizer, the training file list), the validation resize reported as
applied, one jitter range for every loader, worker defaults from the machine, and rn50.evaluate reading the
architecture from the weights (its check on a real pipeline: tests/component/test_evaluate_checks.py)."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch

from pipelines.settings import default_workers
from pipelines.augmentation import Augmentation
from pipelines.torchvision_loader import validation_transform
from pipelines.folder import list_split
from rn50.reliability.checkpoint import restore_training
from rn50.config.errors import UserError
from rn50.core.model import arch_of_weights, build_model
from rn50.reliability.lifecycle import check_data, guard_resume
from rn50.config.recipe import Recipe, with_fields


def test_a_new_architecture_is_refused_on_resume_without_offering_allow_change():
    """5.1: `--arch resnet34 --allow-change arch` crashed in load_state_dict; now one line, no offer."""
    saved, now = with_fields(Recipe(), arch="resnet18"), with_fields(Recipe(), arch="resnet34")
    for allowed in (None, "arch"):
        with pytest.raises(UserError) as refused:
            guard_resume(saved, now, allowed)
        assert "resnet18" in str(refused.value) and "--allow-change" not in str(refused.value)
    assert guard_resume(saved, with_fields(saved, optimizer="adamw"), "optimizer") == ["optimizer: 'sgd' -> 'adamw'"]
    assert guard_resume(saved, saved, "data") == []  # `data` is a name --allow-change takes


def _parts(optimizer_name: str, weight_decay: float):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    groups = [{"params": list(model.parameters()), "weight_decay": weight_decay}]
    optimizer = torch.optim.SGD(groups, lr=0.1, momentum=0.9) if optimizer_name == "sgd" else \
        torch.optim.AdamW(groups, lr=0.1)
    return SimpleNamespace(raw_model=model, optimizer=optimizer, scaler=torch.amp.GradScaler("cpu", enabled=False),
                           ema=None)


def _one_step(parts):
    parts.optimizer.zero_grad()
    parts.raw_model(torch.ones(3, 4)).sum().backward()
    parts.optimizer.step()


def test_another_optimizer_starts_fresh_and_a_changed_weight_decay_applies():
    """5.1: `--optimizer adamw --allow-change optimizer` died with KeyError 'step' (SGD's state loaded into AdamW);
    an allowed weight decay change was silently replaced by the saved one."""
    sgd = _parts("sgd", 1e-4)
    _one_step(sgd)
    state = {"model": sgd.raw_model.state_dict(), "optimizer": sgd.optimizer.state_dict(), "scaler": {}}

    adamw = _parts("adamw", 1e-4)
    restore_training(adamw, state, fresh_optimizer=True)
    assert adamw.optimizer.state_dict()["state"] == {}
    _one_step(adamw)  # KeyError: 'step' before the fix
    assert torch.equal(adamw.raw_model.weight.grad, torch.ones(2, 4) * 3)

    sgd2 = _parts("sgd", 0.05)
    restore_training(sgd2, state)
    assert sgd2.optimizer.param_groups[0]["weight_decay"] == 0.05  # this run's, not the checkpoint's 1e-4
    momentum = sgd2.optimizer.state_dict()["state"][0]["momentum_buffer"]
    assert torch.equal(momentum, sgd.optimizer.state_dict()["state"][0]["momentum_buffer"])  # state kept


def test_the_training_file_list_is_checked_on_resume(data_dir, tmp_path):
    """4.2: the checkpoint records the list's count and digest; another list is one line unless allowed."""
    moved = tmp_path / "moved"
    shutil.copytree(data_dir, moved)
    original, same = list_split(str(data_dir), "train"), list_split(str(moved), "train")
    assert original.identity == same.identity  # the dataset moved, the files are the same
    (moved / "train" / "n00000001" / sorted((moved / "train" / "n00000001").iterdir())[0].name).unlink()
    list_split.cache_clear()
    fewer = list_split(str(moved), "train")
    assert fewer.identity != original.identity and len(fewer) == len(original) - 1

    saved = {"data": {"count": len(original), "digest": original.identity}}
    now = {"count": len(fewer), "digest": fewer.identity}
    assert check_data(saved, dict(saved["data"]), None) == (True, [])
    with pytest.raises(UserError) as refused:
        check_data(saved, now, None)
    message = str(refused.value)
    assert "\n" not in message and "--allow-change data" in message and original.identity in message
    same_data, notes = check_data(saved, now, "weight_decay,data")
    assert not same_data and "the interrupted epoch restarts" in notes[0]
    assert check_data({}, now, None)[0] and "records no training file list" in check_data({}, now, None)[1][0]


@pytest.mark.parametrize("size, resize_to", [(32, 36), (224, 256), (256, 292)])
def test_the_validation_resize_is_one_number_for_report_and_loaders(size, resize_to):
    """5.3: eval.json said 37 (round) where the loaders resize to 36 (int)."""
    aug = Augmentation(image_size=size)
    assert aug.val_resize_to == resize_to
    resize = next(t for t in validation_transform(aug, torch.float32).transforms if type(t).__name__ == "Resize")
    assert resize.size == [resize_to]


def test_the_jitter_range_is_clamped_at_zero():
    """4.4: dali.py drew factors from [1 - s, 1 + s] (negative above s = 1), torchvision_gpu from [0, 1 + s]."""
    assert Augmentation(color_jitter=0.4).jitter_range == pytest.approx((0.6, 1.4))
    assert Augmentation(color_jitter=1.5).jitter_range == (0.0, 2.5)
    import inspect

    import pipelines.dali as dali
    import pipelines.torchvision_gpu as tvgpu
    for module in (dali, tvgpu):  # both read the one range, neither computes its own
        assert "jitter_range" in inspect.getsource(module) and "1.0 - aug.color_jitter" not in inspect.getsource(module)


def test_default_workers_follow_the_cores_and_the_local_ranks(monkeypatch):
    """5.5: 8 worker processes per rank on a 2-core machine; now the cores over the local ranks, 1 to 8."""
    import os

    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_workers() == max(1, min(8, cores))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cores * 4))
    assert default_workers() == 1


def test_the_architecture_is_read_from_the_weights():
    """3.7: the weights say which ResNet they are, ours or torchvision's, whatever the classifier."""
    for arch in ("resnet18", "resnet34", "resnet50"):
        state = build_model(arch, 7).state_dict()
        assert arch_of_weights(state) == arch
        assert arch_of_weights({f"module.{k}": v for k, v in state.items()}) == arch
    assert arch_of_weights({"weight": torch.zeros(3)}) is None


def test_finetune_reads_the_architecture_from_the_weights(tmp_path):
    """3.7: `--finetune-from` a resnet18 checkpoint without --arch failed 17 s in, after the loaders were built;
    now the weights' architecture is the run's (with a note), and a contradicting --arch is refused at start-up."""
    from argparse import Namespace

    from rn50.reliability.lifecycle import finetune_arch

    path = tmp_path / "checkpoint_0001.pt"
    torch.save({"model": build_model("resnet18", 3).state_dict(), "recipe": {"model": {"arch": "resnet18"}}}, path)
    recipe = with_fields(Recipe(), finetune_from=str(path))
    adopted, note = finetune_arch(recipe, given=())
    assert adopted.model.arch == "resnet18" and note == f"arch resnet18: read from --finetune-from {path}"
    with pytest.raises(UserError, match="holds resnet18 weights but this run's arch is resnet50"):
        finetune_arch(with_fields(recipe, arch="resnet50"), given={"arch"})
    same, note = finetune_arch(with_fields(recipe, arch="resnet18"), given={"arch"})
    assert same.model.arch == "resnet18" and note is None
    assert finetune_arch(Recipe(), given=()) == (Recipe(), None)  # no --finetune-from


# --- issue 38: the rough edges of a resume ----------------------------------------------------------------

def test_the_lr_schedule_may_change_on_resume_with_one_line_and_the_rest_is_still_refused():
    """38.1: the documented fix for a diverged run, `--resume CKPT --base-lr 0.05`, exited 2 asking for
    --allow-change base_lr. The schedule's numbers change the LR of the steps to come only: accepted without
    --allow-change (the resume stays exact), said in one line old -> new; what breaks a resume is still refused."""
    from rn50.reliability.lifecycle import schedule_changes

    saved = with_fields(Recipe(), epochs=1)
    now = with_fields(saved, base_lr=0.05, epochs=2, warmup_epochs=1.0, lr_milestones=(1.5,))
    assert guard_resume(saved, now, None) == []  # no step-altering change: the loader's position carries over
    line = schedule_changes(saved, now, epochs_done=1)
    assert "\n" not in line and line.startswith("changed on resume: base_lr 0.1 -> 0.05, epochs 1 -> 2, ")
    assert "warmup_epochs 5.0 -> 1.0" in line and "lr_milestones (30.0, 60.0, 80.0) -> (1.5,)" in line
    assert schedule_changes(saved, saved, epochs_done=1) is None
    # issue 40: the warm-up's start and the LR scaling rule are numbers of the schedule too
    scaled = with_fields(saved, warmup_start_factor=0.01, lr_scaling="sqrt")
    assert guard_resume(saved, scaled, None) == []
    assert schedule_changes(saved, scaled, epochs_done=1) == ("changed on resume: lr_scaling 'linear' -> 'sqrt', "
                                                              "warmup_start_factor 0.0 -> 0.01 (the LR of the steps "
                                                              "to come; the steps done and the data stream stay as "
                                                              "they were)")
    with pytest.raises(UserError, match="3 epochs done but this run asks for --epochs 2; pass --epochs 3 or more"):
        schedule_changes(saved, now, epochs_done=3)  # epochs done cannot be undone
    for field, value in (("batch_size", 8), ("image_size", 64), ("schedule", "cosine"), ("label_smoothing", 0.0)):
        with pytest.raises(UserError, match=f"--allow-change {field}"):
            guard_resume(saved, with_fields(now, **{field: value}), None)


def test_a_changed_plateau_factor_and_patience_survive_restoring_the_plateau_state():
    """38.1: plateau_factor and plateau_patience are schedule values a resume may change; the saved
    ReduceLROnPlateau state holds the old ones, which load_state_dict used to bring back."""
    from rn50.core.schedule import PlateauMultiplier

    before = PlateauMultiplier(with_fields(Recipe(), schedule="plateau").schedule)
    before.step(1.0)
    after = PlateauMultiplier(with_fields(Recipe(), schedule="plateau", plateau_factor=0.5,
                                          plateau_patience=0).schedule)
    after.load_state_dict(before.state_dict())
    after.step(2.0)  # no improvement, patience 0: the LR drops at once, by this run's factor
    assert after.value == 0.5


def test_resume_auto_whose_only_checkpoint_is_unreadable_stops_in_one_line(tmp_path):
    """38.3: a truncated only checkpoint was skipped, then the run fell back to the default recipe ("batch size
    256 is larger than this rank's share") or started afresh in the run's folder. Now one line that names the
    file, why (the integrity check) and what to do."""
    from rn50.reliability.checkpoint import CheckpointStore
    from rn50.reliability.lifecycle import find_resume

    store = CheckpointStore(tmp_path, keep_last=0)
    only = store.save("checkpoint_0001.pt", {"epoch": 1, "pad": torch.zeros(10_000)})
    only.write_bytes(only.read_bytes()[:1000])
    with pytest.raises(UserError) as refused:
        find_resume(tmp_path, "auto")
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"--resume auto: the only checkpoint of {tmp_path}, "
                                                      "checkpoint_0001.pt, is unreadable: truncated: 1000 bytes")
    assert "integrity check against checkpoint_0001.sha256" in message and "new --out" in message
    second = store.save("checkpoint_0002.pt", {"epoch": 2, "pad": torch.zeros(10_000)})
    second.write_bytes(b"x" + second.read_bytes()[1:])
    with pytest.raises(UserError, match="none of the 2 checkpoints .* the newest, checkpoint_0002.pt, is unreadable: "
                                        "corrupt"):
        find_resume(tmp_path, "auto")
    assert find_resume(tmp_path / "empty", "auto").checkpoint is None  # no checkpoint at all: a fresh start


def test_the_same_command_on_an_unfinished_run_says_to_add_resume_auto(tmp_path):
    """38.2: after Ctrl-C the same command was refused with "already holds a run"; now one line naming the newest
    checkpoint and --resume auto, also when the run stopped before its first log line (checkpoints only)."""
    from rn50.reliability.checkpoint import CheckpointStore
    from rn50.reliability.lifecycle import prepare_out_dir

    CheckpointStore(tmp_path, keep_last=0).save("checkpoint_0000_step00000002.pt", {"epoch": 0})
    with pytest.raises(UserError) as refused:
        prepare_out_dir(tmp_path, resuming=False, is_main=True)
    message = str(refused.value)
    assert "\n" not in message and f"{tmp_path} already holds an unfinished run (its newest checkpoint: " \
        "checkpoint_0000_step00000002.pt); to continue it, run the same command with --resume auto" in message
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(UserError, match="already holds a finished run"):
        prepare_out_dir(tmp_path, resuming=False, is_main=True)
    assert prepare_out_dir(tmp_path, resuming=True, is_main=True) == []
