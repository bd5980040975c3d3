"""Experiment trackers (rlkit.tracking) through MetricsLogger, offline: TensorBoard event files,
a W&B offline run (WANDB_MODE=offline) and an MLflow file store under tmp_path; everything logged
is read back from what the libraries wrote."""

from __future__ import annotations

import dataclasses
import json
import struct
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from rlkit.evaluate import build_report
from rlkit.metrics import MetricsLogger
from rlkit.tracking import check_available, mlflow_key

CONFIG = {"run_dir": "runs/x", "train": {"steps": 3, "seed": 0}, "report_to": ["tensorboard", "wandb", "mlflow"]}


@dataclasses.dataclass(frozen=True)
class _Row:
    prompt_text: str
    answer: str
    fields: dict
    data_source: str
    index: int


def _report():
    rows = [_Row("p", "1", {}, "arith" if i < 2 else "gym", i) for i in range(4)]
    greedy = [{"completion_ids": [1, 2], "finish_reason": "stop"}] * 4
    settings = {"n": 4, "k": [4], "temperature": 1.0, "max_new_tokens": 2, "seed": 0, "outcome": "math", "problems": 4}
    correct_P_N = np.array([[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 0, 0]], dtype=float)
    votes_P_N = np.array([[0, 1, 1, -1], [0, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0]])
    return build_report(rows, greedy, ["t"] * 4, np.array([1.0, 0.0, 1.0, 0.0]), (correct_P_N, votes_P_N), settings)


def _log_a_run(run_dir: Path, report_to: list[str], **kw) -> tuple[dict, str]:
    log = MetricsLogger(run_dir, report_to=report_to, run_name="tiny-run", tags=["t1", "t2"], config=CONFIG, **kw)
    for step in (1, 2, 3):
        log.log(step, {"reward/mean": step / 4, "reward/accuracy": step / 8, "kl/mean": float("nan")})
    report = _report()
    log.log_eval(3, report)
    summary = log.finish()
    return report.metrics, summary


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)


def test_missing_extra_says_what_to_install(monkeypatch, tmp_path):
    check_available(["tensorboard", "wandb", "mlflow"])  # installed here (the dev extra)
    monkeypatch.setitem(sys.modules, "wandb", None)  # find_spec then reports it absent
    with pytest.raises(ValueError, match=r"report_to includes 'wandb'.*pip install 'rlkit\[wandb\]'"):
        check_available(["tensorboard", "wandb"])
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(ValueError, match=r"pip install 'rlkit\[mlflow\]'"):
        MetricsLogger(tmp_path, report_to=["tensorboard", "mlflow"])
    with pytest.raises(ValueError, match="unknown tracker 'neptune'"):
        check_available(["neptune"])


def test_summary_and_eval_report_files(tmp_path):
    metrics, summary = _log_a_run(tmp_path, [])
    assert json.loads((tmp_path / "eval" / "step_0000003.json").read_text())["metrics"] == metrics
    assert (tmp_path / "summary.txt").read_text() == summary
    assert "evaluation at step 3" in summary and "maj@4" in summary and "gym" in summary
    assert sorted(p.name for p in (tmp_path / "plots").glob("*.png")) == ["accuracy.png", "reward.png"]
    # a resumed run forgets the evaluation reports of steps it re-runs
    with MetricsLogger(tmp_path, report_to=[], resume=True) as log:
        log.truncate_after(2)
    assert not (tmp_path / "eval" / "step_0000003.json").exists()


def test_tensorboard_gets_config_scalars_table_plots_and_summary(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    metrics, _ = _log_a_run(tmp_path, ["tensorboard"])
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("reward/mean")] == [(1, 0.25), (2, 0.5), (3, 0.75)]
    assert [e.value for e in acc.Scalars("eval/pass@4")] == [pytest.approx(metrics["eval/pass@4"])]
    assert "kl/mean" not in acc.Tags()["scalars"]  # only ever NaN: kept out of TensorBoard
    texts = {tag: acc.Tensors(tag)[-1].tensor_proto.string_val[0].decode() for tag in acc.Tags()["tensors"]}
    assert "train:" in texts["config/text_summary"] and "seed: 0" in texts["config/text_summary"]
    assert "tiny-run" in texts["run/text_summary"] and "t1, t2" in texts["run/text_summary"]
    assert "| gym |" in texts["eval/table/text_summary"]
    assert "evaluation at step 3" in texts["summary/text_summary"]
    assert {"plots/reward", "plots/accuracy"} <= set(acc.Tags()["images"])
    assert acc.Images("plots/reward")[0].encoded_image_string[:4] == b"\x89PNG"


def _wandb_records(run_dir: Path, timeout_s: float = 60.0) -> list:
    """Records of the W&B offline transaction log (``run-*.wandb``), once it holds the run's exit record.

    ``run.finish()`` returns when the service has handled the exit record, but it only *informs* the
    service that the stream is finished (a publish, not a request): the service flushes and closes the
    log afterwards, so a loaded machine can read the file before its records are there."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = _read_wandb_log(run_dir)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def _read_wandb_log(run_dir: Path) -> list:
    """The LevelDB-style log: 32 KiB blocks of (crc32, length, type) framed chunks after a 7-byte
    header, each record a protobuf Record."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data, block, pos, out, buf = path.read_bytes(), 32768, 7, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the block's tail is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += block - pos % block
            continue
        if pos + 7 + length > len(data):  # a chunk still being written
            break
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):  # full or last chunk: a whole record
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
    return out


def test_wandb_offline_run_reads_back(tmp_path, offline):
    metrics, summary = _log_a_run(tmp_path, ["wandb"])
    records = _wandb_records(tmp_path)
    kinds = [r.WhichOneof("record_type") for r in records]
    assert "run" in kinds and "exit" in kinds, kinds
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.display_name == "tiny-run" and list(run.tags) == ["t1", "t2"] and run.project == "rlkit"
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["train"] == {"steps": 3, "seed": 0} and config["run_dir"] == "runs/x"
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
            history.setdefault(items["_step"], {}).update(items)
    assert [history[s]["reward/mean"] for s in (1, 2, 3)] == [0.25, 0.5, 0.75]
    assert history[3]["eval/maj@4"] == pytest.approx(metrics["eval/maj@4"])
    assert "kl/mean" not in history[1]
    assert history[3]["eval/table/_type"] == "table-file"
    assert history[3]["plots/reward/_type"] == "image-file"
    table_file = next((tmp_path / "wandb").glob("offline-run-*/files/media/table/eval/table_*.table.json"))
    table = json.loads(table_file.read_text())
    assert table["columns"][:3] == ["source", "problems", "accuracy"]
    assert [row[0] for row in table["data"]] == ["arith", "gym", "all"]
    summaries = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summaries.update({"/".join(u.nested_key) or u.key: u.value_json for u in r.summary.update})
    assert json.loads(summaries["summary"]) == summary
    # a resumed run continues the same W&B run
    run_id = json.loads((tmp_path / "trackers.json").read_text())["wandb"]
    assert run.run_id == run_id
    MetricsLogger(tmp_path, report_to=["wandb"], resume=True).close()
    assert json.loads((tmp_path / "trackers.json").read_text())["wandb"] == run_id


def test_mlflow_file_store_reads_back(tmp_path, offline):
    from mlflow.tracking import MlflowClient

    metrics, summary = _log_a_run(tmp_path / "run", ["mlflow"])
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("rlkit").experiment_id])
    assert run.info.run_name == "tiny-run" and run.info.status == "FINISHED"
    assert run.data.tags["t1"] == "true" and run.data.tags["rlkit.tags"] == "t1,t2"
    assert run.data.params["train.steps"] == "3" and json.loads(run.data.params["report_to"])[1] == "wandb"
    rid = run.info.run_id
    assert [(m.step, m.value) for m in client.get_metric_history(rid, "reward/mean")] == [(1, 0.25), (2, 0.5), (3, 0.75)]
    assert client.get_metric_history(rid, mlflow_key("eval/gym/pass@4"))[0].value == metrics["eval/gym/pass@4"]
    assert client.get_metric_history(rid, "kl/mean") == []
    files = {f.path for f in client.list_artifacts(rid)} | {f.path for f in client.list_artifacts(rid, "plots")}
    assert {"config.json", "summary.txt", "plots/reward.png", "plots/accuracy.png"} <= files
    local = Path(client.download_artifacts(rid, "", str(tmp_path / "dl")))
    assert (local / "summary.txt").read_text() == summary
    assert json.loads((local / "config.json").read_text()) == CONFIG
    table = json.loads((local / "eval" / "table" / "step_0000003.json").read_text())
    assert table["rows"][-1][0] == "all" and table["rows"][-1][2] == metrics["eval/accuracy"]
    # a resumed run continues the same MLflow run
    MetricsLogger(tmp_path / "run", report_to=["mlflow"], resume=True).close()
    assert [r.info.run_id for r in client.search_runs([run.info.experiment_id])] == [rid]
