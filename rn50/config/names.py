"""Names users bring to our flags and preset keys, and the hint an unknown one gets: ours for a name we know
(torchvision's classification reference script, timm's train.py, habit), that we do not have it (yet) and the
nearest thing we do have, or else the closest spelling: a typo's, never a flag that merely shares letters
(`--opt` used to suggest `--out`, `--pretrained` `--image-size`).

No imports from the rest of rn50: rn50.config.recipe (preset keys), rn50.config.cli (flags) and
rn50.config.reference (docs/reference.md's table of them) read it. Names are compared as `plain` spells them:
lower case, letters and digits only (`--lr-scheduler`, `lr_scheduler` and `LRScheduler` are one name).
"""

from __future__ import annotations

import re

from rn50.config.choices import SCHEDULES, listed

TV = "torchvision's reference script"  # references/classification/train.py
TIMM = "timm's train.py"
BOTH = f"{TV} and {TIMM}"
_LR = ("--base-lr", "ours is the LR per 256 images, scaled by the global batch (torchvision's and timm's --lr "
                    "is the LR of the whole global batch)")
_EMA = ("--ema-decay", "the EMA is on when --ema-decay is above 0 (e.g. 0.9998), updated after every optimizer step")
_RANDAUG = ("--randaugment-magnitude", "RandAugment inside the DALI pipelines (e.g. --randaugment-magnitude 9 "
                                       "--randaugment-layers 2); TrivialAugment-wide is --trivial-augment; "
                                       "AutoAugment's other policies are not available")
_TRIVIAL = ("--trivial-augment", "TrivialAugment-wide per image (the DALI loaders and --loader torchvision)")
_REPEATED = ("--repeated-aug", "each image k times per epoch, augmented independently (DALI loaders), e.g. 3")
_CLIP = ("--clip-grad-norm", "clips the global L2 norm of all gradients (after AMP's unscale, on the accumulated "
                             "gradient), once per optimizer step; 0 turns it off")
_ACCUM = ("--accum-steps", "micro-batches of --batch-size per optimizer step: the global batch is --batch-size x "
                           "the processes x --accum-steps, and the LR and the schedule follow it")
_INTERP = (None, "every loader resizes with antialiased bilinear interpolation (torchvision's default)")
_NO_DECAY = (None, "BN parameters and biases never get weight decay here; --weight-decay sets that of the "
                   "conv and linear weights")

# their flag -> (where it comes from, our flag or None, what to know); names identical to ours are left out.
# Looked up as `plain` spells them (FOREIGN_BY_PLAIN); docs/reference.md's last table lists them.
FOREIGN = {
    "--opt": (BOTH, "--optimizer", "sgd (Nesterov) | adamw | lamb"),
    "--lr": (BOTH, *_LR),
    "--wd": (TV, "--weight-decay", "never applied to BN parameters and biases here"),
    "--lr-scheduler": (TV, "--schedule", listed(SCHEDULES, described=False)),
    "--sched": (TIMM, "--schedule", listed(SCHEDULES, described=False)),
    "--lr-warmup-epochs": (TV, "--warmup-epochs", "a linear warmup from --warmup-start-factor x the peak LR (0 by "
                                                  "default), updated every step"),
    "--lr-warmup-method": (TV, None, "the warm-up is linear (--warmup-epochs), from --warmup-start-factor x the peak"),
    "--lr-warmup-decay": (TV, "--warmup-start-factor", "the same fraction of the peak LR the warm-up starts from"),
    "--warmup-lr": (TIMM, "--warmup-start-factor", "ours is a fraction of the peak LR, not an LR: their --warmup-lr "
                                                   "divided by the peak LR"),
    "--lr-step-size": (TV, "--lr-milestones", "the epochs where the LR drops (e.g. 30,60,80), not a period"),
    "--decay-epochs": (TIMM, "--lr-milestones", "the epochs where the LR drops (e.g. 30,60,80), not a period"),
    "--decay-milestones": (TIMM, "--lr-milestones", "the epochs where the LR drops (e.g. 30,60,80)"),
    "--lr-gamma": (TV, "--lr-decay", "the LR multiplier at each milestone"),
    "--decay-rate": (TIMM, "--lr-decay", "the LR multiplier at each milestone"),
    "--lr-min": (TV, "--min-lr", "cosine: the LR at the end of the cosine phase"),
    "--lr-base": (TIMM, "--base-lr", "the same rule: the LR per --base-batch images, scaled by the global batch"),
    "--lr-base-size": (TIMM, "--base-batch", "the global batch at which --base-lr applies"),
    "--lr-base-scale": (TIMM, "--lr-scaling", "linear | sqrt: how --base-lr scales from --base-batch to the global "
                                              "batch"),
    "--patience-epochs": (TIMM, "--plateau-patience", "--schedule plateau: epochs without improvement"),
    "--smoothing": (TIMM, "--label-smoothing", ""),
    "--mixup": (TIMM, "--mixup-alpha", ""),
    "--cutmix": (TIMM, "--cutmix-alpha", "with --mixup-alpha too, each batch takes one of the two at random"),
    "--mixup-prob": (TIMM, None, "Mixup or CutMix applies to every batch (--mixup-alpha, --cutmix-alpha)"),
    "--mixup-switch-prob": (TIMM, None, "with both --mixup-alpha and --cutmix-alpha, each batch takes one at random"),
    "--model-ema": (BOTH, *_EMA),
    "--model-ema-decay": (BOTH, *_EMA),
    "--model-ema-steps": (TV, None, "the EMA (--ema-decay) is updated after every optimizer step"),
    "--model-ema-force-cpu": (TIMM, None, "the EMA (--ema-decay) stays on the training device"),
    "--clip-grad": (TIMM, *_CLIP),
    "--clip-mode": (TIMM, "--clip-grad-norm", "clipping by the global norm (timm's `norm`) is the one we have; "
                                             "`value` and `agc` are not available"),
    "--auto-augment": (TV, *_RANDAUG),
    "--aa": (TIMM, *_RANDAUG),
    "--ra-magnitude": (TV, "--randaugment-magnitude", "0..30 inside the DALI pipelines"),
    "--ra-sampler": (TV, *_REPEATED),
    "--ra-reps": (TV, *_REPEATED),
    "--aug-repeats": (TIMM, *_REPEATED),
    "--reprob": (TIMM, "--random-erase", "the probability per image; the rectangle is 0 after normalisation "
                                         "(timm's --remode const)"),
    "--remode": (TIMM, None, "random erasing (--random-erase) sets the rectangle to 0 after normalisation, timm's "
                             "--remode const"),
    "--recount": (TIMM, None, "random erasing (--random-erase) erases one rectangle per image, timm's --recount 1"),
    "--initial-checkpoint": (TIMM, "--finetune-from", "start from this file (a torchvision .pth or our checkpoint; a "
                                                      "classifier of another size is replaced); torchvision's weights "
                                                      "by name: --weights NAME or --pretrained"),
    "--accum_iter": ("MAE's training scripts", *_ACCUM),
    "--grad-accum-steps": (TIMM, *_ACCUM),
    "-j": (BOTH, "--workers", "torchvision loader processes; the DALI loaders take --dali-threads"),
    "-b": (BOTH, "--batch-size", "per GPU, as theirs"),
    "--output-dir": (TV, "--out", "the run folder"),
    "--output": (TIMM, "--out", "the run folder"),
    "--model": (BOTH, "--arch", "resnet18 ... resnet152"),
    "--data-path": (TV, "--data", "the folder with train/ and val/"),
    "--train-crop-size": (TV, "--image-size", "the training crop; --val-image-size the validation one"),
    "--val-crop-size": (TV, "--val-image-size", "0: --image-size"),
    "--val-resize-size": (TV, "--val-resize-ratio", "a ratio: the shorter side is resized to the validation size / "
                                                "ratio (0.875: 256 for 224)"),
    "--crop-pct": (TIMM, "--val-resize-ratio", "the same ratio (0.875: 256 for 224)"),
    "--interpolation": (BOTH, *_INTERP),
    "--train-interpolation": (TIMM, *_INTERP),
    "--norm-weight-decay": (TV, *_NO_DECAY),
    "--bias-weight-decay": (TV, *_NO_DECAY),
    "--use-deterministic-algorithms": (TV, None, "--seed fixes the initial weights and the augmentation streams; "
                                             "--no-cudnn-benchmark stops cuDNN from timing kernels"),
    "--print-freq": (TV, "--log-every", "steps between logged losses"),
    "--log-interval": (TIMM, "--log-every", "steps between logged losses"),
    "--test-only": (TV, "`python -m rn50.evaluate --data DIR --weights PATH --out DIR`",
                 "a validation-only run (our checkpoints or torchvision weights)"),
    "--vflip": (TIMM, None, "a vertical flip; --hflip is the horizontal one"),
    "--bn-momentum": (TIMM, None, "BatchNorm keeps torch's momentum (0.1); --momentum is SGD's"),
    "--native-amp": (TIMM, "--amp", "torch's autocast, on by default; --amp-dtype float16|bfloat16"),
    "--apex-amp": (TIMM, "--amp", "torch's autocast, on by default; --amp-dtype float16|bfloat16"),
    "--bce-loss": (TIMM, None, "the loss is cross-entropy, with --label-smoothing (and --kd-teacher distillation)"),
    "--start-epoch": (BOTH, None, "--resume continues at the checkpoint's epoch and step"),
    "--world-size": (TV, None, "the processes come from torchrun (--nproc-per-node, --nnodes; docs/multinode.md)"),
    "--dist-url": (TV, None, "the processes come from torchrun (--rdzv-endpoint; docs/multinode.md)"),
    "--scale": (TIMM, "--crop-area", "RandomResizedCrop's range of the crop's share of the image area"),
    "--ratio": (TIMM, "--crop-ratio", "RandomResizedCrop's range of aspect ratios"),
    "--mean": (TIMM, "--normalize", "MEAN_R,MEAN_G,MEAN_B,STD_R,STD_G,STD_B in one flag"),
    "--std": (TIMM, "--normalize", "MEAN_R,MEAN_G,MEAN_B,STD_R,STD_G,STD_B in one flag"),
    "--num-classes": (TIMM, None, "the class count comes from the class folders of --data's train/"),
    "--torchcompile": (TIMM, "--compile", "--compile-mode for the mode"),
    "--checkpoint-hist": (TIMM, "--keep-checkpoints", "the last K checkpoints and the best"),
    "--recovery-interval": (TIMM, "--checkpoint-every", "steps or a time (10m)"),
    "--log-wandb": (TIMM, "--tracker", "--tracker wandb (or mlflow)"),
}

# their flag with a value that one flag of ours is (the value compared as `plain` spells it): `--aa trivialaugment`;
# docs/reference.md's last table lists them beside FOREIGN
FOREIGN_VALUES = {
    ("--auto-augment", "ta_wide"): (TV, *_TRIVIAL),
    ("--aa", "trivialaugment"): (TIMM, *_TRIVIAL),
    ("--aa", "ta_wide"): (TIMM, *_TRIVIAL),
}


def plain(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


FOREIGN_BY_PLAIN = {plain(flag): value for flag, value in FOREIGN.items()}  # preset keys: `lr`, `LR`, `Lr`
FOREIGN_BY_FLAG = {flag.replace("_", "-"): value for flag, value in FOREIGN.items()}  # `--accum-iter` too

# Names users come with (other scripts, papers, habit), spelled as `plain` spells them -> our flag and what to know
USER_NAMES = {
    **dict.fromkeys(("learningrate", "lr", "lrate", "initiallr", "initlr", "maxlr", "peaklr", "baselearningrate"),
                    ("--base-lr", "the LR per --base-batch images (256 by default), scaled by the global batch")),
    **dict.fromkeys(("wd", "decay", "l2", "weightdecayrate"),
                    ("--weight-decay", "never applied to BN parameters and biases")),
    **dict.fromkeys(("bs", "batch", "batchsz", "minibatch", "minibatchsize", "trainbatchsize", "pergpubatchsize",
                     "perdevicebatchsize", "perdevicetrainbatchsize"), ("--batch-size", "images per GPU, per process")),
    **dict.fromkeys(("numworkers", "nworkers", "worker", "dataloaderworkers", "jobs", "numthreads", "threads",
                     "nthreads"), ("--workers", "torchvision loaders; the DALI loaders take --dali-threads")),
    **dict.fromkeys(("epoch", "numepochs", "nepochs", "maxepochs", "trainepochs", "numtrainepochs"),
                    ("--epochs", "")),
    **dict.fromkeys(("warmup", "lrwarmup", "warmupepoch"),
                    ("--warmup-epochs", "a linear warmup from --warmup-start-factor x the peak LR, 0 by default")),
    **dict.fromkeys(("model", "network", "net", "architecture", "backbone"), ("--arch", "resnet18 ... resnet152")),
    **dict.fromkeys(("imgsize", "imsize", "resolution", "res", "size", "inputsize", "cropsize", "trainsize",
                     "trainresolution"), ("--image-size", "")),
    **dict.fromkeys(("datadir", "datapath", "dataset", "datasetdir", "root", "dataroot", "imagenet"),
                    ("--data", "the folder with train/ and val/")),
    **dict.fromkeys(("output", "outdir", "outputdir", "logdir", "savedir", "checkpointdir", "rundir"),
                    ("--out", "the run folder")),
    **dict.fromkeys(("mom", "sgdmomentum"), ("--momentum", "")),
    **dict.fromkeys(("smoothing", "ls"), ("--label-smoothing", "")),
    **dict.fromkeys(("fp16", "halfprecision", "mixedprecision", "autocast"),
                    ("--amp", "on by default; --amp-dtype float16|bfloat16")),
    # timm's `pretrained: true` in a config file; rn50.train's --pretrained is a flag, a preset sets `weights`
    **dict.fromkeys(("pretrained", "usepretrained"),
                    ("--weights", "weights = \"DEFAULT\": torchvision's default weights of the arch")),
    **dict.fromkeys(("gradientaccumulationsteps", "gradaccum", "accumulategradbatches", "updatefreq"),
                    ("--accum-steps", "micro-batches of --batch-size per optimizer step")),
    **dict.fromkeys(("maxgradnorm", "gradclip", "gradientclipping", "clipnorm"),
                    ("--clip-grad-norm", "the global L2 norm of all gradients; 0: off")),
}


def foreign_flag(name: str, flags, value: str | None = None) -> str | None:
    """The message for a flag of another script that we know (FOREIGN): ours and what to know, or that we
    do not have it (yet) and the nearest thing we have; None for other names. Where ours is a flag this
    command (its `flags`) does not take, it says so rather than guess at another. `value`: the value given
    with it, where that value is one flag of ours (FOREIGN_VALUES: `--aa trivialaugment`)."""
    for (flag, theirs), (source, ours, note) in FOREIGN_VALUES.items():
        if flag == name.replace("_", "-") and value and plain(value) == plain(theirs):
            return f"{name} {value} is a flag of {source}; use {ours}: {note}"
    found = FOREIGN_BY_FLAG.get(name.replace("_", "-"))  # as spelled; else `--Opt`, but `--LR` is a habit's
    source, ours, note = found or (FOREIGN_BY_PLAIN.get(plain(name)) if plain(name) not in USER_NAMES else None) \
        or (None, None, "")
    if source is None:
        return None
    if ours is None:
        return f"{name} is a flag of {source}, not available here (yet): {note}"
    if ours.startswith("-") and ours not in flags:
        return f"{name} is a flag of {source}; ours is {ours}, which this command does not take"
    return f"{name} is a flag of {source}; use {ours}" + (f": {note}" if note else "")


def foreign_key(key: str, keys) -> str | None:
    """The hint after an unknown preset key that is another script's name or a habit (`lr`): our key among
    `keys` (flat names), or that we do not have it (yet). None when the name is not one we know."""
    source, ours, note = FOREIGN_BY_PLAIN.get(plain(key), (None, None, ""))
    lead = f"; a name from {source}"
    if source is None:
        ours, note = USER_NAMES.get(plain(key), (None, ""))
        if ours is None:
            return None
    if ours is None:
        return f"{lead}, not available here (yet): {note}"
    ours_key = ours.removeprefix("--").replace("-", "_")
    if ours_key not in keys:
        return f"{lead if source else ''}; not a recipe setting: use {ours}" + (f": {note}" if note else "")
    if source is None:
        return f"; did you mean {ours_key!r}?" + (f" ({note})" if note else "")
    return f"{lead}: use {ours_key!r}" + (f"; {note}" if note else "")


def distance(a: str, b: str) -> int:
    """Edits from a to b (insert, delete, substitute, or swap two neighbours): a typo's distance."""
    d = [[i + j if not i * j else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[-1][-1]


def closest(name: str, candidates) -> str | None:
    """The candidate a typo of `name` would be, compared as `plain` spells them: at most 1 edit for names of
    up to 5 letters, 2 for longer ones; None when nothing is that close (a guess would mislead)."""
    key = plain(name)
    if not key:
        return None
    limit = 1 if len(key) <= 5 else 2
    scored = sorted((distance(key, plain(c)), i, c) for i, c in enumerate(candidates))
    return scored[0][2] if scored and scored[0][0] <= limit else None
