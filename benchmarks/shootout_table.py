"""The loader shootout's words: where a run came from (versions, CPU, commit), what its data set is, and its
Markdown table (benchmarks/shootout.py writes and prints it; docs/benchmarks.md records one)."""

from __future__ import annotations

import os
import platform
import statistics
from pathlib import Path

from benchmarks.text import count, num
from benchmarks.threads import machine_cores


def cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def environment() -> dict:
    """Versions, the CPU and the commit (rn50.system.provenance's, with Pillow, NumPy and the CPU's model)."""
    import numpy
    import PIL

    from rn50.system.provenance import environment as provenance

    env = provenance()
    return {"torch": env["torch"], "torchvision": env["torchvision"], "dali": env["dali"], "pillow": PIL.__version__,
            "numpy": numpy.__version__, "python": env["python"], "cpu_model": cpu_model(), "cores": machine_cores(),
            "git_commit": env["git_commit"], "git_dirty": env["git_dirty"], "hostname": env["hostname"]}


def describe_data(data: Path, made: bool) -> dict:
    """The training images' count, classes, bytes and pixels (from the JPEG headers: no decoding)."""
    from PIL import Image

    from pipelines.folder import list_split

    files = list_split(str(data), "train").files
    sizes, pixels, short = [], [], []
    for path in files:
        with Image.open(path) as image:
            pixels.append(image.width * image.height)
            short.append(min(image.size))
        sizes.append(os.path.getsize(path))
    return {"path": str(data), "made_by": "tools.make_dataset --photo-like" if made else "given (--data)",
            "images": len(files), "classes": len({Path(f).parent.name for f in files}),
            "mean_kb": round(statistics.fmean(sizes) / 1e3, 1), "bytes_per_pixel": round(sum(sizes) / sum(pixels), 3),
            "mean_pixels": round(statistics.fmean(pixels)), "short_side": [min(short), max(short)]}


def markdown(report: dict) -> str:
    """The table, rows by CPU time per image (failed rows after), and the run's provenance under it."""
    ok = sorted((r for r in report["rows"] if r["status"] == "ok"), key=lambda r: r["cpu_ms_per_img"])
    lines = ["| row | CPU ms per image (median) | CPU ms min-max | x bound:decode | img/s median | img/s min-max "
             "| images x rounds |", "|---|---|---|---|---|---|---|"]
    for r in ok:
        lines.append(f"| `{r['name']}` | {r['cpu_ms_per_img']:.2f} | {r['cpu_ms_per_img_min']:.2f}-"
                     f"{r['cpu_ms_per_img_max']:.2f} | {num(r.get('cpu_vs_decode'), '{:.2f}x')} | "
                     f"{r['median_img_per_s']:.0f} | {r['min']:.0f}-{r['max']:.0f} | {r['images_per_round']} x {r['rounds']} |")
    lines += [f"| `{r['name']}` | failed: {r['reason']} | | | | | |" for r in report["rows"] if r["status"] != "ok"]
    env, data, settings = report["environment"], report["data"], report["settings"]
    bound = next((r for r in ok if r.get("decoder")), None)
    lines += [
        "",
        f"Task: RandomResizedCrop {settings['image_size']} + flip + normalise to fp16 batches of "
        f"{settings['batch_size']}, {settings['workers']} workers / DALI threads, colour jitter only in +jitter; "
        f"{count(settings['rounds'], 'round')}, {count(settings['warmup_batches'], 'warm-up batch', 'warm-up batches')}, "
        f"one pass of {settings['images']} images per row per round"
        + (f"; bound:decode decodes with {bound['decoder']}" if bound else "") + ".",
        f"Data: {data['images']} images, {data['classes']} classes, {data['mean_kb']} KB and "
        f"{data['bytes_per_pixel']} B/px on average, shorter side {data['short_side'][0]}-{data['short_side'][1]} px "
        f"({data['made_by']}).",
        f"Versions: torch {env['torch']}, torchvision {env['torchvision']}, DALI {env['dali']}, Pillow "
        f"{env['pillow']}, Python {env['python']}; CPU {env['cpu_model']}, {env['cores']} cores; load average "
        f"{', '.join(f'{v:.1f}' for v in env['load_average'])} at the end.",
        f"Commit {env['git_commit']}{' (with uncommitted changes)' if env['git_dirty'] else ''}; "
        f"`OMP_NUM_THREADS={settings['omp_num_threads']} {settings['command']}`, {report['seconds']:.0f} s.",
    ]
    return "\n".join(lines) + "\n"
