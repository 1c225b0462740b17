"""The recipe's named choices, one list each: the LR schedules (rn50.core.schedule.lr_at implements each),
the optimizers (rn50.core.optim builds each) and the LR scaling rules (Optimisation.peak_lr applies each). The
recipe's help and check (config/recipe.py) and the names users bring (config/names.py) read them here."""

from __future__ import annotations

# name -> what it does, in the order the help lists them
SCHEDULES = {
    "step": "milestones",
    "cosine": "to min_lr, then cooldown",
    "plateau": "on val loss",
    "linear": "from the peak straight down to 0 at the last epoch",
}
OPTIMIZERS = {
    "sgd": "Nesterov",
    "adamw": "torch",
    "lamb": "timm's",
}

LR_SCALINGS = {
    "linear": "peak = base_lr x global_batch / base_batch, Goyal et al.'s rule for SGD",
    "sqrt": "peak = base_lr x sqrt(global_batch / base_batch), timm's --lr-base-scale sqrt, for AdamW and LAMB",
}


def listed(choices: dict[str, str], described: bool = True) -> str:
    """"step (milestones) | cosine (...)", or the names alone: "step | cosine | ..."."""
    return " | ".join(f"{name} ({what})" if described else name for name, what in choices.items())
