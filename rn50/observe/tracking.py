"""Experiment trackers (`--tracker wandb|mlflow`): one tracker run per training run or benchmark, beside the
run folder's own files (metrics.jsonl, TensorBoard, summary.json, report.json), which stay the record.

- Only the main rank opens a tracker; every other rank gets `NullTracker`.
- The backends are optional extras, imported only when asked for (`pip install -e '.[wandb]'` or
  `'.[mlflow]'`); `check_available` turns a missing one into a UserError at start-up, before any work.
- The tracker run's id is kept in the run folder (`tracker.json`), so a resumed run continues the same
  tracker run.
- A tracker asked for must start: one that cannot (a missing extra, MLflow's refused file store, a server
  that cannot be reached) stops the run at start-up with one line (exit 2), never trains untracked.
- Once started, a tracker never stops training: the first failure (a server gone, a full disk) prints one
  warning and switches that tracker off; the local files are written as before.
- Secrets never leave the machine: environment variables are logged by name only where their names could hold
  one (`*KEY*`, `*TOKEN*`, `*SECRET*`, `*PASSWORD*`, `*CREDENTIAL*`, ...), and only a short list of
  variables that change how a run performs is logged at all.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import uuid
from pathlib import Path

from rn50.config.errors import UserError
from rn50.config.machine import TRACKERS # declared once, with the other machine settings

STATE_FILE = "tracker.json"
EXTRA = {"wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}  # tracker: (module, pip extra)
# Variables that change how a run performs, worth having beside its figures (not the whole environment: it
# holds paths, user names and, too often, secrets)
ENV_PREFIXES = ("CUDA_", "NCCL_", "OMP_", "MKL_", "DALI_", "TORCH_", "PYTORCH_", "NVIDIA_", "SLURM_JOB_",
                "SLURM_NNODES", "SLURM_NTASKS", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "RN50_", "WANDB_MODE",
                "MLFLOW_TRACKING_URI")
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH|COOKIE|SESSION|PRIVATE", re.I)
REDACTED = "<redacted>"
# MLflow's client retries a failed request for minutes by default; a tracker must not hold a training run up
# that long, so fewer and shorter tries unless the user set their own
MLFLOW_ENV_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                       "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def check_available(kind: str) -> None:
    """A UserError, at start-up, when the tracker's extra is not installed, or (MLflow) its tracking URI is
    a store that MLflow refuses (mlflow_store_problem)."""
    if kind in (None, "", "none"):
        return
    if kind not in EXTRA:
        raise UserError(f"unknown tracker {kind!r}; choose one of {', '.join(TRACKERS)}")
    module, extra = EXTRA[kind]
    try:
        __import__(module)
    except ImportError:
        raise UserError(f"--tracker {kind} needs the {extra!r} extra, which is not installed: "
                        f"pip install -e '.[{extra}]' (or pip install {module})") from None
    problem = mlflow_store_problem() if kind == "mlflow" else None
    if problem:
        raise UserError(problem)


def mlflow_store_problem() -> str | None:
    """Why MLflow would refuse its tracking URI, before any work, or None. MLflow 3 refuses its file store (a
    folder: file:///path or a plain path) unless MLFLOW_ALLOW_FILE_STORE=true (it is in maintenance mode), and
    says so in a long message that used to be cut into a warning while the run trained untracked. A local
    SQLite file (sqlite:///path/mlflow.db) keeps everything in one local file and works fully."""
    from urllib.parse import urlparse

    import mlflow

    uri = mlflow.get_tracking_uri()
    parsed = urlparse(uri)
    if parsed.scheme not in ("", "file"):
        return None
    try:
        from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE
    except ImportError:  # MLflow 2 writes its file store without asking
        return None
    if MLFLOW_ALLOW_FILE_STORE.get():
        return None
    folder = Path(parsed.path if parsed.scheme else uri).expanduser().absolute()
    return (f"MLFLOW_TRACKING_URI={uri} is MLflow's file store, which MLflow {mlflow.__version__} refuses "
            f"(maintenance mode); for a local store use MLFLOW_TRACKING_URI=sqlite:///{folder / 'mlflow.db'} "
            "(or a server, http://HOST:5000), or set MLFLOW_ALLOW_FILE_STORE=true to write the folder anyway")


def safe_environment() -> dict:
    """The environment variables that matter for performance, secret-looking ones by name only."""
    return {name: (REDACTED if SECRET_NAME.search(name) else value) for name, value in sorted(os.environ.items())
            if name.startswith(ENV_PREFIXES)}


def flatten(values: dict, prefix: str = "") -> dict:
    """`{"a": {"b": 1}}` -> `{"a/b": 1}`: trackers take flat names; slashes as metrics.jsonl uses them."""
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "/"))
        else:
            flat[name] = value
    return flat


def _warn(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _reason(exc: Exception, limit: int | None = 300) -> str:
    """The exception's type and first line, cut to `limit` characters (None: the whole line)."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:limit]}" if text else type(exc).__name__


@contextlib.contextmanager
def _quiet_retries():
    """urllib3 logs a WARNING for every retry of an HTTP request; a tracker whose server went away would add
    those lines to the job log besides our one warning. Only around our own calls to the tracker."""
    logger = logging.getLogger("urllib3.connectionpool")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class Tracker:
    """The interface both backends implement. Every method is safe to call: a failure warns once and turns the
    tracker off, it never raises into the training loop."""

    kind = "none"

    def __init__(self):
        self.active = True
        self.run_id: str | None = None

    def _guard(self, what: str, call, *args, **kwargs):
        if not self.active:
            return None
        try:
            with _quiet_retries():
                return call(*args, **kwargs)
        except Exception as exc:  # any backend failure: the run goes on without the tracker
            self.active = False
            _warn(f"warning: the {self.kind} tracker failed while {what} ({_reason(exc)}); the run goes on "
                  "without it, and its folder's files stay complete")
            return None

    def log_params(self, params: dict) -> None:
        self._guard("logging parameters", self._log_params, {k: v for k, v in params.items()})

    def log_metrics(self, record: dict, step: int) -> None:
        self._guard(f"logging metrics at step {step}", self._log_metrics, record, step)

    def log_artifacts(self, paths: list[Path]) -> None:
        for path in paths:
            if Path(path).is_file():
                self._guard(f"uploading {Path(path).name}", self._log_artifact, Path(path))

    def close(self, status: str = "FINISHED") -> None:
        """status: FINISHED, FAILED or KILLED (preempted: a resumed run continues it)."""
        self._guard("closing the run", self._close, status)
        self.active = False

    # backends override these
    def _log_params(self, params: dict) -> None: ...
    def _log_metrics(self, record: dict, step: int) -> None: ...
    def _log_artifact(self, path: Path) -> None: ...
    def _close(self, status: str) -> None: ...


class NullTracker(Tracker):
    """No tracker (`--tracker none`, and every rank but the main one)."""

    def __init__(self):
        super().__init__()
        self.active = False


def _numbers(record: dict) -> tuple[dict, dict]:
    """A metrics record split into numbers (bools as 0/1: `warn/overfitting`) and text (`stop`); nulls (an
    img/s an epoch could not measure) are left out, as they are no value."""
    numbers, text = {}, {}
    for name, value in record.items():
        if value is None:
            continue
        if isinstance(value, bool):
            numbers[name] = float(value)
        elif isinstance(value, (int, float)):
            numbers[name] = float(value)
        else:
            text[name] = value if isinstance(value, str) else json.dumps(value)
    return numbers, text


class MlflowTracker(Tracker):
    """MLflow through its client (no global active run): the server is MLFLOW_TRACKING_URI, as MLflow's own
    tools read it; `project` is the experiment; `group` is the tag `rn50.group` (a sweep's folder name)."""

    kind = "mlflow"

    def __init__(self, project: str, name: str, group: str, state: dict | None):
        super().__init__()
        for key, value in MLFLOW_ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)
        import mlflow
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()
        self.uri = mlflow.get_tracking_uri()
        self.logged_params: dict = {}
        self.resumed = False
        if state and state.get("tracking_uri") == self.uri:
            run = self.client.get_run(state["run_id"])  # a resumed run continues its tracker run
            self.run_id, self.resumed = run.info.run_id, True
            self.logged_params = dict(run.data.params)
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            experiment = self.client.get_experiment_by_name(project)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(project)
            tags = {"rn50.group": group} if group else {}
            self.run_id = self.client.create_run(experiment_id, run_name=name, tags=tags).info.run_id

    def state(self) -> dict:
        return {"run_id": self.run_id, "tracking_uri": self.uri}

    def _log_params(self, params: dict) -> None:
        from mlflow.entities import Param, RunTag

        # MLflow's parameters are write-once: a resumed run adds the new ones, and a machine setting that changed
        # on resume (they may) is recorded as a tag `resumed/<name>` instead
        fresh, changed = [], []
        for key, value in params.items():
            text = str(value)[:6000]
            if key not in self.logged_params:
                fresh.append(Param(key, text))
            elif self.logged_params[key] != text:
                changed.append(RunTag(f"resumed/{key}", text))
            self.logged_params.setdefault(key, text)
        for start in range(0, len(fresh), 100):  # the REST API takes at most 100 parameters a call
            self.client.log_batch(self.run_id, params=fresh[start:start + 100])
        if changed:
            self.client.log_batch(self.run_id, tags=changed)

    def _log_metrics(self, record: dict, step: int) -> None:
        import time

        from mlflow.entities import Metric, RunTag

        numbers, text = _numbers(record)
        now = int(time.time() * 1000)
        metrics = [Metric(name, value, now, step) for name, value in numbers.items() if name != "step"]
        self.client.log_batch(self.run_id, metrics=metrics, tags=[RunTag(k, v[:5000]) for k, v in text.items()])

    def _log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def _close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


class WandbTracker(Tracker):
    """Weights & Biases (offline too: WANDB_MODE=offline, then `wandb sync`). Its files go under the run
    folder (RUN/wandb/); `step` is a metric of its own and every other metric is plotted against it, so the
    steps a resumed run logs again (those after its checkpoint) are kept rather than refused by W&B's
    monotonic internal step."""

    kind = "wandb"

    def __init__(self, project: str, name: str, group: str, state: dict | None, run_dir: Path):
        super().__init__()
        import wandb

        self.resumed = bool(state and state.get("run_id"))
        # our own id, kept in tracker.json before the run starts: a resume passes it back to W&B
        run_id = state["run_id"] if self.resumed else uuid.uuid4().hex[:12]
        # console="off": stdout is the job's log, and a second copy of it in W&B adds nothing
        self.run = wandb.init(project=project, name=name, group=group or None, id=run_id, resume="allow",
                              dir=str(run_dir), reinit="create_new",
                              settings=wandb.Settings(console="off", save_code=False))
        self.run_id = self.run.id
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def state(self) -> dict:
        return {"run_id": self.run_id, "project": self.run.project}

    def _log_params(self, params: dict) -> None:
        self.run.config.update(params, allow_val_change=True)

    def _log_metrics(self, record: dict, step: int) -> None:
        numbers, text = _numbers(record)
        self.run.log({**numbers, **text, "step": step})

    def _log_artifact(self, path: Path) -> None:
        # copied into the run's files (the Files tab), which offline mode keeps on disk until `wandb sync`
        self.run.save(str(path), base_path=str(path.parent), policy="now")

    def _close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


def open_tracker(kind: str, run_dir: Path, *, project: str, name: str | None = None, group: str = "",
                 resume: bool = False, enabled: bool = True, say=None, required: bool = True) -> Tracker:
    """The run's tracker (NullTracker for `none` and on every rank but the main one). `resume`: continue the
    tracker run whose id this folder's tracker.json holds (a fresh run otherwise). A tracker that cannot start
    (a server that cannot be reached, a store MLflow refuses) is a UserError naming why, in one whole line,
    so a run never trains untracked; with `required` False (the harness, whose report is written by then)
    one warning and no tracker instead."""
    if not enabled or kind in (None, "", "none"):
        return NullTracker()
    check_available(kind)
    run_dir = Path(run_dir)
    path = run_dir / STATE_FILE
    try:
        saved = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        saved = {}
    state = saved.get(kind) if resume else None
    name = name or run_dir.resolve().name
    try:
        with _quiet_retries():
            tracker = MlflowTracker(project, name, group, state) if kind == "mlflow" else \
                WandbTracker(project, name, group, state, run_dir)
    except Exception as exc:
        if required:
            fix = "MLFLOW_TRACKING_URI and its server" if kind == "mlflow" else "`wandb login`, or WANDB_MODE=offline"
            raise UserError(f"--tracker {kind} could not start ({_reason(exc, None)}); check {fix}, or drop "
                            "--tracker (nothing was trained untracked)") from None
        _warn(f"warning: the {kind} tracker could not start ({_reason(exc, None)}); the files in {run_dir} "
              "are complete")
        return NullTracker()
    saved[kind] = tracker.state()
    try:
        path.write_text(json.dumps(saved, indent=2) + "\n")
    except OSError:
        pass  # the run folder was checked writable at start-up; a resume would only start a new tracker run
    if say and tracker.resumed:
        say(f"{kind}: continuing tracker run {tracker.run_id}")
    return tracker


# --- the hooks of rn50.train and benchmarks.run -------------------------------------------------------

def _param_value(value):
    return list(value) if isinstance(value, tuple) else value


def for_training(recipe, machine, out: Path, env, *, resume: bool, say=None) -> Tracker:
    """rn50.train's tracker (rank 0; NullTracker elsewhere) with its parameters logged: every recipe field and
    machine setting under its flat name (`batch_size`, `loader`), what recipe.json adds to the recipe
    (world_size, global_batch, peak_lr, amp_in_use), the provenance block as `env/...` and the performance
    environment variables as `envvar/NAME`. Called after recipe.json is written."""
    from rn50.system.provenance import environment
    from rn50.config.recipe import flat_items

    tracker = open_tracker(machine.tracker, out, project=machine.tracker_project, group=machine.tracker_group,
                           resume=resume, enabled=env.is_main, say=say)
    if tracker.active:
        saved = json.loads((Path(out) / "recipe.json").read_text())
        run_facts = {k: v for k, v in saved.items() if k not in recipe.to_dict()}
        params = {**{k: _param_value(v) for k, v in flat_items(recipe).items()}, **machine.to_dict(), **run_facts}
        tracker.log_params(run_params(params, environment()))
    return tracker


def run_params(settings: dict, environment: dict) -> dict:
    """Settings by their own names, the provenance block as `env/...`, the performance environment variables
    (secret-looking ones by name only) as `envvar/NAME`."""
    return {**settings, **flatten(environment, "env/"), **{f"envvar/{k}": v for k, v in safe_environment().items()}}


TRAINING_FILES = ("summary.json", "recipe.json", "machine.json", "metrics.jsonl")


def finish_training(tracker: Tracker, out: Path, summary: dict | None, step: int | None) -> None:
    """The end of a finished run: the summary's headline figures as `summary/...` metrics, the run folder's
    summary, recipe, machine settings and metrics as files, and the tracker run closed."""
    if not tracker.active:
        return
    if summary is not None:
        headline = {f"summary/{k}": v for k, v in summary.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)}
        headline.update({f"summary/{k}": v for k, v in flatten(summary.get("final") or {}).items()})
        tracker.log_metrics(headline, step or 0)
    tracker.log_artifacts([Path(out) / name for name in TRAINING_FILES])
    tracker.close("FINISHED")


def bench_metrics(report: dict) -> dict:
    """A harness report's figures under flat names: `<mode>/<loader>/img_per_s` (`synthetic/img_per_s` for the
    ceiling), `.../img_per_s_per_gpu`, `.../mfu`, `.../stall`, the NVML telemetry as `.../gpu/<reading>`,
    the verdict's `.../ratio_to_synthetic` and the 90-epoch estimate as `.../time_to_train_90_epochs_h`."""
    metrics = {}
    for r in report.get("results") or []:
        base = r["mode"] if r["mode"] == r["loader"] else f"{r['mode']}/{r['loader']}"
        metrics[f"{base}/img_per_s"] = r.get("img_per_s")
        metrics[f"{base}/img_per_s_per_gpu"] = r.get("img_per_s_per_gpu")
        metrics[f"{base}/mfu"] = r.get("mfu")
        metrics[f"{base}/stall"] = (r.get("stall") or {}).get("fraction")
        metrics[f"{base}/step_p50_s"] = (r.get("step_time") or {}).get("p50_s")
        telemetry = r.get("telemetry") or {}
        if telemetry.get("available"):
            for key in ("gpu_util_pct", "sm_clock_mhz", "power_w", "memory_used_gib", "pcie_rx_mb_s",
                        "energy_j_per_image"):
                metrics[f"{base}/gpu/{key}"] = telemetry.get(key)
    for name, v in (report.get("verdicts") or {}).items():
        metrics[f"train/{name}/ratio_to_synthetic"] = v.get("ratio_to_synthetic")
    for name, t in (report.get("time_to_train_90_epochs") or {}).items():
        base = "synthetic" if name == "synthetic" else f"train/{name}"
        metrics[f"{base}/time_to_train_90_epochs_h"] = t.get("total_hours")
    if report.get("scaling"):
        metrics["scaling/efficiency"] = report["scaling"].get("efficiency")
    return {k: v for k, v in metrics.items() if v is not None}


def log_bench(machine, out: Path, report: dict, say=None) -> None:
    """benchmarks.run's tracker run (main rank only), after the report is written: the recipe, machine
    settings and the harness's plan as parameters, every figure of report.json as a metric at step 0, and the
    report and its plots as files."""
    tracker = open_tracker(machine.tracker, out, project=machine.tracker_project, group=machine.tracker_group,
                           say=say, required=False)  # after the work: the report on disk is the record
    if not tracker.active:
        return
    from rn50.config.recipe import flat_items, resolve

    config = report["config"]
    recipe = resolve(saved=config["recipe"]).recipe
    plan = {f"bench/{k}": _param_value(v) for k, v in config.items()
            if k not in ("recipe", "machine", "dataset")}
    plan.update({f"bench/dataset/{k}": v for k, v in config.get("dataset", {}).items()})
    settings = {**{k: _param_value(v) for k, v in flat_items(recipe).items()}, **config.get("machine", {}), **plan}
    environment = {k: v for k, v in report["environment"].items()}
    tracker.log_params(run_params(settings, environment))
    tracker.log_metrics(bench_metrics(report), 0)
    out = Path(out)
    tracker.log_artifacts([out / "report.json", out / "report.md", *sorted(out.glob("*.png"))])
    tracker.close("FINISHED")
