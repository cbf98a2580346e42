"""Experiment trackers, read back for real (no network), and the loss-curve PNG."""

from __future__ import annotations

import glob
import json
import struct
import sys
import time

import pytest

from hafs.training.errors import ConfigError
from hafs.training.plots import plot_losses
from hafs.training.trackers import Tracker, _Backend, open_trackers

SECRET = "hf_abcdefghijklmnopqrstuvwxyz123456"
HISTORY = [(1, {"loss": 2.5, "lr": 1e-3, "grad_norm": 0.7}), (2, {"loss": 2.0, "lr": 9e-4, "note": "text"}),
           (3, {"loss": 1.5, "lr": 8e-4, "eval_loss": 1.8, "ok": True})]


@pytest.fixture
def secret_env(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    return {"preset": "demo", "learning_rate": 1e-3, "lora": {"r": 8, "target_modules": ["q_proj"]},
            "leaked": f"token={SECRET}"}


def _run(backends, tmp_path, config, **kw):
    lines = []
    tracker = open_trackers(backends, run_name="demo-run", log_dir=tmp_path / "logs", config=config,
                            log=lines.append, **kw)
    for step, metrics in HISTORY:
        tracker.log(step, metrics)
    tracker.summary({"evaluation": {"val": {"loss": 1.25}}, "note": f"secret {SECRET}"})
    tracker.close()
    tracker.close()  # twice is harmless
    return lines


def test_missing_backend_is_a_config_error_with_the_pip_command(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError) as err:
        open_trackers(["tensorboard", "wandb"], run_name="r", log_dir=tmp_path / "logs", config={})
    assert "pip install 'hafs[wandb]'" in err.value.render()
    assert not (tmp_path / "logs").exists()  # checked before any backend started


def test_unknown_backend_suggests_the_close_name(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'tensorboard'"):
        open_trackers(["tensorbord"], run_name="r", log_dir=tmp_path, config={})


def test_no_backend_is_a_silent_no_op(tmp_path):
    tracker = open_trackers([], run_name="r", log_dir=tmp_path / "logs", config={"a": 1})
    tracker.log(1, {"loss": 1.0})
    tracker.summary({"a": 1})
    tracker.close()
    assert tracker.names == [] and not (tmp_path / "logs").exists()


def test_failing_backend_is_disabled_and_others_continue():
    class Broken(_Backend):
        name = "broken"

        def log(self, step, metrics):
            raise RuntimeError("server went away")

    class Recorder(_Backend):
        name = "recorder"

        def __init__(self):
            self.seen = []

        def log(self, step, metrics):
            self.seen.append((step, metrics))

        def close(self, failed=False):
            self.seen.append("failed" if failed else "closed")

    lines, rec = [], Recorder()
    tracker = Tracker([Broken(), rec], log=lines.append)
    tracker.log(1, {"loss": 2.0, "tag": "x"})
    tracker.log(2, {"loss": 1.0})
    tracker.close(failed=True)
    assert rec.seen == [(1, {"loss": 2.0}), (2, {"loss": 1.0}), "failed"]
    assert tracker.names == ["recorder"]
    assert sum("broken tracker failed" in line for line in lines) == 1


def test_tensorboard_event_files_read_back(tmp_path, secret_env):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    lines = _run(["tensorboard"], tmp_path, secret_env)
    assert any(line.startswith("tracking: tensorboard") for line in lines)
    acc = EventAccumulator(str(tmp_path / "logs" / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["eval_loss", "grad_norm", "loss", "lr"]
    loss = acc.Scalars("loss")
    assert [e.step for e in loss] == [1, 2, 3]
    assert [round(e.value, 6) for e in loss] == [2.5, 2.0, 1.5]
    assert [e.step for e in acc.Scalars("eval_loss")] == [3]
    texts = {tag: acc.Tensors(tag)[0].tensor_proto.string_val[0].decode() for tag in acc.Tags()["tensors"]}
    assert '"learning_rate": 0.001' in texts["config/text_summary"]
    assert SECRET not in json.dumps(texts) and "***" in texts["config/text_summary"]


def _wandb_records(path):
    """Records of a W&B offline `.wandb` file (LevelDB-log framing of protobuf `Record`s)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    block, pos, buf, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a whole record
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def test_wandb_offline_run_folder_has_the_history(tmp_path, secret_env, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    lines = _run(["wandb"], tmp_path, secret_env)
    assert any("offline" in line for line in lines)
    files = glob.glob(str(tmp_path / "logs" / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1
    # finish() returns before W&B's core process has flushed the file: wait for the exit record.
    deadline = time.time() + 30
    records = _wandb_records(files[0])
    while "exit" not in [r.WhichOneof("record_type") for r in records]:
        assert time.time() < deadline, "W&B never wrote the run's exit record"
        time.sleep(0.1)
        records = _wandb_records(files[0])
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {_key(i): json.loads(i.value_json) for i in r.history.item if not _key(i).startswith("_")}
            history[r.history.step.num] = items
    kinds = [r.WhichOneof("record_type") for r in records]
    assert history == {1: {"loss": 2.5, "lr": 1e-3, "grad_norm": 0.7}, 2: {"loss": 2.0, "lr": 9e-4},
                       3: {"loss": 1.5, "lr": 8e-4, "eval_loss": 1.8}}, kinds
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    config = {_key(i): i.value_json for i in run.config.update}
    assert json.loads(config["learning_rate"]) == {"value": 1e-3} or "0.001" in config["learning_rate"]
    summary = {_key(i): i.value_json for r in records if r.WhichOneof("record_type") == "summary"
               for i in r.summary.update}
    assert json.loads(summary["evaluation/val/loss"]) == 1.25
    blob = open(files[0], "rb").read()
    assert SECRET.encode() not in blob


def test_mlflow_local_store_read_back_through_its_client(tmp_path, secret_env, monkeypatch):
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.chdir(tmp_path)
    _run(["mlflow"], tmp_path, secret_env)
    db = tmp_path / "logs" / "mlflow.db"
    assert db.is_file()
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("hafs")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "demo-run" and run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 2.5), (2, 2.0), (3, 1.5)]
    assert run.data.params["learning_rate"] == "0.001" and run.data.params["lora.r"] == "8"
    assert SECRET not in run.data.params["leaked"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert artifacts == {"config.json", "summary.json"}
    assert (tmp_path / "logs" / "mlartifacts").is_dir() and not (tmp_path / "mlartifacts").exists()

    # One store for all runs (what the recipe passes): a second run lands in the same experiment.
    shared = tmp_path / "all" / "mlflow.db"
    for name in ("run-1", "run-2"):
        t = open_trackers(["mlflow"], run_name=name, log_dir=tmp_path / name, config={"a": 1},
                          mlflow_uri=f"sqlite:///{shared}", log=lambda m: None)
        t.log(1, {"loss": 1.0})
        t.close(failed=name == "run-2")
    client = MlflowClient(tracking_uri=f"sqlite:///{shared}")
    runs = client.search_runs([client.get_experiment_by_name("hafs").experiment_id])
    assert sorted((r.info.run_name, r.info.status) for r in runs) == [("run-1", "FINISHED"), ("run-2", "FAILED")]
    assert (tmp_path / "all" / "mlartifacts").is_dir() and not (tmp_path / "run-1").exists()


def test_mlflow_keeps_each_trained_model_as_a_registered_version(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    model = tmp_path / "models" / "demo-asm-20260101"
    model.mkdir(parents=True)
    (model / "adapter_config.json").write_text('{"r": 8}')
    (model / "adapter_model.safetensors").write_bytes(b"weights")
    store, lines, runs = tmp_path / "logs" / "mlflow.db", [], []
    for name in ("run-1", "run-2"):
        t = open_trackers(["mlflow"], run_name=name, log_dir=tmp_path / "logs", config={"a": 1},
                          mlflow_uri=f"sqlite:///{store}", log=lines.append)
        runs.append(t.backends[0].run_id)
        t.model(model, "demo-asm", {"preset": "demo", "eval_loss": 6.34, "missing": None})
        t.close()
    assert any("registered model 'demo-asm' version 2 (models:/demo-asm/2)" in line for line in lines)
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    versions = [client.get_model_version("demo-asm", str(n)) for n in (1, 2)]
    assert [(int(v.version), v.run_id) for v in versions] == [(1, runs[0]), (2, runs[1])]
    assert versions[0].tags == {"preset": "demo", "eval_loss": "6.34"}
    files = {a.path for a in client.list_artifacts(runs[1], "model")}
    assert files == {"model/adapter_config.json", "model/adapter_model.safetensors"}
    assert versions[1].source.endswith("/model") and runs[1] in versions[1].source


def test_a_failing_model_store_is_a_warning_and_the_run_still_closes():
    class Broken(_Backend):
        name = "broken"
        closed = None

        def model(self, path, name, tags):
            raise RuntimeError("registry down")

        def close(self, failed=False):
            self.closed = "failed" if failed else "finished"

    lines, broken = [], Broken()
    tracker = Tracker([broken], log=lines.append)
    tracker.model("/nowhere", "x")
    assert "broken could not keep the model (RuntimeError: registry down); it is in /nowhere" in lines[0]
    tracker.close()
    assert broken.closed == "finished"  # not left running in the tracker's UI


def test_loss_curve_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = plot_losses([(1, 3.0), (2, 2.5), (3, float("nan")), (4, 2.0)], [(2, 2.7), (4, 2.2)],
                      tmp_path / "loss_curve.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (770, 462)
    assert [p.name for p in tmp_path.iterdir()] == ["loss_curve.png"]  # no temp file left


def test_loss_curve_without_losses_or_matplotlib(tmp_path, monkeypatch):
    lines = []
    assert plot_losses([], [], tmp_path / "a.png", log=lines.append) is None
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    assert plot_losses([(1, 1.0)], [], tmp_path / "b.png", log=lines.append) is None
    assert not list(tmp_path.iterdir())
    assert "no losses" in lines[0] and "pip install 'hafs[plots]'" in lines[1]
