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

import numpy as np

from bstune.errors import BstuneError, redact
from bstune.spec import Budget
from bstune.tablecsv import (
    CSV_COLUMNS,
    REQUIRED_COLUMNS,
    Columns,
    CurvePoints,
    RowColumns,
    num,
    opt_int,
    read_columns,
)

__all__ = ["CSV_COLUMNS", "REQUIRED_COLUMNS"]  # and the rest: the CSV's columns are part of the contract


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

# No batch size one trains with is larger (16.8M examples a step): a number beyond it is a typo or a unit slip.
MAX_BATCH_SIZE = 2**24

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


@dataclass(frozen=True, slots=True)  # slots: a CSV of 10^6 rows holds 10^6 of these
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
    return json.dumps([{"epoch": p.epoch, "value": p.value, "optimizer_steps": p.optimizer_steps,
                        "examples_seen": p.examples_seen} for p in curve])


@dataclass(frozen=True, slots=True)
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
    # the records' curve points as arrays, where the reader made them (from_csv); records are not changed
    # in place once read
    curve_points: CurvePoints | None = field(default=None, repr=False, compare=False)

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


# The Optuna state each end state is told as (`study.tell`).
TOLD_AS = {State.COMPLETE: "COMPLETE", State.PRUNED: "PRUNED", State.DIVERGED: "PRUNED", State.OOM: "FAIL",
           State.FAILED: "FAIL", State.INTERRUPTED: "FAIL", State.LOST: "FAIL"}


_BY_VALUE = {s.value: s for s in State}


def trial_state(t: Any) -> State:
    """bstune's state of an Optuna FrozenTrial. Optuna's own final state decides where the two could disagree:
    `bstune.state` is written before the trial is told, so a worker killed between the two leaves a state that
    Optuna never heard, and the heartbeat check then fails the trial: LOST, whatever the attribute says (a
    FAIL-type end, FAILED/OOM/INTERRUPTED, is the same in both and stands; docs/scale-out.md)."""
    # plain dict look-ups, no Enum construction: the claim runs this over every trial of the study
    optuna_state = t.state.name
    recorded = _BY_VALUE.get(t.user_attrs.get(Attr.STATE))
    if TOLD_AS.get(recorded) == optuna_state:  # (never for RUNNING or WAITING: no end is told as those)
        return recorded
    if optuna_state in ("RUNNING", "WAITING", "COMPLETE", "PRUNED"):
        return _BY_VALUE[optuna_state]
    # FAIL without a FAIL-type record of ours: the worker died mid-trial and the heartbeat check failed it.
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


# The user attributes `from_study` reads (a reader may fetch only these).
READ_ATTRS = (Attr.STATE, Attr.REASON, Attr.LR, Attr.MOMENTUM, Attr.CURVE, Attr.EXAMPLES, Attr.SECONDS,
              Attr.GRAD_NOISE_SCALE)


def from_study(study: Any, n_train: int | None = None, trials: Iterable[Any] | None = None) -> TrialTable:
    """The trials of an Optuna study that bstune ran (waiting trials left out); `trials` (default: the
    study's own) may be lighter records with the same state, value, params and `READ_ATTRS` attributes."""
    spec = dict(study.user_attrs.get(StudyAttr.SPEC, {}))
    for key in ("storage", "tracking_uri"):  # stored redacted; redacted again for whatever stored it otherwise
        if isinstance(spec.get(key), str):
            spec[key] = redact(spec[key])
    objective = spec.get("search", {}).get("objective", "value")
    records = []
    for t in study.get_trials(deepcopy=False) if trials is None else trials:
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


def from_csv(path: str | Path, direction: str = "minimize", metric: str = "value") -> TrialTable:
    """Read a CSV of trials: columns batch_size, lr, momentum, value, state, and optionally number, epoch,
    epoch_value (or the row's value), optimizer_steps, examples_seen for learning curves.

    Rows are grouped into trials by the `number` column only, never by their values: rows with the same
    number are the epochs of one trial (they must agree on batch_size, lr and momentum; the first gives the
    value and state). Without a `number` column each row is one whole trial, without a curve, so a
    trial and its retry at the same point stay two trials; rows with an epoch then need a `number`.
    The file is streamed: memory grows with the trials and their curves, not with the text."""
    p = Path(path)
    if not p.exists():
        raise BstuneError(f"{path}: no such file (give a CSV of trials with columns {', '.join(REQUIRED_COLUMNS)})")
    if not p.is_file():
        raise BstuneError(f"{path}: is a directory, not a CSV file of trials")
    try:
        with open(p, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            cols = Columns(next(reader, []), str(path))
            fast = read_columns(f, reader.line_num, cols, CSV_STATES, MAX_BATCH_SIZE)
        points = None
        if fast is not None:
            records, points = _records(fast)
        else:  # row by row: it accepts what it always did, and names the line of the first problem
            with open(p, newline="", encoding="utf-8-sig") as f:
                records = _read_trials(csv.reader(f), str(path))
    except UnicodeDecodeError as e:
        raise BstuneError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x}); save the CSV as UTF-8") from None
    except csv.Error as e:
        raise BstuneError(f"{path}: not a readable CSV ({e}); save it as plain comma-separated text") from None
    except OSError as e:
        raise BstuneError(f"{path}: cannot read it ({e.strerror})") from None
    return TrialTable(records, direction=direction, metric=metric, curve_points=points)


def _records(c: RowColumns) -> tuple[list[TrialRecord], CurvePoints]:
    """The records of a table read by columns (``tablecsv``), as ``_read_trials`` makes them."""
    f, num_, blank = c.first, c.num, c.blank
    value = num_["value"][f]
    values = [v if math.isfinite(v) else None for v in value.tolist()]
    ex_first = np.where(blank["examples_seen"][f], 0, num_["examples_seen"][f]).astype(np.int64).tolist()
    rows = np.flatnonzero(~blank["epoch"])
    rows = rows[np.lexsort((num_["epoch"][rows], c.trial[rows]))]  # stable: ties keep the file's order
    ev = np.where(blank["epoch_value"][rows], num_["value"][rows], num_["epoch_value"][rows])
    arrays = CurvePoints(c.trial[rows], num_["epoch"][rows], ev, num_["optimizer_steps"][rows],
                         num_["examples_seen"][rows], len(f))
    points = list(map(EpochPoint, arrays.epoch.astype(np.int64).tolist(), ev.tolist(),
                      _ints_or_none(num_["optimizer_steps"][rows], blank["optimizer_steps"][rows]),
                      _ints_or_none(num_["examples_seen"][rows], blank["examples_seen"][rows])))
    bounds = np.searchsorted(c.trial[rows], np.arange(len(f) + 1)).tolist()
    b, lr, m = (num_[k][f].tolist() for k in ("batch_size", "lr", "momentum"))
    out = []
    for n, key in enumerate(c.keys):
        curve = tuple(points[bounds[n]:bounds[n + 1]])
        out.append(TrialRecord(number=int(key) if key.isdigit() else n, batch_size=int(b[n]), lr=lr[n],
                               momentum=m[n], value=values[n], state=State((c.states[n] or State.COMPLETE).upper()),
                               curve=curve, examples_seen=(curve[-1].examples_seen or 0) if curve else ex_first[n]))
    return out, arrays


def _ints_or_none(v: np.ndarray, blank: np.ndarray) -> list[int | None]:
    out: list[int | None] = np.where(blank, 0, v).astype(np.int64).tolist()
    for i in np.flatnonzero(blank).tolist():
        out[i] = None
    return out


def _read_trials(reader: Any, source: str) -> list[TrialRecord]:
    cols = Columns(next(reader, []), source)
    by_number = "number" in cols.index
    trials: dict[str, _CsvTrial] = {}
    for row in reader:
        if not any(row):
            continue
        line = reader.line_num
        key = cols.get(row, "number") if by_number else str(line)
        trial = trials.get(key)
        if trial is None:
            trials[key] = trial = _CsvTrial(cols, row, source, line)
        else:
            trial.check_same(cols, row, line)
        if cols.get(row, "epoch"):
            if not by_number:
                raise BstuneError(f"{source}: line {line}: a row with an epoch needs a number column naming its "
                                  f"trial (rows are never grouped by their values); add one, or drop epoch")
            trial.curve.append(_point(cols, row, source, line))
    return [t.record(key, n) for n, (key, t) in enumerate(trials.items())]


class _CsvTrial:
    """One trial as its first CSV row gives it, and its learning curve as its rows add to it."""

    __slots__ = ("source", "line", "batch_size", "lr", "momentum", "value", "state", "examples", "curve")

    def __init__(self, cols: Columns, row: list[str], source: str, line: int) -> None:
        self.source, self.line = source, line
        self.batch_size, self.lr, self.momentum = _config(cols, row, source, line)
        state = (cols.get(row, "state") or State.COMPLETE).upper()
        if state not in CSV_STATES:
            raise BstuneError(f"{source}: line {line}: unknown state {cols.get(row, 'state')!r}; "
                              f"use one of {', '.join(CSV_STATES)}")
        self.state = State(state)
        text = cols.get(row, "value")
        value = num(text, "value", source, line) if text else None
        self.value = value if value is not None and math.isfinite(value) else None
        self.examples = opt_int(cols.get(row, "examples_seen"), "examples_seen", source, line) or 0
        self.curve: list[EpochPoint] = []

    def check_same(self, cols: Columns, row: list[str], line: int) -> None:
        """Rows of one trial number must be the same point."""
        if _config(cols, row, self.source, line) != (self.batch_size, self.lr, self.momentum):
            raise BstuneError(f"{self.source}: line {line}: trial {cols.get(row, 'number')} has another "
                              f"batch_size, lr or momentum than on line {self.line}; give each trial its own number")

    def record(self, key: str, n: int) -> TrialRecord:
        curve = tuple(sorted(self.curve, key=lambda p: p.epoch))
        examples = (curve[-1].examples_seen or 0) if curve else self.examples
        number = int(key) if key.isdigit() else n
        return TrialRecord(number=number, batch_size=self.batch_size, lr=self.lr, momentum=self.momentum,
                           value=self.value, state=self.state, curve=curve, examples_seen=examples)


def _config(cols: Columns, row: list[str], source: str, line: int) -> tuple[int, float, float]:
    """A row's (batch_size, lr, momentum), each checked."""
    text = cols.get(row, "batch_size")
    b = num(text, "batch_size", source, line)
    if not (b >= 1 and b == int(b)):  # also refuses nan
        raise BstuneError(f"{source}: line {line}: batch_size must be a positive integer, got {text!r}")
    if b > MAX_BATCH_SIZE:
        raise BstuneError(f"{source}: line {line}: batch_size {text} is beyond any batch size trained with (at most "
                          f"2^24 = {MAX_BATCH_SIZE:,}); check the column's values and units")
    lr = num(cols.get(row, "lr"), "lr", source, line)
    if not lr > 0:
        raise BstuneError(f"{source}: line {line}: lr must be > 0, got {cols.get(row, 'lr')}")
    m = num(cols.get(row, "momentum"), "momentum", source, line)
    if not 0 <= m < 1:
        raise BstuneError(f"{source}: line {line}: momentum must lie in [0, 1), got {cols.get(row, 'momentum')}")
    return int(b), lr, m


def _point(cols: Columns, row: list[str], source: str, line: int) -> EpochPoint:
    epoch = opt_int(cols.get(row, "epoch"), "epoch", source, line)
    return EpochPoint(epoch=epoch, value=num(cols.get(row, "epoch_value") or cols.get(row, "value"),
                                              "epoch_value", source, line),
                      optimizer_steps=opt_int(cols.get(row, "optimizer_steps"), "optimizer_steps", source, line),
                      examples_seen=opt_int(cols.get(row, "examples_seen"), "examples_seen", source, line))
