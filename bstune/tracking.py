"""MLflow tracking: one parent run per study, one nested child run per trial.

Names follow shared conventions so the MLflow UI compares runs well: params batch_size, lr, momentum, ...;
per-epoch metrics with step = epoch; tags bstune.study, bstune.trial, bstune.state and mlflow.parentRunId.
The client API is used (not the fluent one) so that no global "active run" state is involved.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bstune.errors import BstuneError, first_line, redact
from bstune.stores import (
    MLFLOW,
    check_database,
    check_sqlite_store,
    check_sqlite_url,
    is_database_url,
    sqlite_path,
    tune_sqlite,
)
from bstune.trials import State

# MLflow's run statuses (its own vocabulary, which shares a word with bstune's states)
RUN_RUNNING, RUN_FINISHED, RUN_FAILED, RUN_KILLED = "RUNNING", "FINISHED", "FAILED", "KILLED"
RUN_STATUS = {  # a trial's state -> its MLflow run's status (a divergence is a measurement, not an error)
    State.COMPLETE: RUN_FINISHED, State.PRUNED: RUN_FINISHED, State.DIVERGED: RUN_FINISHED, State.OOM: RUN_FAILED,
    State.FAILED: RUN_FAILED, State.INTERRUPTED: RUN_KILLED, State.LOST: RUN_KILLED,
}


def tracking_errors() -> tuple[type[Exception], ...]:
    """What MLflow raises when its store fails (gone, full, read-only)."""
    from mlflow.exceptions import MlflowException

    return (MlflowException,)


def mlflow_client(tracking_uri: str) -> Any:
    """An MLflow client for the store, with bstune's settings for MLflow's HTTP calls (a user's own win)."""
    # Fail fast instead of retrying for minutes when a tracking server does not answer.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    # No usage telemetry: it costs time on every call and has nowhere to go on an offline machine.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=_absolute_sqlite(tracking_uri))


def _absolute_sqlite(uri: str) -> str:
    """A relative SQLite URI made absolute: MLflow keeps one store per URI for the whole process, so the default
    `sqlite:///mlruns/mlflow.db` would go on naming the folder it was first opened in after a change of folder
    (a notebook's os.chdir, or the Python API called from two projects)."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri.startswith(prefix + "/") or ":memory:" in uri:
        return uri
    return prefix + os.path.abspath(uri[len(prefix):])

# The experiment tag that opens the MLflow UI on an experiment's training runs rather than its GenAI views.
KIND_TAG, TRAINING = "mlflow.experimentKind", "custom_model_development"

EPOCH_METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "examples_seen", "optimizer_steps",
                 "examples_per_second", "weight_distance", "grad_noise_scale", "generalization_gap", "grad_norm")


def artifact_root(tracking_uri: str) -> str | None:
    """Where artifacts go for a SQLite store: beside the database (mlruns/artifacts), as a file URI. None
    (MLflow's default) for others: a file store keeps them inside itself, a server decides."""
    db = sqlite_path(tracking_uri)
    return (db.parent.resolve() / "artifacts").as_uri() if db is not None else None


def training_experiments(tracking_uri: str) -> list[tuple[str, str]]:
    """(name, id) of each experiment in the store that holds a study, each tagged (if it was not) so that the
    MLflow UI shows it as training runs. BstuneError if a SQLite store is not there."""
    db = sqlite_path(tracking_uri)
    if db is not None and not db.exists():
        raise BstuneError(f"tracking_uri: {db} does not exist; run `bstune study SPEC` first, or give the "
                          "--tracking-uri of a study")
    c = mlflow_client(tracking_uri)
    found = []
    for exp in c.search_experiments():
        if not c.search_runs([exp.experiment_id], "tags.`bstune.kind` = 'study'", max_results=1):
            continue
        if exp.tags.get(KIND_TAG) != TRAINING:
            c.set_experiment_tag(exp.experiment_id, KIND_TAG, TRAINING)
        found.append((exp.name, exp.experiment_id))
    return found


def check_tracking_uri(uri: str) -> None:
    """Fail with one line if the tracking URI names no usable SQLite file (not an MLflow database, corrupt,
    read-only) or its database does not answer; asks nothing of MLflow, creates nothing."""
    check_sqlite_url(uri, "tracking_uri")
    if uri.startswith("sqlite"):
        check_sqlite_store(uri, "tracking_uri", MLFLOW)
    if is_database_url(uri):  # MLflow would retry a silent database for two minutes
        check_database(uri, "tracking_uri")


class Tracker:
    """The study's MLflow side. `check()` first: it fails with one line if the store does not answer."""

    def __init__(self, tracking_uri: str, experiment: str = "bstune", flush_seconds: float = 3.0) -> None:
        self.uri = tracking_uri
        self.flush_seconds = flush_seconds
        self._pending: dict[str, list[Any]] = {}
        self._flushed: dict[str, float] = {}
        self._artifact_uri: dict[str, str] = {}  # trial runs made here: where their artifacts go
        self._gone: set[str] = set()  # trial runs found deleted as they were written to
        self.experiment_name = experiment
        self._client: Any = None
        self._experiment_id: str | None = None

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = mlflow_client(self.uri)
            # a study's writes: thousands of small commits to a SQLite store (see stores.tune_sqlite)
            engine = getattr(self._client._tracking_client.store, "engine", None)
            if engine is not None:
                tune_sqlite(engine)
        return self._client

    def check(self) -> None:
        """Make sure the tracking store answers, without creating anything in it."""
        check_tracking_uri(self.uri)
        try:
            self.client.search_experiments(max_results=1)
        except Exception as e:  # noqa: BLE001 - any failure here means "unusable store"
            raise BstuneError(f"tracking_uri: cannot reach the MLflow store at {redact(self.uri)} "
                              f"({first_line(e)}); start it or fix tracking_uri") from None

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            exp = self.client.get_experiment_by_name(self.experiment_name)
            if exp is None:
                self._experiment_id = self.client.create_experiment(
                    self.experiment_name, artifact_location=artifact_root(self.uri), tags={KIND_TAG: TRAINING})
            else:
                self._experiment_id = exp.experiment_id
                if exp.tags.get(KIND_TAG) != TRAINING:  # made before bstune tagged its experiments, or by hand
                    self.client.set_experiment_tag(exp.experiment_id, KIND_TAG, TRAINING)
        return self._experiment_id

    # ---- the study's parent run

    def open_study_run(self, study_name: str, run_id: str | None, params: dict[str, Any],
                       spec_yaml: str, key: str = "") -> str:
        """Reopen the study's parent run (on resume) or create it; returns its id. `key` names the study
        uniquely (storage and study id): a run made for it by a process killed before the study recorded the
        run is found by it and taken up, not left RUNNING beside a second one."""
        taken_up = None
        if run_id is None and key:
            made = self.client.search_runs([self.experiment_id], f"tags.`bstune.kind` = 'study' and "
                                           f"tags.`bstune.study_key` = '{key}'", max_results=1)
            run_id = taken_up = made[0].info.run_id if made else None
        if run_id is not None:
            try:
                self.client.get_run(run_id)
                self.client.update_run(run_id, status=RUN_RUNNING)
                if taken_up:  # its params and spec may not have been written
                    self.log_params(run_id, params)
                    self.client.log_text(run_id, spec_yaml, "spec.yaml")
                return run_id
            except Exception:  # noqa: BLE001 - deleted run: make a new one
                pass
        run = self.client.create_run(
            self.experiment_id, run_name=study_name,
            tags={"bstune.study": study_name, "bstune.kind": "study", "bstune.study_key": key},
        )
        run_id = run.info.run_id
        self.log_params(run_id, params)
        self.client.log_text(run_id, spec_yaml, "spec.yaml")
        return run_id

    def close_study_run(self, run_id: str, summary: dict[str, Any], status: str = RUN_FINISHED) -> None:
        from mlflow.entities import Metric, RunTag

        ts = _now_ms()
        metrics = [Metric(f"budget.{k}", float(v), ts, 0) for k, v in summary.get("spent", {}).items()]
        for k in ("best_value", "n_complete", "n_pruned", "n_diverged", "n_failed"):
            if summary.get(k) is not None:
                metrics.append(Metric(k, float(summary[k]), ts, 0))
        tags = [RunTag(f"bstune.{k}", str(summary[k])) for k in ("best_trial", "stop_reason") if k in summary]
        self.client.log_batch(run_id, metrics=metrics, tags=tags)
        self.client.log_dict(run_id, summary, "summary.json")
        self.client.set_terminated(run_id, status=status)

    def log_analysis(self, run_id: str, metrics: dict[str, float | None], payload: dict[str, Any]) -> None:
        """An analysis of the study: headline numbers as metrics, everything as analysis.json."""
        from mlflow.entities import Metric

        ts = _now_ms()
        items = [Metric(k, float(v), ts, 0) for k, v in metrics.items() if v is not None]
        with self._logging_to(run_id, "the analysis"):
            self.client.log_batch(run_id, metrics=items)
            self.client.log_dict(run_id, payload, "analysis.json")

    @contextmanager
    def _logging_to(self, run_id: str, what: str) -> Iterator[None]:
        """Log to an existing run (checked first, so nothing is logged if it is not there); MLflow's errors,
        of several types, become one BstuneError line."""
        try:
            self.client.get_run(run_id)
            yield
        except Exception as e:  # noqa: BLE001 - a missing run, another store, a server that went away
            raise BstuneError(f"cannot log {what} to MLflow run {run_id} ({first_line(e)}); check "
                              "--tracking-uri, or pass --no-mlflow") from None

    # ---- trial child runs

    def start_trial(self, parent_id: str, study_name: str, number: int, trial_id: int,
                    params: dict[str, Any]) -> str:
        """Open a trial's child run. Its params, metrics and histograms are written together, a few seconds
        in and at the end (each write to a SQLite store costs ~10 ms; a short trial's are all one write)."""
        run = self.client.create_run(
            self.experiment_id, run_name=f"{study_name}-trial-{number:04d}",
            tags={"mlflow.parentRunId": parent_id, "bstune.study": study_name, "bstune.trial": str(number),
                  "bstune.state": State.RUNNING, "optuna.trial_id": str(trial_id), "bstune.kind": "trial"},
        )
        run_id = run.info.run_id
        self._artifact_uri[run_id] = run.info.artifact_uri
        self._pending[run_id] = _Pending(params=_params(params))
        self._flushed[run_id] = time.monotonic()
        return run_id

    def log_epoch(self, run_id: str, epoch: int, values: dict[str, float | None],
                  histogram: dict[str, Any] | None = None, ts: int | None = None) -> None:
        """The epoch's metrics, and its gradient histogram (an artifact under HISTOGRAM_ARTIFACT_DIR); `ts`: when
        (a spooled write applied later keeps the time it was made, so applying it twice logs it once)."""
        from mlflow.entities import Metric

        ts = ts or _now_ms()
        pending = self._pending.setdefault(run_id, _Pending())
        # NaN: not measured (accuracy of a regression, what a trainer of one's own did not report)
        pending.metrics += [Metric(k, float(v), ts, epoch) for k, v in values.items()
                            if v is not None and not math.isnan(v)]
        if histogram is not None:
            pending.files[f"{HISTOGRAM_ARTIFACT_DIR}/epoch_{epoch:04d}.json"] = histogram
        if time.monotonic() - self._flushed.get(run_id, 0.0) > self.flush_seconds:
            self._flush(run_id)

    def _flush(self, run_id: str, tags: Sequence[Any] = ()) -> None:
        p = self._pending.pop(run_id, _Pending())
        params, metrics, tags = p.params, p.metrics, list(tags)
        with self._unless_deleted(run_id):
            while params or metrics or tags:  # MLflow takes at most 100 params and 1000 items in all per call
                n_params = min(len(params), 100)
                n_metrics = min(len(metrics), 1000 - n_params - len(tags))
                self.client.log_batch(run_id, metrics=metrics[:n_metrics], params=params[:n_params], tags=tags)
                params, metrics, tags = params[n_params:], metrics[n_metrics:], []
        if p.files and run_id not in self._gone:
            with tempfile.TemporaryDirectory() as folder:
                for name, data in p.files.items():
                    path = Path(folder, name)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps(data))
                self._log_artifacts(run_id, folder)
        self._flushed[run_id] = time.monotonic()

    def end_trial(self, run_id: str, state: str, reason: str = "", final: dict[str, float] | None = None,
                  ts: int | None = None) -> None:
        from mlflow.entities import Metric, RunTag

        tags = [RunTag("bstune.state", state)]
        if reason:
            tags.append(RunTag("bstune.reason", reason[:5000]))
        ts = ts or _now_ms()
        pending = self._pending.setdefault(run_id, _Pending())
        pending.metrics += [Metric(k, float(v), ts, 0) for k, v in (final or {}).items()
                            if v is not None and not math.isnan(v)]
        self._flush(run_id, tags)
        self._flushed.pop(run_id, None)
        self._artifact_uri.pop(run_id, None)
        with self._unless_deleted(run_id):
            self.client.set_terminated(run_id, status=RUN_STATUS[state])
        self._gone.discard(run_id)

    @contextmanager
    def _unless_deleted(self, run_id: str) -> Iterator[None]:
        """A trial run deleted meanwhile (the second run of one trial, removed by a settle elsewhere: its trial is
        over and its other run stands) takes no more writes: dropped, not an error that stops the writer."""
        try:
            yield
        except tracking_errors():
            if not self._deleted(run_id):
                raise

    def _deleted(self, run_id: str) -> bool:
        """Whether the run was deleted (read once a write to it has failed)."""
        if run_id in self._gone:
            return True
        try:
            gone = self.client.get_run(run_id).info.lifecycle_stage == "deleted"
        except tracking_errors():
            return False
        if gone:
            self._gone.add(run_id)
        return gone

    def _log_artifacts(self, run_id: str, folder: str) -> None:
        """`log_artifacts`, without the read of the whole run MLflow's client makes to find where its artifacts go
        (about 18 ms a run on a SQLite store: its metrics, params and tags) where the run was made here."""
        uri = self._artifact_uri.get(run_id)
        if uri is None:
            self.client.log_artifacts(run_id, folder)
            return
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        get_artifact_repository(uri, tracking_uri=self.uri).log_artifacts(folder)

    def flush_all(self) -> None:
        """Write every trial run's gathered writes now."""
        for run_id in list(self._pending):
            self._flush(run_id)

    def run_id(self, handle: str, wait: bool = False) -> str | None:
        """The MLflow run id behind what `start_trial` returned (here: the run id itself)."""
        return handle

    def close(self) -> None:
        """Nothing to wait for: the trial runs are written as they go (see bstune.run_spool for the other way)."""

    def trial_runs(self, parent_id: str, trial_id: int | None = None, running: bool = False) -> list[Any]:
        """The study's trial runs (of one Optuna trial, or those still RUNNING), oldest first."""
        where = f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.`bstune.kind` = 'trial'"
        if trial_id is not None:
            where += f" and tags.`optuna.trial_id` = '{trial_id}'"
        if running:
            where += f" and attributes.status = '{RUN_RUNNING}'"
        return self.client.search_runs([self.experiment_id], where, max_results=50_000,
                                       order_by=["attributes.start_time ASC"])

    def settle_trial(self, parent_id: str, study_name: str, number: int, trial_id: int, state: str,
                     reason: str) -> None:
        """Make an ended trial's MLflow side agree with its final `state`, whatever a dead worker left: its one
        run closed with that state (made, closed, if the worker died before making it; a second run, made
        by a worker that found its trial taken away, deleted). Idempotent."""
        runs = self.trial_runs(parent_id, trial_id)
        if not runs:
            runs = [self.client.create_run(self.experiment_id, run_name=f"{study_name}-trial-{number:04d}", tags={
                "mlflow.parentRunId": parent_id, "bstune.study": study_name, "bstune.trial": str(number),
                "bstune.state": State.RUNNING, "optuna.trial_id": str(trial_id), "bstune.kind": "trial"})]
        for extra in runs[1:]:
            self._pending.pop(extra.info.run_id, None)
            self._artifact_uri.pop(extra.info.run_id, None)
            self.client.delete_run(extra.info.run_id)
        run = runs[0]
        self._pending.pop(run.info.run_id, None)  # metrics this process had not written: of a trial that is over
        self._artifact_uri.pop(run.info.run_id, None)
        if run.info.status != RUN_STATUS[state] or run.data.tags.get("bstune.state") != state:
            self.end_trial(run.info.run_id, state, reason)

    def attach_report(self, run_id: str, folder: str | Path, note: str) -> None:
        """Log a report's files under report/ in the study's parent run; ``note`` becomes its description."""
        with self._logging_to(run_id, "the report"):
            self.client.log_artifacts(run_id, str(folder), "report")
            self.client.set_tag(run_id, "mlflow.note.content", note)

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        items = _params(params)
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100])


@dataclass
class _Pending:
    """A trial run's writes not yet made."""

    params: list[Any] = field(default_factory=list)
    metrics: list[Any] = field(default_factory=list)
    files: dict[str, Any] = field(default_factory=dict)  # artifact path -> JSON data


def _params(params: dict[str, Any]) -> list[Any]:
    from mlflow.entities import Param

    return [Param(k, redact(str(v))[:6000]) for k, v in params.items() if v is not None]


def _now_ms() -> int:
    return int(time.time() * 1000)


# --------------------------------------------------------------------------------------------------
# Gradient histograms, read back: the trainer's per-epoch histograms, logged by the study as JSON artifacts
# under HISTOGRAM_ARTIFACT_DIR/epoch_NNNN.json of each trial's run.

HISTOGRAM_ARTIFACT_DIR = "grad_histograms"


@dataclass(frozen=True)
class GradHistogram:
    """One trial's gradient histogram at one epoch, as logged to MLflow."""

    trial: int
    run_id: str
    state: str
    batch_size: int
    lr: float
    momentum: float
    epoch: int
    measured_steps: int
    edges: tuple[float, ...]
    counts: tuple[int, ...]
    layers: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def density(self, layer: str | None = None) -> np.ndarray:
        """Fraction of gradient values in each bin (whole model, or one layer)."""
        c = np.asarray(self.layers[layer] if layer else self.counts, dtype=float)
        return c / c.sum() if c.sum() > 0 else c


def load_grad_histograms(tracking_uri: str, study_name: str, experiment: str = "bstune",
                         epoch: int | str | None = None) -> dict[int, list[GradHistogram]]:
    """A study's gradient histograms from MLflow, grouped by batch size (sorted), each group sorted by trial
    and epoch. `epoch`: an epoch number, "last" (each trial's last histogram), or None (all)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per run otherwise
    mlflow = mlflow_client(tracking_uri)
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        return {}
    runs = mlflow.search_runs(
        [exp.experiment_id], max_results=50_000,
        filter_string=f"tags.`bstune.study` = '{study_name}' and tags.`bstune.kind` = 'trial'")
    out: dict[int, list[GradHistogram]] = {}
    for run in runs:
        # only the files asked for are fetched: a long study keeps one per trial and epoch
        files = sorted(f.path for f in mlflow.list_artifacts(run.info.run_id, HISTOGRAM_ARTIFACT_DIR)
                       if Path(f.path).name.startswith("epoch_") and f.path.endswith(".json"))
        if epoch == "last":
            files = files[-1:]
        elif epoch is not None:
            files = [f for f in files if Path(f).name == f"epoch_{epoch:04d}.json"]
        with tempfile.TemporaryDirectory() as tmp:
            for name in files:
                path = Path(mlflow.download_artifacts(run.info.run_id, name, tmp))
                h = _histogram(json.loads(path.read_text()), run)
                out.setdefault(h.batch_size, []).append(h)
    return {b: sorted(hs, key=lambda h: (h.trial, h.epoch)) for b, hs in sorted(out.items())}


def _histogram(d: dict, run: object) -> GradHistogram:
    p, tags = run.data.params, run.data.tags  # type: ignore[attr-defined]
    return GradHistogram(
        trial=int(tags.get("bstune.trial", -1)), run_id=run.info.run_id,  # type: ignore[attr-defined]
        state=tags.get("bstune.state", ""), batch_size=int(d.get("batch_size", p.get("batch_size", 0))),
        lr=float(p.get("lr", "nan")), momentum=float(p.get("momentum", "nan")), epoch=int(d["epoch"]),
        measured_steps=int(d.get("measured_steps", 0)), edges=tuple(d["edges"]), counts=tuple(d["counts"]),
        layers={k: tuple(v) for k, v in d.get("layers", {}).items()},
    )
