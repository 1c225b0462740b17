"""The stopping rules after each epoch, as a pure function of the run's history: target top-1 reached
(time-to-accuracy), no better top-1 for `early_stop_patience` epochs, and the overfitting warning."""

from __future__ import annotations

from rn50.config.recipe import Stopping

OVERFIT_WINDOW = 4  # epochs whose validation-minus-training loss gap must grow at every step


def judge(history: list[dict], rules: Stopping, target_reached_before: bool = False) -> tuple[dict, list[str]]:
    """What to record for the newest epoch (`history[-1]`, with `val/top1`, `val/loss`, `train/loss`, `epoch`,
    `time_s`), and warnings to print. Recorded: `stop` (why the run ends now), `target/time_s` and
    `target/epochs` the first time the target is reached, `warn/overfitting` when the model is getting worse on
    unseen data while it fits the training data better: over the last OVERFIT_WINDOW epochs the validation loss
    rose, it stayed above the training loss, and the gap between them grew at every epoch. A validation loss
    below the training loss (label smoothing, Mixup and augmentation raise the training loss) or one that still
    falls is a healthy run, however the gap moves."""
    record, verdict = history[-1], {}
    top1 = [h["val/top1"] for h in history]
    if rules.target_top1 and record["val/top1"] >= rules.target_top1 and not target_reached_before:
        verdict["stop"] = f"validation top-1 reached the target {rules.target_top1}%"
        verdict["target/time_s"], verdict["target/epochs"] = record["time_s"], record["epoch"]
    best_at = len(top1) - 1 - top1[::-1].index(max(top1))
    if rules.early_stop_patience and len(top1) - 1 - best_at >= rules.early_stop_patience:
        verdict.setdefault("stop", f"no better validation top-1 for {rules.early_stop_patience} "
                                   f"epoch{'s' if rules.early_stop_patience != 1 else ''} "
                                   f"(best {max(top1):.2f}% at epoch {history[best_at]['epoch']})")
    window = history[-OVERFIT_WINDOW:]
    gaps = [h["val/loss"] - h["train/loss"] for h in window]
    if (len(gaps) == OVERFIT_WINDOW and all(b > a for a, b in zip(gaps, gaps[1:])) and gaps[0] > 0
            and window[-1]["val/loss"] > window[0]["val/loss"]):
        verdict["warn/overfitting"] = True
        return verdict, [f"warning: validation loss rose ({window[0]['val/loss']:.3f} -> {window[-1]['val/loss']:.3f}) "
                         f"while the gap above the training loss grew for {OVERFIT_WINDOW - 1} epochs "
                         f"({gaps[0]:.3f} -> {gaps[-1]:.3f}): the model may be overfitting"]
    return verdict, []
