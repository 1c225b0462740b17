"""The recipe's numbers: LR at chosen steps, the warm-up's start, linear and square-root scaling, parameter groups,
zero-init, size."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from rn50.core.model import build_model, count_parameters
from rn50.core.optim import build_optimizer, parameter_groups
from rn50.config.recipe import Recipe, with_fields
from rn50.core.schedule import lr_at

SPE = 100  # steps per epoch


@pytest.mark.parametrize("step, expected", [
    (0, 0.0),                # warmup starts from 0
    (1, 0.1 * 1 / 500),      # one step of a 500-step ramp
    (250, 0.05),             # half-way through the 5-epoch warmup
    (499, 0.1 * 499 / 500),  # last warmup step
    (500, 0.1),              # warmup ends at the peak
    (2999, 0.1),             # last step before the epoch-30 boundary
    (3000, 0.01),            # x0.1 at epoch 30
    (5999, 0.01),
    (6000, 0.001),           # epoch 60
    (8000, 0.0001),          # epoch 80
    (8999, 0.0001),          # last step of epoch 90
])
def test_lr_at_chosen_steps(step, expected):
    assert lr_at(Recipe().schedule, 0.1, step, SPE) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_peak_lr_scales_linearly_with_global_batch():
    assert with_fields(batch_size=256).optimisation.peak_lr(world_size=4) == pytest.approx(0.4)  # B = 1024
    assert with_fields(batch_size=128).optimisation.peak_lr(world_size=8) == pytest.approx(0.4)
    assert with_fields(batch_size=256).optimisation.peak_lr(world_size=8) == pytest.approx(0.8)
    recipe = with_fields(batch_size=256)
    assert lr_at(recipe.schedule, recipe.optimisation.peak_lr(4), 5 * SPE, SPE) == pytest.approx(0.4)


def test_the_warm_up_starts_from_its_start_factor_as_torchvisions_linearlr():
    """Issue 40: --warmup-start-factor is torchvision's --lr-warmup-decay (LinearLR's start_factor): the LR of
    every warm-up step equals LinearLR's, stepped once per step, from 0.01 x the peak up to the peak."""
    schedule = with_fields(warmup_start_factor=0.01).schedule
    steps = int(schedule.warmup_epochs * SPE)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.4)
    linear = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=steps)
    for step in range(steps + 3):
        assert lr_at(schedule, 0.4, step, SPE) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-9), step
        optimizer.step()
        linear.step()
    assert lr_at(schedule, 0.4, 0, SPE) == pytest.approx(0.004)
    assert lr_at(with_fields(warmup_start_factor=1.0).schedule, 0.4, 0, SPE) == 0.4  # no ramp at all
    assert lr_at(Recipe().schedule, 0.4, 0, SPE) == 0.0  # the default: from 0, as before


def test_sqrt_lr_scaling_is_timms_lr_base_scale_sqrt():
    """Issue 40: a fine-tune at batch 2 (the finetune preset's 3e-4 at 256) got 2.3e-6 from the linear rule;
    timm's --lr-base-scale sqrt gives base_lr x sqrt(global batch / base batch)."""
    import math

    finetune = with_fields(batch_size=2, optimizer="adamw", base_lr=3e-4, base_batch=256).optimisation
    assert finetune.peak_lr(world_size=1) == pytest.approx(2.34375e-6)
    sqrt = with_fields(batch_size=2, optimizer="adamw", base_lr=3e-4, base_batch=256, lr_scaling="sqrt").optimisation
    assert sqrt.peak_lr(world_size=1) == pytest.approx(3e-4 * math.sqrt(2 / 256))  # 2.7e-5
    assert sqrt.global_batch(4) == 8 and sqrt.peak_lr(world_size=4) == pytest.approx(3e-4 * math.sqrt(8 / 256))
    at_base = with_fields(batch_size=256, lr_scaling="sqrt").optimisation
    assert at_base.peak_lr(world_size=1) == pytest.approx(0.1)  # both rules agree at base_batch
    assert at_base.peak_lr(world_size=4) == pytest.approx(0.2)  # 4x the batch: 2x the LR, not 4x


def test_every_lr_scaling_named_in_choices_is_accepted_and_others_are_one_line():
    from rn50.config.choices import LR_SCALINGS
    from rn50.config.errors import UserError

    peaks = {name: with_fields(lr_scaling=name).optimisation.peak_lr(2) for name in LR_SCALINGS}  # 512 images
    assert peaks == pytest.approx({"linear": 0.2, "sqrt": 0.1 * 2 ** 0.5})
    with pytest.raises(UserError, match=r"^lr_scaling must be one of linear, sqrt, not 'cubic'$"):
        with_fields(lr_scaling="cubic")
    with pytest.raises(UserError, match=r"^warmup_start_factor is a fraction of the peak LR in \[0, 1\].*got 2.0$"):
        with_fields(warmup_start_factor=2.0)


def test_resnet50_has_torchvisions_parameter_count():
    assert count_parameters(build_model("resnet50", 1000)) == 25_557_032


@pytest.mark.parametrize("arch, block, last_bn", [("resnet50", Bottleneck, "bn3"), ("resnet18", BasicBlock, "bn2")])
def test_zero_init_of_last_bn_in_every_block(arch, block, last_bn):
    model = build_model(arch, 10)
    blocks = [m for m in model.modules() if isinstance(m, block)]
    assert blocks
    for b in blocks:
        assert torch.count_nonzero(getattr(b, last_bn).weight) == 0
        assert torch.count_nonzero(b.bn1.weight) > 0  # only the last BN of the block
    plain = build_model(arch, 10, zero_init_residual=False)
    assert all(torch.count_nonzero(getattr(b, last_bn).weight) > 0 for b in plain.modules() if isinstance(b, block))


def test_parameter_groups_no_decay_on_bn_and_bias():
    model = build_model("resnet50", 1000)
    decay, no_decay = parameter_groups(model, 1e-4)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    decay_ids = {id(p) for p in decay["params"]}
    no_decay_ids = {id(p) for p in no_decay["params"]}
    assert not decay_ids & no_decay_ids
    assert decay_ids | no_decay_ids == {id(p) for p in model.parameters()}
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert id(module.weight) in no_decay_ids and id(module.bias) in no_decay_ids
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            assert id(module.weight) in decay_ids
            if module.bias is not None:
                assert id(module.bias) in no_decay_ids
    # ResNet-50: 53 conv weights + fc weight decay; 53 BNs x 2 + fc bias do not
    assert len(decay["params"]) == 54 and len(no_decay["params"]) == 107


def test_optimizer_is_sgd_nesterov_with_the_groups():
    model = build_model("resnet18", 10)
    optimizer = build_optimizer(model, Recipe().optimisation)
    assert isinstance(optimizer, torch.optim.SGD)
    assert all(g["nesterov"] and g["momentum"] == 0.9 for g in optimizer.param_groups)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [1e-4, 0.0]


@pytest.mark.parametrize("fields", [dict(epochs=2), dict(epochs=90), dict(epochs=3, warmup_epochs=0.0),
                                    dict(epochs=5, warmup_epochs=5.0), dict(epochs=4, warmup_epochs=2.5),
                                    dict(epochs=16, warmup_epochs=2.0, schedule="linear"),
                                    dict(epochs=6, warmup_epochs=1.0, schedule="cosine", min_lr=0.01),
                                    dict(epochs=3, warmup_epochs=5.0, warmup_start_factor=0.5),
                                    dict(epochs=6, warmup_epochs=2.0, warmup_start_factor=0.01, schedule="cosine")])
def test_peak_reached_is_the_highest_lr_of_any_step(fields):
    """Issue 23, 3.5: with a warm-up longer than the run the LR never reaches the peak the summary reported;
    peak_reached is what the run reaches, checked against every step's LR."""
    from rn50.core.schedule import peak_reached

    schedule = with_fields(**fields).schedule
    for spe in (1, 7, 11):
        every = [lr_at(schedule, 0.4, step, spe) for step in range(schedule.epochs * spe)]
        assert peak_reached(schedule, 0.4, spe) == max(every)
    assert (peak_reached(schedule, 0.4, 7) < 0.4) == (schedule.warmup_epochs >= schedule.epochs)


def test_every_schedule_named_in_choices_is_checked_and_computed():
    """One list of LR schedules (rn50/config/choices.py): the recipe accepts each and lr_at computes each."""
    import math

    from rn50.config.choices import SCHEDULES
    from rn50.config.recipe import with_fields
    from rn50.core.schedule import lr_at

    for kind in SCHEDULES:
        recipe = with_fields(schedule=kind, epochs=10, warmup_epochs=1.0)
        lrs = [lr_at(recipe.schedule, 0.1, step, 10) for step in range(100)]
        assert all(math.isfinite(lr) for lr in lrs), kind


def test_recipe_json_and_the_start_up_line_give_the_peak_lr_of_the_scaling_rule(tmp_path):
    """What a run saves (recipe.json: global_batch, peak_lr) and the start-up line that names the changed fields
    follow --lr-scaling sqrt: 4 processes x 64 = 256 images at 5e-3 per 2048 is 5e-3 x sqrt(1/8)."""
    import dataclasses
    import json
    import math

    from rn50.config.recipe import resolve
    from rn50.config.run_settings import RunSettings
    from rn50.reliability.lifecycle import startup_summary, write_run_files
    from rn50.system.dist import DistEnv

    config = resolve({"data": tmp_path, "out": tmp_path, "batch_size": 64, "optimizer": "lamb", "base_lr": 5e-3,
                      "base_batch": 2048, "lr_scaling": "sqrt", "warmup_start_factor": 0.01}, run=RunSettings)
    write_run_files(config, DistEnv(rank=0, world_size=4, local_rank=0, device=torch.device("cpu")), None)
    saved = json.loads((tmp_path / "recipe.json").read_text())
    assert saved["global_batch"] == 256 and saved["peak_lr"] == pytest.approx(5e-3 * math.sqrt(256 / 2048))
    assert saved["optimisation"]["lr_scaling"] == "sqrt" and saved["schedule"]["warmup_start_factor"] == 0.01
    first = startup_summary(dataclasses.replace(config, machine=config.machine.for_device("cpu")), config.machine,
                            1000)[0]
    assert 'lr_scaling="sqrt"' in first and "warmup_start_factor=0.01" in first, first
