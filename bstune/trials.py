"""The contract: what a trial is, once, for the side that runs trials and the side that reads them.

`search/` writes trials into an Optuna study under the names below; `analysis/` and `report/` read them back
as a `TrialTable` (from the study, or from a CSV of trials run anywhere else). This is the only module both
sides import: trial states, the Optuna parameter and attribute names, the trial record and table, what counts
against the budget, and how a table is summarised. It imports neither Optuna nor torch: a study's trials are
read by their attributes (duck-typed), so the reading side stays numpy-only.
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from bstune.errors import BstuneError, redact
from bstune.spec import Budget


class State(StrEnum):
    """bstune's trial states. Optuna's are coarser: DIVERGED is stored as PRUNED (so the samplers learn the
    region is bad), OOM / FAILED / INTERRUPTED / LOST as FAIL, each with its reason."""

    COMPLETE = "COMPLETE"  # trained every epoch
    PRUNED = "PRUNED"  # stopped by the pruner
    DIVERGED = "DIVERGED"  # loss NaN/inf or exploded
    OOM = "OOM"  # the device ran out of memory
    FAILED = "FAILED"  # any other error
    INTERRUPTED = "INTERRUPTED"  # Ctrl-C; queued to run again
    LOST = "LOST"  # its worker died; queued to run again
    RUNNING = "RUNNING"
    WAITING = "WAITING"  # queued, not started


ENDED = (State.COMPLETE, State.PRUNED, State.DIVERGED, State.OOM, State.FAILED, State.INTERRUPTED, State.LOST)
CSV_STATES = (*ENDED, State.RUNNING)  # what a CSV of trials may say
FAILED_STATES = (State.OOM, State.FAILED, State.INTERRUPTED, State.LOST)  # say nothing about the lr
RETRIED_STATES = (State.INTERRUPTED, State.LOST)  # run again by the study: the compute counts, the trial does not

# The search space's Optuna parameters. Momentum is searched on log(1 - m): 0.9 -> 0.99 is as far as 0 -> 0.9.
BATCH_SIZE = "batch_size"
LR = "lr"
ONE_MINUS_M = "one_minus_momentum"


class Attr:
    """The user attributes bstune writes on each Optuna trial."""

    STATE = "bstune.state"  # a State, once the trial has ended
    REASON = "bstune.reason"
    LR = "lr"  # the values trained with (also when lr or momentum is held, so no Optuna param)
    MOMENTUM = "momentum"
    EFFECTIVE_LR = "effective_lr"
    BATCH_SIZE = "batch_size"
    CURVE = "curve"  # JSON list of EpochPoint
    EXAMPLES = "examples_seen"  # spent so far (updated as the trial runs)
    SECONDS = "train_seconds"
    GRAD_NOISE_SCALE = "grad_noise_scale"
    RUN_ID = "mlflow_run_id"  # the trial's MLflow child run
    WORKER = "bstune.worker"  # host:pid of the worker that ran it
    WORKER_PID = "worker_pid"
    RETRY_OF = "bstune.retry_of"  # the trial number this one re-runs


class StudyAttr:
    """The user attributes bstune writes on the Optuna study."""

    SPEC = "bstune.spec"  # the spec as plain data, URLs without passwords
    N_TRAIN = "bstune.n_train"
    PARENT_RUN = "mlflow_parent_run_id"


# --------------------------------------------------------------------------------------------------
# Records


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


def curve_to_json(curve: Sequence[EpochPoint]) -> str:
    return json.dumps([p.__dict__ for p in curve])


@dataclass(frozen=True)
class TrialRecord:
    number: int
    batch_size: int
    lr: float
    momentum: float
    value: float | None  # final objective; None unless COMPLETE (or the last value of a PRUNED trial)
    state: State
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
        return [r for r in (self.records if records is None else records) if r.state == State.COMPLETE
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


# --------------------------------------------------------------------------------------------------
# Counting: states and the budget


@dataclass(frozen=True)
class StateCounts:
    """How many trials ended in each state."""

    counts: Counter

    @classmethod
    def of(cls, states: Iterable[str]) -> StateCounts:
        return cls(Counter(State(s) for s in states))

    def __getitem__(self, state: State) -> int:
        return self.counts[state]

    @property
    def failed(self) -> int:
        return sum(self.counts[s] for s in FAILED_STATES)

    @property
    def spent_trials(self) -> int:
        """Trials that count against the trial limit: finished and not run again."""
        return sum(n for s, n in self.counts.items() if s in ENDED and s not in RETRIED_STATES)

    def ordered(self) -> list[tuple[State, int]]:
        """(state, count) in State's order, states with no trial left out."""
        return [(s, self.counts[s]) for s in State if self.counts[s]]


@dataclass(frozen=True)
class Spent:
    trials: int  # finished trials that count against the trial limit
    examples: int
    seconds: float
    running: int = 0

    def as_dict(self) -> dict[str, float]:
        return {"trials": self.trials, "examples": self.examples, "seconds": round(self.seconds, 3)}


def trial_state(t: Any) -> State:
    """bstune's state of an Optuna FrozenTrial."""
    optuna_state = t.state.name
    if optuna_state in ("RUNNING", "WAITING"):
        return State(optuna_state)
    recorded = t.user_attrs.get(Attr.STATE)
    if recorded:
        return State(recorded)
    if optuna_state in ("COMPLETE", "PRUNED"):
        return State(optuna_state)
    # FAIL without our own record: the worker died mid-trial and the heartbeat check failed it.
    return State.LOST


def counts_as_trial(t: Any) -> bool:
    """Whether an Optuna trial counts against the trial limit (finished, and not to be run again)."""
    return t.state.is_finished() and trial_state(t) not in RETRIED_STATES


def tally(trials: Iterable[Any]) -> Spent:
    """What the Optuna trials of a study have spent (every trial records its cost as it runs)."""
    n = examples = running = 0
    seconds = 0.0
    for t in trials:
        if t.state.name == "WAITING":
            continue
        running += t.state.name == "RUNNING"
        n += counts_as_trial(t)
        examples += int(t.user_attrs.get(Attr.EXAMPLES, 0))
        seconds += float(t.user_attrs.get(Attr.SECONDS, 0.0))
    return Spent(trials=n, examples=examples, seconds=seconds, running=running)


def exhausted(budget: Budget, s: Spent, in_flight: int = 0) -> str | None:
    """Why the study must stop now, or None. `in_flight` trials (running elsewhere) count as trials."""
    if budget.trials is not None and s.trials + in_flight >= budget.trials:
        return f"trial limit reached ({s.trials} of {budget.trials})"
    if budget.examples is not None and s.examples >= budget.examples:
        return f"example limit reached ({s.examples:,} of {budget.examples:,.0f})"
    if budget.seconds is not None and s.seconds >= budget.seconds:
        return f"training-time limit reached ({s.seconds:.1f}s of {budget.seconds:g}s)"
    return None


def describe(budget: Budget, s: Spent) -> str:
    """'12/24 trials, 1.2M/5M examples, 33s/150s' for the parts of the budget that are set."""
    parts = [f"{s.trials}" + (f"/{budget.trials}" if budget.trials else "") + " trials",
             short_count(s.examples) + (f"/{short_count(budget.examples)}" if budget.examples else "") + " examples",
             f"{s.seconds:.0f}s" + (f"/{budget.seconds:g}s" if budget.seconds else "") + " training"]
    return ", ".join(parts)


def short_count(x: float) -> str:
    """A count in 3 significant digits with k/M/G: 51.2k."""
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.0f}"


def summarize(table: TrialTable, spent: Spent, stop_reason: str) -> dict[str, Any]:
    """A study's outcome as plain data: the budget spent, counts by state, the best trial overall and per
    batch size (the MLflow parent run's summary.json)."""
    counts = StateCounts.of(r.state for r in table.records)
    best = table.best()
    return {
        "spent": spent.as_dict(), "stop_reason": stop_reason,
        "n_complete": counts[State.COMPLETE], "n_pruned": counts[State.PRUNED],
        "n_diverged": counts[State.DIVERGED], "n_failed": counts.failed,
        "best_trial": best.number if best else None, "best_value": best.value if best else None,
        "best_per_batch_size": {str(b): _best_dict(table.best(rs)) for b, rs in table.by_batch_size().items()},
    }


def _best_dict(r: TrialRecord | None) -> dict[str, Any] | None:
    return None if r is None else {"trial": r.number, "lr": r.lr, "momentum": r.momentum, "value": r.value}


# --------------------------------------------------------------------------------------------------
# Reading a table: from an Optuna study, from a CSV


def from_study(study: Any, n_train: int | None = None) -> TrialTable:
    """The trials of an Optuna study that bstune ran (waiting trials left out)."""
    spec = dict(study.user_attrs.get(StudyAttr.SPEC, {}))
    for key in ("storage", "tracking_uri"):  # stored redacted; redacted again for whatever stored it otherwise
        if isinstance(spec.get(key), str):
            spec[key] = redact(spec[key])
    objective = spec.get("search", {}).get("objective", "value")
    records = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        if Attr.LR not in a or BATCH_SIZE not in t.params:
            continue
        curve = tuple(EpochPoint(**p) for p in json.loads(a.get(Attr.CURVE, "[]")))
        state = trial_state(t)
        value = t.value if t.value is not None else (curve[-1].value if curve and state == State.PRUNED else None)
        records.append(TrialRecord(
            number=t.number, batch_size=int(t.params[BATCH_SIZE]), lr=float(a[Attr.LR]),
            momentum=float(a[Attr.MOMENTUM]), value=value, state=state, curve=curve,
            examples_seen=int(a.get(Attr.EXAMPLES, 0)), train_seconds=float(a.get(Attr.SECONDS, 0.0)),
            grad_noise_scale=a.get(Attr.GRAD_NOISE_SCALE), reason=a.get(Attr.REASON, ""),
        ))
    direction = "maximize" if study.direction.name == "MAXIMIZE" else "minimize"
    return TrialTable(records, direction=direction, metric=objective, study_name=study.study_name,
                      n_train=n_train or study.user_attrs.get(StudyAttr.N_TRAIN),
                      meta={"spec": spec, "mlflow_parent_run_id": study.user_attrs.get(StudyAttr.PARENT_RUN)})


REQUIRED_COLUMNS = ("batch_size", "lr", "momentum", "value", "state")
CSV_COLUMNS = ("number", *REQUIRED_COLUMNS, "epoch", "epoch_value", "optimizer_steps", "examples_seen")


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
    return [_record(key, n, members, source) for n, (key, members) in enumerate(groups.items())]


def _record(key: Any, n: int, members: list[tuple[int, dict[str, str]]], source: str) -> TrialRecord:
    """One trial from its CSV rows (one per epoch, or one for the whole trial)."""
    line, first = members[0]
    b = _num(first["batch_size"], "batch_size", source, line)
    lr = _num(first["lr"], "lr", source, line)
    m = _num(first["momentum"], "momentum", source, line)
    if b < 1 or b != int(b):
        raise BstuneError(f"{source}: line {line}: batch_size must be a positive integer, got {first['batch_size']}")
    if lr <= 0:
        raise BstuneError(f"{source}: line {line}: lr must be > 0, got {first['lr']}")
    if not 0 <= m < 1:
        raise BstuneError(f"{source}: line {line}: momentum must lie in [0, 1), got {first['momentum']}")
    state = (first["state"] or State.COMPLETE).upper()
    if state not in CSV_STATES:
        raise BstuneError(f"{source}: line {line}: unknown state {first['state']!r}; "
                          f"use one of {', '.join(CSV_STATES)}")
    curve = sorted((EpochPoint(
        epoch=int(_num(row["epoch"], "epoch", source, ln)),
        value=_num(row.get("epoch_value") or row["value"], "epoch_value", source, ln),
        optimizer_steps=_opt_int(row.get("optimizer_steps")),
        examples_seen=_opt_int(row.get("examples_seen")),
    ) for ln, row in members if row.get("epoch")), key=lambda p: p.epoch)
    value = _num(first["value"], "value", source, line) if first["value"] else None
    if value is not None and not math.isfinite(value):
        value = None
    number = int(key) if isinstance(key, str) and key.isdigit() else n
    examples = (curve[-1].examples_seen or 0) if curve else (_opt_int(first.get("examples_seen")) or 0)
    return TrialRecord(number=number, batch_size=int(b), lr=lr, momentum=m, value=value, state=State(state),
                       curve=tuple(curve), examples_seen=examples)


def _num(text: str, col: str, source: str, line: int) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        raise BstuneError(f"{source}: line {line}: {col} must be a number, got {text!r}") from None


def _opt_int(text: str | None) -> int | None:
    if text in (None, ""):
        return None
    return int(float(text))
