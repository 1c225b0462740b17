"""Deployment files: docker-compose.yml checked against the Compose Specification's JSON schema (no docker
engine here) and against the commands docs/usage.md shows; the hardware presets and their LR consequence; the SLURM
batch script's syntax and its preemption path (with stand-ins for srun, torchrun, scancel and scontrol)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import jsonschema  # the test extra (setup.cfg): a real validator for the Compose Specification's schema
import pytest
import yaml

from rn50.config.recipe import Recipe, flat_items, resolve, read_preset

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
SCHEMA = Path(__file__).parents[1] / "data" / "compose-spec.json"
SBATCH = ROOT / "tools" / "slurm" / "rn50.sbatch"

# ---------------------------------------------------------------------------------------------------------
# Compose: interpolation as Compose does it, then the official schema


class InterpolationError(ValueError):
    pass


# $$ (a literal $), ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?err}, ${NAME?err}, ${NAME:+alt},
# ${NAME+alt}, $NAME. Defaults may not themselves hold ${...} here (Compose allows that; this file has none).
_TOKEN = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<invalid>))"
)


def interpolate_string(text: str, env: dict[str, str]) -> str:
    def replace(match: re.Match) -> str:
        if match.group("escaped") is not None:
            return "$"
        if match.group("invalid") is not None:
            raise InterpolationError(f"invalid interpolation format in {text!r} at {match.start()}")
        name = match.group("braced") or match.group("named")
        op, arg = match.group("op"), match.group("arg") or ""
        value = env.get(name)
        unset_or_empty = not value
        if op in (":-", "-"):
            if (op == ":-" and unset_or_empty) or (op == "-" and value is None):
                return arg
            return value
        if op in (":?", "?"):
            if (op == ":?" and unset_or_empty) or (op == "?" and value is None):
                raise InterpolationError(f"required variable {name} is missing a value: {arg}")
            return value
        if op in (":+", "+"):
            present = not unset_or_empty if op == ":+" else value is not None
            return arg if present else ""
        return value or ""  # an unset variable is an empty string (Compose warns)

    return _TOKEN.sub(replace, text)


def interpolate(node, env: dict[str, str]):
    """Compose interpolates every string value of the file (keys stay as written)."""
    if isinstance(node, dict):
        return {key: interpolate(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate(item, env) for item in node]
    if isinstance(node, str):
        return interpolate_string(node, env)
    return node


def load_compose(env: dict[str, str] | None = None) -> dict:
    # safe_load resolves YAML merge keys (`<<: *rn50`), as Compose's loader does
    raw = yaml.safe_load(COMPOSE.read_text())
    return interpolate(raw, env or {})


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose()


def test_vendored_schema_is_the_upstream_file():
    """tests/data/README.md names the upstream commit and the file's sha256: the copy is unmodified."""
    digest = hashlib.sha256(SCHEMA.read_bytes()).hexdigest()
    assert digest in (SCHEMA.parent / "README.md").read_text()


@pytest.fixture(scope="module")
def compose_validator():
    schema = json.loads(SCHEMA.read_text())
    # the schema declares draft-07 ("$schema": ".../draft-07/schema", without the "#" that would let
    # jsonschema recognise it), so name the draft
    assert "draft-07" in schema["$schema"]
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def test_interpolation_follows_compose_rules():
    env = {"SET": "x", "EMPTY": ""}
    assert interpolate_string("${SET:-d} ${EMPTY:-d} ${UNSET:-d}", env) == "x d d"
    assert interpolate_string("${SET-d} ${EMPTY-d} ${UNSET-d}", env) == "x  d"
    assert interpolate_string("${SET:+a}|${EMPTY:+a}|${EMPTY+a}|${UNSET+a}", env) == "a||a|"
    assert interpolate_string("$SET ${SET} $$SET $$(date) a$$b", env) == "x x $SET $(date) a$b"
    with pytest.raises(InterpolationError):
        interpolate_string("${UNSET:?set it}", env)
    with pytest.raises(InterpolationError):
        interpolate_string("cost: $5", env)


def test_compose_file_is_valid_against_the_compose_specification(compose, compose_validator):
    errors = sorted(compose_validator.iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)
    # also with the variables a user sets
    custom = load_compose({"IMAGENET_DIR": "/data/imagenet", "NPROC": "4", "RUN_NAME": "try2"})
    compose_validator.validate(custom)


def test_the_schema_rejects_what_compose_would_reject(compose, compose_validator):
    """The check has teeth: a misspelt key or a wrongly typed value fails validation."""
    bad_key = json.loads(json.dumps(compose))
    bad_key["services"]["train"]["ipc_mode"] = "host"
    bad_type = json.loads(json.dumps(compose))
    bad_type["services"]["bench"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] = "gpu"
    for document in (bad_key, bad_type):
        with pytest.raises(jsonschema.ValidationError):
            compose_validator.validate(document)


def parse_volume(spec) -> dict:
    """Short syntax SOURCE:TARGET[:MODE] or the long syntax, as {source, target, read_only}."""
    if isinstance(spec, dict):
        return {"source": spec.get("source"), "target": spec["target"], "read_only": bool(spec.get("read_only"))}
    parts = spec.split(":")
    source, target, mode = (parts + [""])[:3] if len(parts) >= 2 else (None, parts[0], "")
    return {"source": source, "target": target, "read_only": "ro" in mode.split(",")}


@pytest.mark.parametrize("name", ["train", "bench"])
def test_service_reserves_every_gpu_and_mounts_data_read_only(compose, name):
    service = compose["services"][name]
    assert service["build"]["dockerfile"] == "docker/Dockerfile"
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and d.get("count") == "all" and "gpu" in d.get("capabilities", [])
               for d in devices), devices
    assert service["ipc"] == "host"
    assert service["ulimits"]["memlock"] == -1
    assert service["ulimits"]["stack"] > 0
    volumes = {v["target"]: v for v in map(parse_volume, service["volumes"])}
    assert volumes["/data/imagenet"]["read_only"] is True
    assert volumes["/data/imagenet"]["source"] == "./data/imagenet"  # ${IMAGENET_DIR:-./data/imagenet}
    assert volumes["/workspace/rn50/runs"]["read_only"] is False
    # the command's run folder is relative to the image's WORKDIR, inside the writable mount
    workdir = re.search(r"^WORKDIR\s+(\S+)", (ROOT / "docker/Dockerfile").read_text(), re.M).group(1)
    out = re.search(r"--out\s+(\S+)", command_line(service["command"])).group(1)
    assert str(Path(workdir) / out).startswith("/workspace/rn50/runs/")


def command_line(command) -> str:
    """A service's command as one would type it: `bash -c 'exec X'` is X."""
    if isinstance(command, str):
        words = command
    elif command[:2] == ["bash", "-c"]:
        words = command[2]
    else:
        words = " ".join(command)
    return re.sub(r"^exec\s+", "", " ".join(words.split()))


def normalise(text: str) -> str:
    return " ".join(text.replace("\\\n", " ").split())


@pytest.mark.parametrize("name", ["train", "bench"])
def test_service_commands_are_the_documented_commands(compose, name):
    line = command_line(compose["services"][name]["command"])
    assert line.startswith("torchrun --standalone --nproc-per-node 8 ")  # NPROC defaults to 8
    if name == "train":  # a dead worker restarts the group, which resumes by itself (MAX_RESTARTS defaults to 3)
        assert "--max-restarts 3 -m rn50.train" in line
    usage = ROOT / "docs" / "usage.md"  # its Docker section
    assert line in normalise(usage.read_text()), f"docs/usage.md does not show {line!r}"


def test_dockerfile_keeps_the_container_builds_and_adds_the_harness_dependencies():
    text = (ROOT / "docker/Dockerfile").read_text()
    assert re.search(r"^FROM\s+\$\{BASE_IMAGE\}", text, re.M) and "nvcr.io/nvidia/pytorch:" in text
    runs = " ".join(text.replace("\\\n", " ").split())
    assert "pip install --no-cache-dir --no-deps -e ." in runs
    installed = re.search(r"pip install --no-cache-dir -c \S+ ([^&]+)", runs).group(1).split()
    assert {"nvidia-ml-py", "matplotlib", "scipy"} <= set(installed)


# ---------------------------------------------------------------------------------------------------------
# Hardware presets

PRESETS = {  # name: (intended processes in all, documented peak LR, per-GPU batch)
    "rtx3090x4": (4, 0.3, 192),
    "a100x8": (8, 0.8, 256),
    "h100x8": (8, 0.8, 256),
}


@pytest.mark.parametrize("name", PRESETS)
def test_preset_loads_and_gives_the_documented_peak_lr(name):
    gpus, peak, batch = PRESETS[name]
    recipe = resolve({"preset": name}).recipe
    assert recipe.optimisation.batch_size == batch
    assert recipe.optimisation.peak_lr(gpus) == pytest.approx(peak)
    assert recipe.optimisation.peak_lr(gpus) == pytest.approx(0.1 * batch * gpus / 256)
    # the rest is the 90-epoch recipe: a hardware preset changes no hyperparameter beyond the batch
    from dataclasses import replace

    assert recipe == replace(Recipe(), optimisation=replace(Recipe().optimisation, batch_size=batch))
    text = (ROOT / "rn50" / "presets" / f"{name}.toml").read_text()
    assert text.startswith("#"), "a preset begins with the reasoning for its values"
    assert f"--preset {name}" in text


def test_hardware_decoder_settings():
    assert resolve({"preset": "rtx3090x4"}).machine.hw_decoder_load == 0.0  # GA102 has no hardware JPEG decoder
    assert resolve({"preset": "h100x8"}).machine.hw_decoder_load == 0.9  # docs/design.md: best of 0 / 0.65 / 0.9 on one H100
    assert resolve({"preset": "h100x8"}).machine.dali_threads == 8
    assert 0.0 < resolve({"preset": "a100x8"}).machine.hw_decoder_load < 1.0


REFERENCE = ROOT / "docs" / "reference.md"  # generated by rn50/config/reference.py; tests/unit/test_reference.py keeps it current


def documented_tables() -> tuple[dict[str, object], dict[str, dict[str, object]]]:
    """docs/reference.md: the default of every field (its `## section` tables: `| `field` | flag | type |
    `default` | meaning |`), and per preset (a `### `name`` heading) the `| `field` | `value` | default |` rows
    of the values it sets."""
    defaults, presets, current = {}, {}, None
    for line in REFERENCE.read_text().splitlines():
        heading = re.match(r"^(##+)\s+`?(\w+)`?", line)
        if heading:
            current = heading.group(2) if heading.group(1) == "###" else None
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        name = re.match(r"^`(\w+)`", cells[0]) if cells else None
        if not name:
            continue
        if current is None and len(cells) == 5:
            defaults[name.group(1)] = json.loads(cells[3].strip("`"))
        elif current is not None and len(cells) == 3:
            presets.setdefault(current, {})[name.group(1)] = json.loads(cells[1].strip("`"))
    return defaults, presets


@pytest.mark.parametrize("name", PRESETS)
def test_docs_show_the_resolved_recipe(name):
    """The reference's defaults with the preset's rows over them are what resolve gives."""
    defaults, presets = documented_tables()
    rows = presets.get(name)
    assert rows, f"docs/reference.md has no table for the preset {name}"
    assert set(rows) == set(read_preset(name)), "the reference lists exactly the fields the preset sets"
    preset = resolve({"preset": name})
    # by flat name, tuples as lists, as the tables show
    resolved = json.loads(json.dumps({**flat_items(preset.recipe), **preset.machine.to_dict()}))
    assert set(defaults) == set(resolved), "the reference has a default for every field"
    table = {**defaults, **rows}
    wrong = {k: (v, resolved[k]) for k, v in table.items() if resolved[k] != v}
    assert not wrong, f"docs/reference.md differs from resolve({{'preset': {name!r}}}) (documented, actual): {wrong}"


# ---------------------------------------------------------------------------------------------------------
# SLURM batch script

bash = shutil.which("bash")
needs_bash = pytest.mark.skipif(bash is None, reason="bash is not installed")


@needs_bash
def test_sbatch_script_parses():
    result = subprocess.run([bash, "-n", str(SBATCH)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    text = SBATCH.read_text()
    for directive in ("--ntasks-per-node=1", "--gpus-per-node=8", "--signal=B:USR1@180", "--requeue",
                      "--cpus-per-task="):
        assert f"#SBATCH {directive}" in text


FAKES = {
    # srun: drop srun's own options, run the task (here: one node's torchrun) in this process
    "srun": '#!/bin/bash\necho "srun $*" >> "$FAKE_LOG"\nwhile [ "${1#-}" != "$1" ]; do shift; done\nexec "$@"\n',
    # torchrun: note the arguments, run until SIGTERM, then exit 1 as torchrun does after a forwarded SIGTERM
    # (the trap is set before the pid file appears: the test signals as soon as it sees the file)
    "torchrun": ('#!/bin/bash\necho "torchrun $*" >> "$FAKE_LOG"\n'
                 'trap \'echo "torchrun got TERM" >> "$FAKE_LOG"; sleep "${FAKE_SAVE_S:-0}"; exit 1\' TERM\n'
                 'echo $$ > "$FAKE_DIR/torchrun.pid"\n'
                 'if [ -n "${FAKE_EXIT:-}" ]; then exit "$FAKE_EXIT"; fi\n'
                 'while true; do sleep 0.05 & wait $!; done\n'),
    # scancel --signal=TERM JOBID: SIGTERM to every job step (here: the one torchrun)
    "scancel": '#!/bin/bash\necho "scancel $*" >> "$FAKE_LOG"\nkill -TERM "$(cat "$FAKE_DIR/torchrun.pid")"\n',
    "scontrol": ('#!/bin/bash\necho "scontrol $*" >> "$FAKE_LOG"\n'
                 'if [ "$1 $2" = "show hostnames" ]; then printf "gpu-a\\ngpu-b\\n"; fi\n'),
}


def run_sbatch(tmp_path: Path, usr1: bool, **env) -> tuple[int, list[str]]:
    fakes = tmp_path / "bin"
    fakes.mkdir()
    for name, body in FAKES.items():
        (fakes / name).write_text(body)
        (fakes / name).chmod(0o755)
    log = tmp_path / "log"
    log.touch()
    full_env = {**os.environ, "PATH": f"{fakes}{os.pathsep}{os.environ['PATH']}", "FAKE_LOG": str(log),
                "FAKE_DIR": str(tmp_path), "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "rn50-test",
                "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu-[a-b]", "SLURM_CPUS_PER_TASK": "64",
                "DATA": "/shared/imagenet", **env}
    job = subprocess.Popen([bash, str(SBATCH), "--checkpoint-every", "500"], cwd=tmp_path, env=full_env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        if usr1:
            deadline = time.time() + 20
            while not (tmp_path / "torchrun.pid").exists():
                assert time.time() < deadline and job.poll() is None, "torchrun never started"
                time.sleep(0.02)
            job.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@180 does: the batch shell only
        output = job.communicate(timeout=30)[0]
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
        if (tmp_path / "torchrun.pid").exists():  # never leave the stand-in running
            try:
                os.kill(int((tmp_path / "torchrun.pid").read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
    return job.returncode, log.read_text().splitlines() + ["--- output ---"] + output.splitlines()


@needs_bash
@pytest.mark.parametrize("save_s", ["0", "0.5"])  # workers exit at once, or after writing a checkpoint
def test_sbatch_usr1_stops_training_with_sigterm_and_requeues(tmp_path, save_s):
    code, lines = run_sbatch(tmp_path, usr1=True, FAKE_SAVE_S=save_s)
    text = "\n".join(lines)
    torchrun = next(line for line in lines if line.startswith("torchrun "))
    for part in ("--nnodes 2", "--nproc-per-node 8", "--rdzv-backend c10d", "--rdzv-endpoint gpu-a:29500",
                 "--rdzv-id 4242", "-m rn50.train", "--data /shared/imagenet", "--out runs/rn50-test",
                 "--resume auto", "--preset h100x8", "--hang-timeout", "--checkpoint-every 500"):
        assert part in torchrun, f"{part!r} not in {torchrun!r}"
    assert "scancel --signal=TERM 4242" in text  # SIGTERM through SLURM, never to srun itself
    assert "torchrun got TERM" in text
    assert "scontrol requeue 4242" in text, text
    assert code == 1  # torchrun's exit code after a forwarded SIGTERM


@needs_bash
def test_sbatch_without_a_stop_signal_does_not_requeue(tmp_path):
    code, lines = run_sbatch(tmp_path, usr1=False, FAKE_EXIT="0", PRESET="a100x8")
    assert code == 0
    assert not any("requeue" in line for line in lines if line.startswith("scontrol"))
    assert any("--preset a100x8" in line for line in lines if line.startswith("torchrun "))
