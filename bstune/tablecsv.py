"""A CSV of trials read by columns: the fast path of ``bstune.trials.from_csv``.

Reading a row at a time costs a few Python calls per cell (10^6 rows: about 40 CPU seconds). Here the file
is read in blocks of text, each split at its commas once and each column converted at once (``map(float,
...)`` into numpy) and checked as a whole (10^6 rows: about 8). Anything this path does not take as it is
(a quote, a blank line, a row with more or fewer fields than the header, a cell that is not a number, a
value out of range, rows of one trial that disagree) makes it give up (``None``): ``trials.from_csv`` then
reads the file row by row, which accepts exactly what it always accepted and names the line of the first
problem. So this path never decides what a table means; it only reads clean tables fast. It does not import
``trials`` (the contract imports it): it returns plain columns, and ``trials`` builds the records.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bstune.errors import BstuneError

REQUIRED_COLUMNS = ("batch_size", "lr", "momentum", "value", "state")
CSV_COLUMNS = ("number", *REQUIRED_COLUMNS, "epoch", "epoch_value", "optimizer_steps", "examples_seen")
_NUMERIC = ("batch_size", "lr", "momentum", "value", "epoch", "epoch_value", "optimizer_steps", "examples_seen")
_BLOCK = 1 << 22  # characters of the file converted at a time (~60,000 rows): their text is held only that long


class Columns:
    """Where each known column is in a CSV's rows."""

    def __init__(self, header: list[str], source: str) -> None:
        cols = [c.strip() for c in header]
        missing = [c for c in REQUIRED_COLUMNS if c not in cols]
        if missing:
            raise BstuneError(f"{source}: missing column(s) {', '.join(missing)}; a trial table needs "
                              f"{', '.join(REQUIRED_COLUMNS)}")
        self.index = {c: cols.index(c) for c in CSV_COLUMNS if c in cols}
        self.n_fields = len(header)

    def get(self, row: list[str], col: str) -> str:
        i = self.index.get(col)
        return row[i].strip() if i is not None and i < len(row) else ""


@dataclass
class RowColumns:
    """A clean table's rows as columns (blank numbers are nan, with a mask where blanks matter)."""

    trial: np.ndarray  # per row: its trial, 0.. in order of first appearance
    keys: list[str]  # per trial: its number's text (without a number column: its line's)
    first: np.ndarray  # per trial: its first row
    states: list[str]  # per trial: its first row's state text, stripped
    num: dict[str, np.ndarray] = field(default_factory=dict)  # per row, every column of _NUMERIC
    blank: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class CurvePoints:
    """Every learning-curve point of a table's records, end to end: by record (its index in the table),
    each record's points in epoch order, as its ``curve`` holds them (nan where a count was not recorded).
    A table read from a CSV carries it, so that the steps fit reads its curves without a Python loop per
    point; it describes ``n_records`` records, and is not used for a table of another length."""

    record: np.ndarray
    epoch: np.ndarray
    value: np.ndarray
    optimizer_steps: np.ndarray
    examples_seen: np.ndarray
    n_records: int


class _Decline(Exception):
    """The table is not one the fast path takes as it is."""


def read_columns(f: Any, line: int, cols: Columns, states: Sequence[str],
                 max_batch_size: int) -> RowColumns | None:
    """The rows of the text file ``f`` (read up to the end of the header, on line ``line``) as columns,
    checked; None where the row-by-row reader must decide. ``states``: the states a row may name, the first
    of them what a blank state means."""
    try:
        out = _read(f, line, cols)
        _check(out, cols, states, max_batch_size)
    except _Decline:
        return None
    return out


def _chunks(f: Any, n_fields: int) -> Iterator[list[list[str]]]:
    """The columns of the rows after the header, a block of text at a time: each block split at its commas
    once (a row that is not one line of exactly the header's fields: _Decline)."""
    rest = ""
    while True:
        block = f.read(_BLOCK)
        text = rest + block
        cut = text.rfind("\n") if block else len(text)
        if cut < 0:
            rest = text
            continue
        chunk, rest = text[:cut], text[cut + 1 :]
        if chunk:
            if '"' in chunk or "\r" in chunk:  # quoted fields, other line ends: the csv module's job
                raise _Decline
            lines = chunk.split("\n")
            if set(map(str.count, lines, itertools.repeat(","))) != {n_fields - 1}:  # also a blank line
                raise _Decline
            fields = ",".join(lines).split(",")
            del lines
            yield [fields[k::n_fields] for k in range(n_fields)]
        if not block:
            return


def _read(f: Any, line: int, cols: Columns) -> RowColumns:
    by_number = "number" in cols.index
    index: dict[str, int] = {}
    trial_parts: list[np.ndarray] = []
    first_parts: list[np.ndarray] = []
    states: list[str] = []
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {c: [] for c in _NUMERIC}
    seen = 0
    for text in _chunks(f, cols.n_fields):
        n = len(text[0])
        keys = (list(map(str.strip, text[cols.index["number"]])) if by_number
                else list(map(str, range(line + seen + 1, line + seen + n + 1))))  # without numbers: its line
        before = len(index)
        ids = np.fromiter((index.setdefault(k, len(index)) for k in keys), dtype=np.int64, count=n)
        # the trials first seen in this chunk, in order of their ids (= of first appearance): their first rows
        _, at = np.unique(np.where(ids >= before, ids, -1), return_index=True)
        at = at[1:] if len(at) and ids[at[0]] < before else at
        state_text = text[cols.index["state"]]
        states.extend(state_text[i].strip() for i in at)
        first_parts.append(at + seen)
        trial_parts.append(ids)
        seen += n
        for c in _NUMERIC:
            parts[c].append(_floats(text[cols.index[c]]) if c in cols.index else _blanks(n))
    out = RowColumns(trial=_join(trial_parts, np.int64), keys=list(index), first=_join(first_parts, np.int64),
                     states=states)
    for c in _NUMERIC:
        out.num[c] = _join([p[0] for p in parts[c]], float)
        out.blank[c] = _join([p[1] for p in parts[c]], bool)
    return out


def _join(arrays: list[np.ndarray], dtype: Any) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype)


def _floats(text: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """A column's numbers (nan where blank) and where it is blank; _Decline on a cell that is not a number."""
    if "" not in text:  # the usual column: no blanks
        try:
            return np.fromiter(map(float, text), dtype=float, count=len(text)), np.zeros(len(text), dtype=bool)
        except ValueError:
            raise _Decline from None
    blank = np.fromiter(map(operator.not_, text), dtype=bool, count=len(text))
    try:  # a cell of spaces is not blank here: the row-by-row reader decides about it
        vals = np.fromiter(map(float, [t or "nan" for t in text]), dtype=float, count=len(text))
    except ValueError:
        raise _Decline from None
    return vals, blank


def _blanks(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full(n, math.nan), np.ones(n, dtype=bool)


def _check(out: RowColumns, cols: Columns, states: Sequence[str], max_batch_size: int) -> None:
    """What the row-by-row reader would refuse (and a little more): _Decline."""
    num, blank = out.num, out.blank
    b, lr, m = num["batch_size"], num["lr"], num["momentum"]
    with np.errstate(invalid="ignore"):
        if blank["batch_size"].any() or blank["lr"].any() or blank["momentum"].any():
            raise _Decline
        if not ((b >= 1) & (b <= max_batch_size) & (b == np.floor(b))).all():
            raise _Decline
        if not ((lr > 0) & np.isfinite(lr) & (m >= 0) & (m < 1)).all():
            raise _Decline
        for c in ("epoch", "optimizer_steps", "examples_seen"):  # blank, or a whole number >= 0
            v = num[c][~blank[c]]
            if not ((v >= 0) & np.isfinite(v) & (v == np.floor(v))).all():
                raise _Decline
    epoch_rows = ~blank["epoch"]
    if epoch_rows.any() and "number" not in cols.index:
        raise _Decline
    if (epoch_rows & blank["epoch_value"] & blank["value"]).any():
        raise _Decline
    f = out.first[out.trial]  # each row's trial's first row: one trial is one point
    if not ((b == b[f]) & (lr == lr[f]) & (m == m[f])).all():
        raise _Decline
    allowed = set(states)
    if any((s or states[0]).upper() not in allowed for s in set(out.states)):
        raise _Decline


def num(text: str, col: str, source: str, line: int) -> float:
    """A cell's number; one line naming the line and column where it is not one (or is infinite where it
    must be finite)."""
    try:
        v = float(text)
    except (TypeError, ValueError):
        raise BstuneError(f"{source}: line {line}: {col} must be a number, got {text!r}") from None
    if math.isinf(v) and col != "value" and col != "epoch_value":
        raise BstuneError(f"{source}: line {line}: {col} must be finite, got {text!r}")
    return v


def opt_int(text: str, col: str, source: str, line: int) -> int | None:
    """A count (>= 0) or None for an empty cell."""
    if not text:
        return None
    v = num(text, col, source, line)
    if not (v >= 0 and v == int(v)):
        raise BstuneError(f"{source}: line {line}: {col} must be a whole number >= 0, got {text!r}")
    return int(v)
