"""Which loader should I use here? Each loader's speed against DALI's, and an answer drawn from the figures.

Nothing here knows which loader "should" win: the answer ranks what was measured on this machine, says which
loaders are within noise of the fastest (benchmarks.noise, the report's one rule), and which of them keep the
model fed (their verdict). A loader whose end to end stands above the ceiling beyond the noise (verdict
"measurement error") is left out of the ranking: a broken figure is never a winner.
"""

from __future__ import annotations

from benchmarks.noise import WITHIN, busy, compare, windows
from benchmarks.verdict import MEASUREMENT_ERROR

FED = ("GPU-bound", "compute-bound")  # the verdicts of a loader that keeps the model busy


def ratios_to_dali(results: list[dict]) -> dict | None:
    """Each measured loader's img/s over DALI's, per mode (loader, train). DALI is the GPU pipeline when it
    was measured, else DALI's CPU pipeline; None when neither was."""
    by = {(r["mode"], r["loader"]): r for r in results if r["mode"] != "synthetic"}
    measured = {loader for _, loader in by}
    reference = next((name for name in ("dali", "dali-cpu") if name in measured), None)
    if reference is None:
        return None
    loaders, words = {}, {}
    for name in sorted(measured - {reference}):
        pairs = {mode: compare(windows(by[(mode, name)]), windows(by[(mode, reference)]))
                 for mode in ("loader", "train") if (mode, name) in by and (mode, reference) in by}
        if pairs:
            loaders[name] = {mode: pair["ratio"] for mode, pair in pairs.items()}
            words[name] = {mode: pair["word"] for mode, pair in pairs.items()}
    # words: "faster", "slower" or "within noise" than the reference, by the report's one rule
    return {"reference": reference, "loaders": loaders, "words": words}


def _names(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def recommend(results: list[dict], verdicts: dict, to_dali: dict | None, device_type: str,
              world_size: int) -> dict | None:
    """The fastest loader end to end (or alone, without a train-mode measurement), its ties, the loaders that
    keep the model fed, and a paragraph saying so with the figures."""
    basis = next((mode for mode in ("train", "loader") if any(r["mode"] == mode for r in results)), None)
    if basis is None:
        return None
    rows = {r["loader"]: r for r in results if r["mode"] == basis}
    broken = [name for name in rows if basis == "train"
              and verdicts.get(name, {}).get("verdict") == MEASUREMENT_ERROR]
    speeds = {name: row["img_per_s"] for name, row in rows.items() if name not in broken}
    if not speeds:
        return {"basis": basis, "fastest": None, "img_per_s": {}, "within_noise": [], "keeps_model_fed": [],
                "not_ranked": broken, "text": f"No loader is ranked: every end-to-end figure ({_names(broken)}) "
                                              "stands above the ceiling beyond the noise, a measurement error."}
    ranked = sorted(speeds, key=speeds.get, reverse=True)
    best = ranked[0]
    against = {name: compare(windows(rows[name]), windows(rows[best])) for name in ranked[1:]}
    ties = [name for name in ranked[1:] if against[name]["word"] == WITHIN]
    device = f"{world_size} GPU{'s' if world_size > 1 else ''}" if device_type == "cuda" \
        else f"the CPU, {world_size} process{'es' if world_size > 1 else ''}"
    what = "end to end (feeding the training step)" if basis == "train" else "alone (loader mode, no model)"
    text = [f"On this machine ({device}), {best} is the fastest loader {what}: {speeds[best]:,.0f} img/s."]
    if ties:
        noises = [against[n]["noise"] for n in ties if against[n]["noise"] is not None]
        how = f"within noise of it (the rounds' spread, up to {max(noises):.0%})" if noises else \
            "within noise of it (one round: the noise is unknown, so no difference counts)"
        text.append(f"{_names([f'{n} ({speeds[n]:,.0f})' for n in ties])} {'is' if len(ties) == 1 else 'are'} "
                    f"{how}: any of them will do.")
    if broken:
        text.append(f"Not ranked: {_names(broken)}, whose end to end stands above the ceiling beyond the noise "
                    "(a measurement error; its verdict below says so).")
    disturbed = [name for name in ranked if busy(rows[name])]
    if disturbed:
        were = "was" if len(disturbed) == 1 else "were"
        text.append(f"Other work ran on the machine while {_names(disturbed)} {were} measured (the report's first "
                    "lines say what): take this ranking with low confidence.")
    fed = []
    if basis == "train":
        fed = [name for name in ranked if verdicts.get(name, {}).get("verdict") in FED]
        ratio = verdicts.get(best, {}).get("ratio_to_synthetic")
        ceiling = f" ({ratio:.0%} of the synthetic-data ceiling)" if ratio is not None else ""
        if best in fed:
            others = [name for name in fed if name != best and name not in ties]
            text.append(f"{best} keeps the model fed{ceiling}, so a faster loader would not train faster here"
                        + (f"; so do {_names(others)}, which would do as well." if others else "."))
        elif verdicts.get(best, {}).get("verdict") == "input-bound":
            stall = verdicts[best].get("stall_fraction")
            text.append(f"Even {best} leaves the model waiting for input"
                        + (f" ({stall:.0%} of the step)" if stall is not None else "") + f"{ceiling}: every loader "
                        "measured is the bottleneck here; its verdict below lists what to change.")
        elif verdicts.get(best, {}).get("verdict") == "contended":
            text.append(f"{best} never leaves the model waiting, but its own work slows the step{ceiling}; its "
                        "verdict below says what to change.")
        elif verdicts.get(best, {}).get("verdict") == "within noise":
            text.append(f"Whether {best} keeps the model fed is within noise{ceiling}: more --steps and "
                        "--repeats will tell.")
        else:
            text.append(f"{best} comes close to keeping the model fed{ceiling}.")
    else:
        text.append("These are loader-mode figures only: measure --modes synthetic,loader,train to see which "
                    "loaders keep the model fed.")
    if to_dali and to_dali["loaders"]:
        mode = basis if any(basis in pair for pair in to_dali["loaders"].values()) else "loader"
        ranked_pairs = sorted(((pair[mode], name) for name, pair in to_dali["loaders"].items() if mode in pair),
                              reverse=True)
        parts = [f"{name} {ratio:.2f}x" + (f" ({to_dali['words'][name][mode]})"
                                           if to_dali["words"][name][mode] == WITHIN else "")
                 for ratio, name in ranked_pairs]
        if parts:
            text.append(f"Against {to_dali['reference']} ({'end to end' if mode == 'train' else 'loader mode'}): "
                        f"{', '.join(parts)}.")
    if device_type != "cuda":
        text.append("On the CPU the loader and the model share the same cores: this ranks the loaders for CPU "
                    "runs; run the harness on the GPU machine to choose for it.")
    return {"basis": basis, "fastest": best, "img_per_s": {name: speeds[name] for name in ranked},
            "within_noise": ties, "keeps_model_fed": fed, "not_ranked": broken, "text": " ".join(text)}
