"""`python -m rn50.evaluate` (this module's main, also under torchrun): validation without training.

It evaluates a checkpoint of ours (raw or EMA weights) or a torchvision state dict on a data folder's
validation split, with any loader, at one or several validation sizes, and writes eval.json (top-1, top-5,
loss, val/count, per-class accuracy, precision, recall, F1 and macro averages) and the confusion matrix
(confusion.csv; confusion.png up to 100 classes). The model is the training step's (rn50.core.model's
recipe_model and memory_format), the validation training's (rn50.core.validation.evaluate).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

# What reading the flags needs, and nothing heavier: `python -m rn50.evaluate` reads them before the imports
# below parse_args load torch and DALI (seconds), so a mistyped flag is reported at once
from rn50.config.errors import UserError, check_flags_first
from rn50.config.cli import add_recipe_flags, parse_strict
from rn50.config.recipe import resolve, with_fields

# the recipe and machine flags that matter to an evaluation (rn50.config.recipe.add_recipe_flags)
EVAL_FLAGS = ("arch", "blurpool", "image_size", "val_image_size", "val_resize_ratio", "val_flip", "batch_size",
              "amp", "amp_dtype", "channels_last", "loader", "device", "dali_threads", "hw_decoder_load",
              "prefetch", "workers")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="rn50.evaluate", allow_abbrev=False,
        description="Evaluate weights on a data folder's validation split (one process or torchrun).",
        epilog="Writes OUT/eval.json and OUT/confusion.csv (and confusion.png up to 100 classes); with --sizes, "
               "confusion_<size>.csv/png per size. The classes are DIR/train's class folders.")
    parser.add_argument("--data", required=True, type=Path, help="folder with train/<class>/ and val/<class>/")
    parser.add_argument("--weights", required=True, type=Path,
                        help="a checkpoint_*.pt of ours (its recipe gives arch, blurpool and sizes), a "
                             "torchvision state dict (.pth; --arch names the architecture), or torchvision's "
                             "weights of --arch by name (IMAGENET1K_V2, DEFAULT: from the torch hub cache)")
    parser.add_argument("--out", required=True, type=Path, help="folder for eval.json and the confusion matrix")
    parser.add_argument("--ema", action="store_true", help="evaluate the checkpoint's EMA weights")
    parser.add_argument("--sizes", default=None, metavar="S[,S...]",
                        help="validation crop sizes to sweep (e.g. 224,256,288): one result per size")
    parser.add_argument("--manifest", type=Path, default=None,
                        help="folder with val.txt from `python -m tools.scan`: evaluate those files only")
    add_recipe_flags(parser, only=EVAL_FLAGS)
    return parse_strict(parser, argv)


if __name__ == "__main__":
    check_flags_first(parse_args)

import torch  # noqa: E402

from pipelines.shards import classes_of  # noqa: E402
from pipelines.registry import REGISTRY, kinds  # noqa: E402
from pipelines.storage import display  # noqa: E402
from rn50.system.dist import all_reduce_sum, init_distributed, shutdown  # noqa: E402
from rn50.core.loaders import build_split  # noqa: E402
from rn50.core.model import arch_of_weights, load_state, memory_format, read_weights_file, recipe_model  # noqa: E402
from rn50.core import pretrained  # noqa: E402
from rn50.core.precision import autocast_dtype  # noqa: E402
from rn50.core.validation import evaluate  # noqa: E402


# --- metrics from a confusion matrix --------------------------------------------------------------------

def class_metrics(confusion, classes: list[str] | None = None) -> dict:
    """Per-class accuracy, precision, recall and F1, and their macro averages, from a confusion matrix
    (rows: true class, columns: predicted class). A pure function of the counts.

    Per-class accuracy is the share of a class's images predicted as that class (= its recall).
    A ratio whose denominator is 0 (a class never predicted: precision; a class with no images: recall)
    is 0, as scikit-learn's zero_division=0. The macro averages are unweighted means over the classes that
    occur among the true labels or the predictions (scikit-learn's default label set), so training
    classes absent from the validation split and never predicted do not pull them down."""
    m = torch.as_tensor(confusion, dtype=torch.float64)
    if m.dim() != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"a confusion matrix is square, got shape {tuple(m.shape)}")
    n = m.shape[0]
    names = list(classes) if classes is not None else [str(i) for i in range(n)]
    tp, support, predicted = m.diagonal(), m.sum(dim=1), m.sum(dim=0)

    def ratio(num, den):
        return torch.where(den > 0, num / den.clamp(min=1e-300), torch.zeros_like(num))

    precision, recall = ratio(tp, predicted), ratio(tp, support)
    f1 = ratio(2 * precision * recall, precision + recall)
    present = (support > 0) | (predicted > 0)
    k = int(present.sum())

    def macro(values):
        return float(values[present].sum() / k) if k else 0.0

    per_class = [{"class": names[i], "images": int(support[i]), "predicted": int(predicted[i]),
                  "accuracy": float(recall[i]), "precision": float(precision[i]), "recall": float(recall[i]),
                  "f1": float(f1[i])} for i in range(n)]
    return {"per_class": per_class,
            "macro": {"accuracy": macro(recall), "precision": macro(precision), "recall": macro(recall),
                      "f1": macro(f1), "classes": k}}


def write_confusion_csv(path: Path, confusion, classes: list[str]) -> None:
    rows = torch.as_tensor(confusion).tolist()
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["true \\ predicted", *classes])
        for name, row in zip(classes, rows):
            writer.writerow([name, *row])


def confusion_title(weights: str, kind: str, size: int, top1: float) -> str:
    """The PNG's title: which weights (EMA ones said so: `kind` is read_weights's words), size and top-1."""
    ema = " (EMA weights)" if "EMA" in kind else ""
    return f"{weights}{ema} at {size} px: top-1 {top1:.2f}%"


def write_confusion_png(path: Path, confusion, classes: list[str], title: str) -> None:
    """A heat map of the row-normalised matrix (each true class's images sum to 1), counts in the cells
    when there are few classes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = torch.as_tensor(confusion, dtype=torch.float64)
    share = (m / m.sum(dim=1, keepdim=True).clamp(min=1)).numpy()
    n = len(classes)
    side = min(4 + 0.25 * n, 30)
    fig, ax = plt.subplots(figsize=(side, side))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class's images")
    ticks = range(n)
    ax.set_xticks(ticks, classes, rotation=90, fontsize=max(4, 10 - n // 15))
    ax.set_yticks(ticks, classes, fontsize=max(4, 10 - n // 15))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if share[i, j] > 0.5 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- the command ----------------------------------------------------------------------------------------

PNG_MAX_CLASSES = 100


def parse_sizes(text: str | None) -> list[int] | None:
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")]
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise UserError(f"--sizes takes comma-separated whole numbers (e.g. 224,256,288), got {text!r}") from None
    if not sizes or any(s < 1 for s in sizes):
        raise UserError(f"--sizes takes positive sizes, got {text!r}")
    if len(set(sizes)) != len(sizes):
        raise UserError(f"--sizes names a size twice: {text!r}")
    return sizes


def read_weights(path: Path, ema: bool) -> tuple[dict, dict | None, str]:
    """(state dict, the checkpoint's saved recipe or None, what the weights are in words)."""
    loaded = read_weights_file(path)
    if "model" in loaded and isinstance(loaded["model"], dict):  # one of our checkpoints
        recipe = loaded.get("recipe")
        if ema:
            if loaded.get("ema") is None:
                raise UserError(f"{path} holds no EMA weights (the run had ema_decay 0); drop --ema")
            # torch.optim.swa_utils.AveragedModel: the model under "module.", and its step count
            state = {k.removeprefix("module."): v for k, v in loaded["ema"].items() if k != "n_averaged"}
            return state, recipe, "checkpoint (EMA weights)"
        return loaded["model"], recipe, "checkpoint"
    if ema:
        raise UserError(f"{path} is a plain state dict, not a checkpoint of ours: it has no EMA weights; drop --ema")
    if not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise UserError(f"{path} is neither a checkpoint of ours (no 'model') nor a state dict of tensors")
    return loaded, None, "torchvision state dict"


def run(args: argparse.Namespace) -> dict:
    # the door: the configuration resolved once, over the weights' recipe, before the process group and the
    # device exist; the device is the resolved machine's (a preset's [machine] device too)
    sizes = parse_sizes(args.sizes)
    args.weights = pretrained.file_or_named(args.weights, args.arch)  # a file, or torchvision's weights by name
    state, saved, kind = read_weights(args.weights, args.ema)
    base = resolve(saved=saved).recipe if saved else None
    found = arch_of_weights(state)  # the weights say which architecture they are: ours and torchvision's alike
    if found is not None and args.arch is not None and args.arch != found:
        raise UserError(f"--arch {args.arch} does not fit {args.weights}: it holds {found} weights; drop --arch "
                        "(the weights say which architecture they are)")
    if found is not None:
        base = with_fields(base, arch=found)
    # the weights' recipe (and arch) < presets < flags; --weights here names what is evaluated, not the recipe's
    # starting weights (its `weights` field)
    config = resolve({**vars(args), "weights": None}, saved=base)
    env = init_distributed(config.machine.device)
    say = (lambda text: print(text, flush=True)) if env.is_main else (lambda text: None)
    recipe, machine = config.recipe, config.machine.for_device(env.device.type)  # --loader auto made concrete
    if not REGISTRY[machine.loader].reads_images:
        raise UserError(f"--loader {machine.loader} has random labels: choose one of "
                        f"{', '.join(kinds(reads_images=True))} to evaluate")
    if sizes:
        for size in sizes:  # every size's recipe is checked before the first evaluation
            with_fields(recipe, val_image_size=size)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot write to {args.out} ({exc.strerror}); pass a writable --out") from None
    classes = list(classes_of(args.data))  # class folders or shards
    num_classes = len(classes)
    spec = recipe.model
    model, _ = recipe_model(spec, num_classes)  # the training step's model: arch, BlurPool
    load_state(model, state, args.weights, replace_classifier=False,
               fit=f"the weights must be a {spec.arch} (set --arch for a torchvision state dict) for the "
                   f"{num_classes} classes of --data's train/ folder")
    model = model.to(env.device, memory_format=memory_format(recipe.precision)).eval()
    amp_dtype = autocast_dtype(recipe.precision.amp, recipe.precision.amp_dtype, env.device)
    say(f"evaluating {args.weights} ({kind}, {spec.arch}{', blurpool' if spec.blurpool else ''}) on "
        f"{args.data}/val: {num_classes} classes, loader {machine.loader}, {env.world_size} process{'es' if env.world_size != 1 else ''}")

    results, matrices = [], []  # the matrices go to CSV files, not eval.json (1000 x 1000 for ImageNet)
    for size in sizes or [recipe.augmentation.val_size]:
        sized = with_fields(recipe, val_image_size=size)
        # preflight "split": only val/ is read, so only its bad files stop (and are named), never train/'s
        loader = build_split(sized, machine, machine.loader, "val", args.data, env, args.manifest, preflight="split")
        confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=env.device)
        started = time.perf_counter()
        scores = evaluate(model, loader, amp_dtype, flip=sized.augmentation.val_flip, confusion=confusion)
        confusion = all_reduce_sum(confusion).cpu()
        elapsed = time.perf_counter() - started
        if int(confusion.sum()) != scores["val/count"]:
            raise RuntimeError(f"confusion matrix holds {int(confusion.sum())} images, val/count {scores['val/count']}")
        metrics = class_metrics(confusion, classes)
        results.append({"image_size": size, "resize_ratio": sized.augmentation.val_resize_ratio,
                        "resize_to": sized.augmentation.val_resize_to,  # what every loader applies
                        "top1": scores["val/top1"], "top5": scores["val/top5"], "loss": scores["val/loss"],
                        **scores, **metrics, "wall_s": round(elapsed, 3)})
        matrices.append(confusion)
        say(f"size {size}: top-1 {scores['val/top1']:.2f}%  top-5 {scores['val/top5']:.2f}%  loss "
            f"{scores['val/loss']:.4f}  macro F1 {metrics['macro']['f1']:.4f}  on {scores['val/count']} images "
            f"({elapsed:.1f} s)")

    report = {"weights": str(args.weights), "weights_kind": kind, "arch": spec.arch, "blurpool": spec.blurpool,
              "data": display(args.data), "loader": machine.loader, "world_size": env.world_size,
              "val_flip": recipe.augmentation.val_flip, "amp_dtype": str(amp_dtype).removeprefix("torch.")
              if amp_dtype else None, "classes": classes}
    if env.is_main:
        for result, confusion in zip(results, matrices):
            stem = "confusion" if sizes is None else f"confusion_{result['image_size']}"
            write_confusion_csv(args.out / f"{stem}.csv", confusion, classes)
            result["confusion_csv"] = f"{stem}.csv"
            if num_classes <= PNG_MAX_CLASSES:
                write_confusion_png(args.out / f"{stem}.png", confusion, classes,
                                    confusion_title(args.weights.name, kind, result["image_size"], result["top1"]))
                result["confusion_png"] = f"{stem}.png"
        if sizes is None:
            report.update(results[0])
        else:
            report.update({"val/count": results[0]["val/count"], "sizes": results})
        # one line, as metrics.jsonl's records: line-oriented tools (grep, jq -c, shell helpers) read it whole
        (args.out / "eval.json").write_text(json.dumps(report) + "\n")
        say(f"wrote {args.out / 'eval.json'} and the confusion matri{'x' if sizes is None else 'ces'}")
    return report


def main(argv=None) -> None:
    code = 0
    try:
        run(parse_args(argv))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        code = 2
    finally:
        shutdown()
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
