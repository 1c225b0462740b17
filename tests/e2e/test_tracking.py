"""--tracker for real: MLflow against a real `mlflow server` (local store) on the loopback interface, W&B in
offline mode with its run file read back. Every metrics.jsonl value reaches the tracker under its own name and
step, resumed runs continue the tracker run, a tracker that dies mid-run costs one warning and nothing else,
secrets stay out, and a missing extra is one line and exit 2."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from benchmarks.run import main as bench_main
from rn50.observe import tracking
from rn50.observe.metrics import MetricsLog
from rn50.train import main as train_main

SECRET = "s3cr3t-value-never-logged"
TRAIN = ["--loader", "synthetic", "--arch", "resnet18", "--image-size", "32", "--batch-size", "8",
         "--warmup-epochs", "1", "--lr-milestones", "2", "--log-every", "3"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow(root: Path) -> tuple[subprocess.Popen, str]:
    """A real MLflow tracking server: SQLite store and artifacts under `root`, 127.0.0.1 only, one worker."""
    port = free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    log = (root / "server.log").open("w")
    proc = subprocess.Popen([str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                             "--artifacts-destination", str(root / "artifacts")],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180  # a wait for start-up, not a timed assertion: 2 busy cores are slow
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as reply:
                if reply.status == 200:
                    return proc, uri
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.5)
    stop_mlflow(proc)
    pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")


def stop_mlflow(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and its worker, nothing else
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    pytest.importorskip("mlflow")
    proc, uri = start_mlflow(tmp_path_factory.mktemp("mlflow"))
    yield uri
    stop_mlflow(proc)


@pytest.fixture
def tracker_env(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("RN50_TEST_API_KEY", SECRET)  # a name that could hold a secret, under a prefix we log
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "lo")  # one we log with its value
    torch.set_num_threads(1)


def metric_points(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as (step, value) per name, as a tracker should hold it (bools as 0/1, nulls skipped)."""
    points: dict[str, list] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for name, value in record.items():
            if name != "step" and isinstance(value, (int, float)):
                points.setdefault(name, []).append((record["step"], float(value)))
    return points


# ---- MLflow ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_mlflow_gets_params_every_metric_and_files_and_a_resume_continues_the_run(
        mlflow_server, tracker_env, data_dir, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    out = tmp_path / "run"
    common = ["--data", str(data_dir), "--out", str(out), "--tracker", "mlflow", "--tracker-project", "t28", *TRAIN]
    train_main([*common, "--epochs", "1"])
    run_id = json.loads((out / "tracker.json").read_text())["mlflow"]["run_id"]
    train_main([*common, "--epochs", "2", "--resume", "auto"])  # a longer step schedule: no --allow-change needed
    assert json.loads((out / "tracker.json").read_text())["mlflow"]["run_id"] == run_id

    client = MlflowClient(mlflow_server)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert client.get_experiment(run.info.experiment_id).name == "t28"
    assert len(client.search_runs([run.info.experiment_id])) == 1  # one tracker run for the whole run
    params = run.data.params
    assert (params["batch_size"], params["arch"], params["loader"], params["world_size"]) == ("8", "resnet18",
                                                                                             "synthetic", "1")
    assert params["env/torch"] == torch.__version__ and "env/git_commit" in params
    assert params["envvar/NCCL_SOCKET_IFNAME"] == "lo" and params["envvar/RN50_TEST_API_KEY"] == "<redacted>"
    assert SECRET not in json.dumps([params, run.data.tags])
    for name, points in metric_points(out).items():  # every value of both processes, same name, same step
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, name))
        assert history == sorted(points), name
    assert {h["epoch"] for h in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())} >= {1, 2}
    summary = json.loads((out / "summary.json").read_text())
    assert run.data.metrics["summary/best/val_top1"] == summary["best/val_top1"]
    files = {f.path for f in client.list_artifacts(run_id)}
    assert files == {"summary.json", "recipe.json", "machine.json", "metrics.jsonl"}
    served = client.download_artifacts(run_id, "summary.json", str(tmp_path / "back"))
    assert json.loads(Path(served).read_text())["best/val_top1"] == summary["best/val_top1"]


@pytest.mark.slow
def test_a_tracker_server_that_dies_mid_run_costs_one_warning(tracker_env, data_dir, tmp_path, monkeypatch, capsys,
                                                               caplog):
    """The server is stopped right after the first metrics line reached it: training finishes, its files are
    complete, and stderr has exactly one warning about it."""
    pytest.importorskip("mlflow")
    proc, uri = start_mlflow(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    write = MetricsLog.write
    written = []

    def write_then_stop_the_server(self, record):
        write(self, record)
        written.append(record)
        if len(written) == 1:
            stop_mlflow(proc)

    monkeypatch.setattr(MetricsLog, "write", write_then_stop_the_server)
    out = tmp_path / "run"
    try:
        train_main(["--data", str(data_dir), "--out", str(out), "--tracker", "mlflow", "--epochs", "2", *TRAIN])
    finally:
        stop_mlflow(proc)
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "tracker" in line and line.startswith("warning:")]
    assert len(warnings) == 1 and "mlflow tracker failed" in warnings[0], err[-3000:]
    assert "the run goes on without it" in warnings[0]
    assert not [r for r in caplog.records if r.name.startswith("urllib3")]  # no retry chatter beside it
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(written) and [json.loads(l)["epoch"] for l in lines if "val/top1" in l] == [1, 2]
    assert json.loads((out / "summary.json").read_text())["epochs_run"] == 2


@pytest.mark.slow
def test_the_harness_logs_its_report_to_mlflow(mlflow_server, tracker_env, data_dir, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    out = tmp_path / "bench"
    bench_main(["--data", str(data_dir), "--out", str(out), "--arch", "resnet18", "--image-size", "32",
                "--batch-size", "4", "--modes", "synthetic", "--loaders", "", "--warmup-steps", "1", "--steps", "2",
                "--repeats", "1", "--tracker", "mlflow", "--tracker-group", "bench-group"])
    report = json.loads((out / "report.json").read_text())
    client = MlflowClient(mlflow_server)
    run = client.get_run(json.loads((out / "tracker.json").read_text())["mlflow"]["run_id"])
    synthetic = report["results"][0]
    assert run.data.metrics["synthetic/img_per_s"] == synthetic["img_per_s"]
    assert run.data.metrics["synthetic/time_to_train_90_epochs_h"] == \
        report["time_to_train_90_epochs"]["synthetic"]["total_hours"]
    assert run.data.params["batch_size"] == "4" and run.data.params["bench/timed_steps"] == "2"
    assert run.data.tags["rn50.group"] == "bench-group"
    assert {f.path for f in client.list_artifacts(run.info.run_id)} >= {"report.json", "report.md", "throughput.png"}


# ---- W&B (offline) --------------------------------------------------------------------------------------

def wandb_records(path: Path) -> list | None:
    """The records of an offline run file (run-<id>.wandb): W&B's LevelDB-style log of protobuf records, a
    7-byte header (":W&B", magic, version), then 32 KiB blocks of chunks (crc32c, length, type). None while
    the file is incomplete: W&B's service process may still be writing it after wandb.finish() returned (seen
    in CI: a record cut short); a finished run's last record is its `exit`."""
    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending, records = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if len(chunk) < length:
            return None  # the tail is still being written
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # full, or the last of several
            record = wandb_internal_pb2.Record()
            try:
                record.ParseFromString(pending)
            except DecodeError:
                return None  # a record still being written
            records.append(record)
    return records if records and records[-1].WhichOneof("record_type") == "exit" else None


def finished_wandb_records(path: Path, timeout: float = 120.0) -> list:
    """The records of a run file once W&B's service has written all of it (its `exit` record last)."""
    deadline = time.monotonic() + timeout
    while (records := wandb_records(path)) is None:
        assert time.monotonic() < deadline, f"{path} never held a complete run (no exit record)"
        time.sleep(0.5)
    return records


def read_wandb_run(run_dir: Path) -> dict:
    """Config, history rows and saved file names of every offline run W&B wrote under run_dir/wandb."""
    result = {"ids": [], "config": {}, "history": [], "files": set(), "groups": set()}
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        for record in finished_wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                result["ids"].append(record.run.run_id)
                result["groups"].add(record.run.run_group)
            elif kind == "config":
                result["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
            elif kind == "history":
                result["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                          for i in record.history.item})
            elif kind == "files":
                result["files"].update(f.path for f in record.files.files)
    return result


@pytest.mark.slow
def test_wandb_offline_run_holds_every_metric_and_a_resume_keeps_its_id(tracker_env, data_dir, tmp_path,
                                                                         monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    common = ["--data", str(data_dir), "--out", str(out), "--tracker", "wandb", "--tracker-group", "sweep-a", *TRAIN]
    train_main([*common, "--epochs", "1"])
    train_main([*common, "--epochs", "2", "--resume", "auto"])
    run = read_wandb_run(out)
    run_id = json.loads((out / "tracker.json").read_text())["wandb"]["run_id"]
    assert run["ids"] == [run_id, run_id] and run["groups"] == {"sweep-a"}  # the resume continued the same run
    config = run["config"]
    assert (config["batch_size"], config["arch"], config["tracker_group"]) == (8, "resnet18", "sweep-a")
    assert config["envvar/RN50_TEST_API_KEY"] == "<redacted>" and config["env/torch"] == torch.__version__
    for name, points in metric_points(out).items():
        logged = sorted((row["step"], float(row[name])) for row in run["history"] if name in row)
        assert logged == sorted(points), name
    assert run["files"] >= {"summary.json", "metrics.jsonl", "recipe.json", "machine.json"}
    for path in (out / "wandb").rglob("*"):  # nothing W&B keeps on disk holds the secret
        if path.is_file() and not path.is_symlink():
            assert SECRET.encode() not in path.read_bytes(), path


# ---- start-up and the pieces ----------------------------------------------------------------------------

@pytest.mark.parametrize("module, extra", [("wandb", "wandb"), ("mlflow", "mlflow")])
def test_a_missing_extra_is_one_line_and_exit_2(module, extra, data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, module, None)  # what `import wandb` meets where the extra is not installed
    for main, args in ((train_main, ["--loader", "synthetic"]), (bench_main, ["--modes", "synthetic", "--loaders", ""])):
        with pytest.raises(SystemExit) as stop:
            main(["--data", str(data_dir), "--out", str(tmp_path / main.__module__), "--tracker", module, *args])
        assert stop.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0] == (f"error: --tracker {module} needs the {extra!r} extra, which is not "
                                            f"installed: pip install -e '.[{extra}]' (or pip install {module})")
        assert not (tmp_path / main.__module__ / "metrics.jsonl").exists()  # refused before any work


def test_mlflow_file_store_is_one_whole_line_at_start_up_or_works_when_allowed(data_dir, tmp_path, monkeypatch, capsys):
    """Issue 38, 5: MLFLOW_TRACKING_URI=file:///... printed MLflow 3's refusal cut mid-URL as a warning and
    trained untracked. Now: one whole line naming the SQLite URI that works, before anything is written; with
    MLflow's own opt-in (MLFLOW_ALLOW_FILE_STORE=true) the file store is written."""
    mlflow = pytest.importorskip("mlflow")
    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    import mlflow.environment_variables as variables

    if hasattr(variables, "MLFLOW_ALLOW_FILE_STORE"):  # MLflow 3 refuses it; MLflow 2 writes it without asking
        with pytest.raises(SystemExit) as stop:
            train_main(["--data", str(data_dir), "--out", str(tmp_path / "run"), "--tracker", "mlflow", "--epochs",
                        "1", *TRAIN])  # one epoch: a regression trains untracked, but briefly
        out, err = capsys.readouterr()
        lines = [line for line in (out + err).splitlines() if line.strip()]
        assert stop.value.code == 2 and len(lines) == 1, out + err
        assert lines[0].startswith(f"error: MLFLOW_TRACKING_URI={store.as_uri()} is MLflow's file store")
        assert f"sqlite:///{store / 'mlflow.db'}" in lines[0] and lines[0].endswith("write the folder anyway")
        assert not (tmp_path / "run").exists() and not store.exists()
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    tracking.check_available("mlflow")
    tracker = tracking.open_tracker("mlflow", tmp_path / "run", project="p")
    tracker.log_metrics({"train/loss": 1.5}, 3)
    tracker.close()
    assert tracker.run_id and list(store.rglob("meta.yaml")), mlflow.__version__


def test_mlflow_to_a_local_sqlite_file_needs_no_server(tmp_path, monkeypatch):
    """docs/usage.md: MLFLOW_TRACKING_URI=sqlite:///PATH/mlflow.db, the local store that works fully (runs,
    metrics, artifacts under ./mlruns of the folder the experiment started in)."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")  # a new folder
    tracking.check_available("mlflow")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text("{}\n")
    tracker = tracking.open_tracker("mlflow", tmp_path / "run", project="local")
    tracker.log_metrics({"train/loss": 1.5}, 3)
    tracker.log_artifacts([tmp_path / "run" / "summary.json"])
    tracker.close()
    run = MlflowClient().get_run(tracker.run_id)
    assert run.data.metrics == {"train/loss": 1.5} and run.info.status == "FINISHED"
    assert list((tmp_path / "mlruns").rglob("summary.json"))


def test_a_tracker_that_cannot_start_stops_the_run_before_it_trains(data_dir, tmp_path, monkeypatch, capsys):
    """Issue 38, 5: a tracker asked for that cannot start (here an MLflow server nobody listens for) stopped
    nothing: one warning, then days of untracked training. Now one whole error line, exit 2, no step taken."""
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        train_main(["--data", str(data_dir), "--out", str(out), "--tracker", "mlflow", "--epochs", "1", *TRAIN])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and err[-1].startswith("error: --tracker mlflow could not start (MlflowException: ")
    assert err[-1].endswith("or drop --tracker (nothing was trained untracked)") and "warning" not in err[-1]
    assert not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip()


def test_secret_looking_variables_are_logged_by_name_only(monkeypatch):
    for name in ("NCCL_IB_TOKEN", "CUDA_PASSWORD_FILE", "RN50_API_KEY", "TORCH_CREDENTIALS", "DALI_SECRET"):
        monkeypatch.setenv(name, SECRET)
    monkeypatch.setenv("NCCL_DEBUG", "INFO")
    monkeypatch.setenv("HOME_TOKEN_PLAIN", SECRET)  # not a performance variable: not logged at all
    logged = tracking.safe_environment()
    assert logged["NCCL_DEBUG"] == "INFO" and "HOME_TOKEN_PLAIN" not in logged
    assert SECRET not in json.dumps(logged)
    assert logged["NCCL_IB_TOKEN"] == logged["RN50_API_KEY"] == "<redacted>"


def test_tracker_none_opens_nothing(tmp_path):
    tracker = tracking.open_tracker("none", tmp_path, project="p")
    tracker.log_metrics({"train/loss": 1.0, "step": 1}, 1)  # a no-op, never an error
    assert not tracker.active and not (tmp_path / "tracker.json").exists()


def test_a_sweep_groups_its_runs_under_its_folder_name(data_dir, tmp_path):
    from tools.sweep_grid import with_tracker_group

    sweep = tmp_path / "lr-sweep"
    assert with_tracker_group(["--tracker", "mlflow"], data_dir, sweep) == ["--tracker", "mlflow", "--tracker-group",
                                                                          "lr-sweep"]
    assert with_tracker_group(["--tracker", "wandb", "--tracker-group", "mine"], data_dir, sweep)[-1] == "mine"
    assert with_tracker_group(["--epochs", "2"], data_dir, sweep) == ["--epochs", "2"]  # no tracker: no group
