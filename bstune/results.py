"""Tracked results as a plain table of trials: what the analysis and the reports read.

A table comes from an Optuna study that bstune ran (`from_study`) or from a CSV file of trials run
anywhere else (`from_csv`), so both are analysed the same way.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bstune.errors import BstuneError

# bstune's trial states. Optuna's own are coarser: DIVERGED is stored as PRUNED (so the samplers learn
# that the region is bad), OOM / FAILED / INTERRUPTED / LOST as FAIL, each with its reason.
STATES = ("COMPLETE", "PRUNED", "DIVERGED", "OOM", "FAILED", "INTERRUPTED", "LOST", "RUNNING")
FAILED_STATES = ("OOM", "FAILED", "INTERRUPTED", "LOST")  # ended without saying anything about the lr
RETRIED_STATES = ("INTERRUPTED", "LOST")  # re-run by the study: the compute counts, the trial does not


@dataclass(frozen=True)
class EpochPoint:
    """One point of a trial's learning curve."""

    epoch: int
    value: float  # the study's objective after this epoch
    optimizer_steps: int | None = None
    examples_seen: int | None = None

    def steps(self, batch_size: int, n_train: int | None) -> float | None:
        """Optimizer steps taken by this point: as recorded, else epochs x ceil(n_train / B), else examples
        seen / B; None when the table says none of these."""
        if self.optimizer_steps is not None:
            return self.optimizer_steps
        if n_train:
            return self.epoch * math.ceil(n_train / batch_size)
        return self.examples_seen / batch_size if self.examples_seen else None


@dataclass(frozen=True)
class TrialRecord:
    number: int
    batch_size: int
    lr: float
    momentum: float
    value: float | None  # final objective; None unless COMPLETE (or the last value of a PRUNED trial)
    state: str
    curve: tuple[EpochPoint, ...] = ()
    examples_seen: int = 0
    train_seconds: float = 0.0
    grad_noise_scale: float | None = None
    reason: str = ""

    @property
    def effective_lr(self) -> float:
        return self.lr / (1.0 - self.momentum)


@dataclass
class TrialTable:
    """All trials of one study, with the objective's name and direction."""

    records: list[TrialRecord]
    direction: str = "minimize"
    metric: str = "value"
    n_train: int | None = None
    study_name: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.direction not in ("minimize", "maximize"):
            raise BstuneError(f"direction must be minimize or maximize, got {self.direction!r}")

    def completed(self, records: Sequence[TrialRecord] | None = None) -> list[TrialRecord]:
        """The completed trials with a value, of ``records`` (default: all)."""
        return [r for r in (self.records if records is None else records) if r.state == "COMPLETE"
                and r.value is not None]

    def best(self, records: Sequence[TrialRecord] | None = None) -> TrialRecord | None:
        """The best completed trial of ``records`` (default: all) in the table's direction; None if none."""
        done = self.completed(records)
        pick = min if self.direction == "minimize" else max
        return pick(done, key=lambda r: r.value) if done else None

    def batch_sizes(self) -> list[int]:
        return sorted({r.batch_size for r in self.records})

    def by_batch_size(self) -> dict[int, list[TrialRecord]]:
        out: dict[int, list[TrialRecord]] = {}
        for r in self.records:
            out.setdefault(r.batch_size, []).append(r)
        return dict(sorted(out.items()))

    def to_csv(self, path: str | Path) -> None:
        """Write one row per trial epoch (or one per trial without a curve), readable by from_csv."""
        cols = ["number", "batch_size", "lr", "momentum", "value", "state", "epoch", "epoch_value",
                "optimizer_steps", "examples_seen"]
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(cols)
            for r in self.records:
                base = [r.number, r.batch_size, r.lr, r.momentum, "" if r.value is None else r.value, r.state]
                if not r.curve:
                    w.writerow(base + ["", "", "", r.examples_seen or ""])
                for p in r.curve:
                    w.writerow(base + [p.epoch, p.value, _blank(p.optimizer_steps), _blank(p.examples_seen)])


REQUIRED_COLUMNS = ("batch_size", "lr", "momentum", "value", "state")


def from_csv(path: str | Path, direction: str = "minimize", metric: str = "value") -> TrialTable:
    """Read a CSV of trials: columns batch_size, lr, momentum, value, state, and optionally
    number, epoch, epoch_value (or the row's value), optimizer_steps, examples_seen for learning curves.
    Rows that share a trial number (or, without a number column, identical batch_size/lr/momentum)
    are the epochs of one trial."""
    p = Path(path)
    if not p.exists():
        raise BstuneError(f"{path}: no such file (give a CSV of trials with columns {', '.join(REQUIRED_COLUMNS)})")
    with open(p, newline="") as f:
        reader = csv.DictReader(f)
        cols = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in REQUIRED_COLUMNS if c not in cols]
        if missing:
            raise BstuneError(f"{path}: missing column(s) {', '.join(missing)}; a trial table needs "
                              f"{', '.join(REQUIRED_COLUMNS)}")
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    return TrialTable(_records_from_rows(rows, str(path)), direction=direction, metric=metric)


def _records_from_rows(rows: Sequence[dict[str, str]], source: str) -> list[TrialRecord]:
    groups: dict[Any, list[tuple[int, dict[str, str]]]] = {}
    for i, row in enumerate(rows, start=2):  # line 1 is the header
        key = row.get("number") or (row["batch_size"], row["lr"], row["momentum"])
        groups.setdefault(key, []).append((i, row))
    records = []
    for n, (key, members) in enumerate(groups.items()):
        line, first = members[0]
        b = _num(first["batch_size"], "batch_size", source, line)
        lr = _num(first["lr"], "lr", source, line)
        m = _num(first["momentum"], "momentum", source, line)
        if b < 1 or b != int(b):
            raise BstuneError(f"{source}: line {line}: batch_size must be a positive integer, "
                              f"got {first['batch_size']}")
        if lr <= 0:
            raise BstuneError(f"{source}: line {line}: lr must be > 0, got {first['lr']}")
        if not 0 <= m < 1:
            raise BstuneError(f"{source}: line {line}: momentum must lie in [0, 1), got {first['momentum']}")
        state = (first["state"] or "COMPLETE").upper()
        if state not in STATES:
            raise BstuneError(f"{source}: line {line}: unknown state {first['state']!r}; "
                              f"use one of {', '.join(STATES)}")
        curve = []
        for ln, row in members:
            if row.get("epoch"):
                v = row.get("epoch_value") or row["value"]
                curve.append(EpochPoint(
                    epoch=int(_num(row["epoch"], "epoch", source, ln)),
                    value=_num(v, "epoch_value", source, ln),
                    optimizer_steps=_opt_int(row.get("optimizer_steps")),
                    examples_seen=_opt_int(row.get("examples_seen")),
                ))
        curve.sort(key=lambda p: p.epoch)
        value = _num(first["value"], "value", source, line) if first["value"] else None
        if value is not None and not math.isfinite(value):
            value = None
        number = int(key) if isinstance(key, str) and key.isdigit() else n
        records.append(TrialRecord(
            number=number, batch_size=int(b), lr=lr, momentum=m, value=value, state=state, curve=tuple(curve),
            examples_seen=(curve[-1].examples_seen or 0) if curve else (_opt_int(first.get("examples_seen")) or 0),
        ))
    return records


def curve_to_json(curve: Sequence[EpochPoint]) -> str:
    return json.dumps([p.__dict__ for p in curve])


def _num(text: str, col: str, source: str, line: int) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        raise BstuneError(f"{source}: line {line}: {col} must be a number, got {text!r}") from None


def _opt_int(text: str | None) -> int | None:
    if text in (None, ""):
        return None
    return int(float(text))


def _blank(v: Any) -> Any:
    return "" if v is None else v


def from_study(study: Any, n_train: int | None = None) -> TrialTable:
    """The trials of an Optuna study that bstune ran (waiting trials left out)."""
    from bstune.budget import trial_state

    spec = study.user_attrs.get("bstune.spec", {})
    objective = spec.get("search", {}).get("objective", "value")
    records = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        if "lr" not in a or "batch_size" not in t.params:
            continue
        curve = tuple(EpochPoint(**p) for p in json.loads(a.get("curve", "[]")))
        state = trial_state(t)
        value = t.value if t.value is not None else (curve[-1].value if curve and state == "PRUNED" else None)
        records.append(TrialRecord(
            number=t.number, batch_size=int(t.params["batch_size"]), lr=float(a["lr"]),
            momentum=float(a["momentum"]), value=value, state=state, curve=curve,
            examples_seen=int(a.get("examples_seen", 0)), train_seconds=float(a.get("train_seconds", 0.0)),
            grad_noise_scale=a.get("grad_noise_scale"), reason=a.get("bstune.reason", ""),
        ))
    direction = "maximize" if study.direction.name == "MAXIMIZE" else "minimize"
    return TrialTable(records, direction=direction, metric=objective, study_name=study.study_name,
                      n_train=n_train or study.user_attrs.get("bstune.n_train"),
                      meta={"spec": spec, "mlflow_parent_run_id": study.user_attrs.get("mlflow_parent_run_id")})


def load_table(storage: str, study_name: str, source: str = "") -> TrialTable:
    """The trial table of a study in an Optuna storage (BstuneError naming the studies there if absent)."""
    from bstune.storage import load_study

    return from_study(load_study(storage, study_name, source=source))
