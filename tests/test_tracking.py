"""The tracker's trial runs against a real MLflow store: what is held back and written together arrives whole."""

from __future__ import annotations

from pathlib import Path

from bstune.tracking import HISTOGRAM_ARTIFACT_DIR, RUN_FINISHED, Tracker, mlflow_client
from bstune.trials import State


def test_a_trial_run_gets_every_param_metric_tag_and_histogram_past_mlflows_batch_limits(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri, flush_seconds=3600.0)  # nothing written until the end
    parent = tracker.open_study_run("s", None, {"name": "s"}, "name: s\n")
    params = {f"p{i:03d}": i for i in range(150)}  # over the 100 params one call takes
    run_id = tracker.start_trial(parent, "s", 0, 1, params)
    for epoch in range(1, 26):  # 25 epochs x 50 metrics: over the 1000 items one call takes
        tracker.log_epoch(run_id, epoch, {f"m{k:02d}": epoch + k / 100 for k in range(50)},
                          {"edges": [0, 1], "counts": [epoch]} if epoch % 10 == 0 else None)
    assert not mlflow_client(uri).get_run(run_id).data.params, "written before the end"
    tracker.end_trial(run_id, State.COMPLETE, final={"final_val_loss": 0.5})

    client = mlflow_client(uri)
    run = client.get_run(run_id)
    assert run.info.status == RUN_FINISHED
    assert run.data.params == {k: str(v) for k, v in params.items()}
    assert run.data.tags["bstune.state"] == State.COMPLETE
    assert run.data.metrics["final_val_loss"] == 0.5
    history = client.get_metric_history(run_id, "m49")
    assert [(m.step, m.value) for m in history] == [(e, e + 0.49) for e in range(1, 26)]
    files = sorted(f.path for f in client.list_artifacts(run_id, HISTOGRAM_ARTIFACT_DIR))
    assert files == [f"{HISTOGRAM_ARTIFACT_DIR}/epoch_{e:04d}.json" for e in (10, 20)]


def test_a_long_trial_run_shows_its_params_and_metrics_while_it_trains(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri, flush_seconds=0.0)  # every epoch is past the flush interval
    parent = tracker.open_study_run("s", None, {"name": "s"}, "name: s\n")
    run_id = tracker.start_trial(parent, "s", 0, 1, {"lr": 0.1})
    tracker.log_epoch(run_id, 1, {"val_loss": 1.0})
    run = mlflow_client(uri).get_run(run_id)
    assert run.data.params == {"lr": "0.1"} and run.data.metrics == {"val_loss": 1.0}
    tracker.end_trial(run_id, State.PRUNED, "pruned at epoch 1")
    assert mlflow_client(uri).get_run(run_id).data.tags["bstune.reason"] == "pruned at epoch 1"


def test_writes_to_a_trial_run_deleted_meanwhile_are_dropped_not_raised(tmp_path: Path) -> None:
    """A trial's second run, deleted by a settle in another process, may still have writes coming from the
    writer that made it: they are dropped (the trial is over, its other run stands); other runs are written."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri, flush_seconds=3600.0)
    parent = tracker.open_study_run("s", None, {"name": "s"}, "name: s\n")
    gone, kept = (tracker.start_trial(parent, "s", 0, 1, {"lr": 0.1}) for _ in range(2))
    mlflow_client(uri).delete_run(gone)
    for run_id in (gone, kept):
        tracker.log_epoch(run_id, 1, {"val_loss": 1.0}, {"edges": [0, 1], "counts": [1]})
        tracker.end_trial(run_id, State.LOST, "no heartbeat")
    client = mlflow_client(uri)
    assert client.get_run(gone).info.lifecycle_stage == "deleted" and not client.get_run(gone).data.metrics
    run = client.get_run(kept)
    assert (run.info.status, run.data.tags["bstune.state"], run.data.metrics["val_loss"]) == ("KILLED", "LOST", 1.0)
