"""What a person sees while a study runs: a live line per trial with the study's progress (trials done, budget
spent, ETA, best so far), a periodic progress line in logs, and a summary table at the end."""

from __future__ import annotations

import shutil
import sys
import time
from typing import Protocol, TextIO

from bstune.search.space import Hyperparams
from bstune.spec import OBJECTIVES, Budget
from bstune.trials import RETRIED_STATES, Spent, State, StateCounts, TrialTable, describe


class Progress(Protocol):
    """What a study tells whoever watches it."""

    def trial_started(self, number: int, config: Hyperparams) -> None: ...
    def epoch_done(self, number: int, config: Hyperparams, epoch: int, epochs: int, value: float) -> None: ...
    def trial_finished(self, number: int, config: Hyperparams, state: str, value: float | None, seconds: float,
                       reason: str) -> None: ...
    def note(self, text: str) -> None: ...
    def budget_spent(self, spent: Spent, best: float | None = None) -> None: ...


class SilentProgress:
    def trial_started(self, number: int, config: Hyperparams) -> None:
        pass

    def epoch_done(self, number: int, config: Hyperparams, epoch: int, epochs: int, value: float) -> None:
        pass

    def trial_finished(self, number: int, config: Hyperparams, state: str, value: float | None, seconds: float,
                       reason: str) -> None:
        pass

    def note(self, text: str) -> None:
        pass

    def budget_spent(self, spent: Spent, best: float | None = None) -> None:
        pass


def _point(c: Hyperparams) -> str:
    return f"B={c.batch_size:<5d} lr={c.lr:<9.3g} m={c.momentum:<6.3f}"


class ConsoleProgress:
    """On a terminal the trial's line is rewritten every epoch, followed by the study's progress; in a log, one
    line per finished trial and a `progress:` line every `summary_every` seconds."""

    def __init__(self, metric: str, stream: TextIO | None = None, live: bool | None = None,
                 budget: Budget | None = None, summary_every: float = 60.0) -> None:
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty() if live is None else live
        self.metric = metric
        self.start = self.last_summary = time.perf_counter()
        self.count = 0
        self.budget, self.summary_every = budget, summary_every
        self.spent: Spent | None = None  # the study's, as of the last budget check and the trials since
        self.first: tuple[float, float] | None = None  # (time, fraction of the budget) when first told
        self.best: float | None = None
        self.maximize = OBJECTIVES.get(metric) == "maximize"

    def _write(self, text: str, final: bool) -> None:
        if self.live:
            width = shutil.get_terminal_size().columns - 1  # a wrapped line cannot be rewritten
            self.stream.write("\r\033[K" + (text if final else text[:width]) + ("\n" if final else ""))
        elif final:
            self.stream.write(text + "\n")
        self.stream.flush()

    def _live(self, text: str) -> None:
        study = self.study_line()
        self._write(f"{text}  | {study}" if study else text, final=False)

    def trial_started(self, number: int, config: Hyperparams) -> None:
        self._live(f"trial {number:4d}  {_point(config)}  starting")

    def epoch_done(self, number: int, config: Hyperparams, epoch: int, epochs: int, value: float) -> None:
        self._live(f"trial {number:4d}  {_point(config)}  epoch {epoch}/{epochs}  {self.metric}={value:.4g}")
        self._maybe_summary()

    def trial_finished(self, number: int, config: Hyperparams, state: str, value: float | None, seconds: float,
                       reason: str) -> None:
        self.count += 1
        if state == State.COMPLETE:
            self._better(value)
        if self.spent is not None:
            counted = state not in RETRIED_STATES
            self.spent = Spent(self.spent.trials + counted, self.spent.examples, self.spent.seconds + seconds)
        v = f"{self.metric}={value:.4g}" if value is not None else ""
        why = f"  ({reason})" if reason and state not in (State.COMPLETE, State.PRUNED) else ""
        self._write(f"trial {number:4d}  {_point(config)}  {state:<9s} {v:<18s} {seconds:5.1f}s{why}", final=True)
        if self.live and (study := self.study_line()):
            self._write(study, final=False)
        self._maybe_summary()

    def note(self, text: str) -> None:
        self._write(text, final=True)

    def _better(self, value: float | None) -> None:
        if value is not None and (self.best is None or (value > self.best if self.maximize else value < self.best)):
            self.best = value

    def budget_spent(self, spent: Spent, best: float | None = None) -> None:
        """The study's spend and its best completed value (all workers', earlier runs' too), told before each
        group of trials."""
        self.spent = spent
        self._better(best)
        if self.first is None and (f := self.fraction()) is not None:
            self.first = (time.perf_counter(), f)

    def fraction(self) -> float | None:
        """The share of the budget spent: that of the limit nearest to being reached."""
        b, s = self.budget, self.spent
        if b is None or s is None:
            return None
        parts = [s.trials / b.trials if b.trials else 0.0, s.examples / b.examples if b.examples else 0.0,
                 s.seconds / b.seconds if b.seconds else 0.0]
        return min(1.0, max(parts))

    def eta(self) -> float | None:
        """Seconds until the budget is spent, at the pace of this run so far."""
        f = self.fraction()
        if f is None or self.first is None or f <= self.first[1]:
            return None
        t0, f0 = self.first
        return (1.0 - f) * (time.perf_counter() - t0) / (f - f0)

    def study_line(self) -> str:
        """'study: 12/24 trials, 48% of budget, ETA 5m12s, best val_loss=0.3812' (what is known of it)."""
        parts = []
        if self.spent is not None:
            limit = f"/{self.budget.trials}" if self.budget and self.budget.trials else ""
            parts.append(f"{self.spent.trials}{limit} trials")
        if (f := self.fraction()) is not None:
            parts.append(f"{f:.0%} of budget")
            eta = self.eta()
            parts.append(f"ETA {_duration(eta)}" if eta is not None else "ETA -")
        if self.best is not None:
            parts.append(f"best {self.metric}={self.best:.4g}")
        return "study: " + ", ".join(parts) if parts else ""

    def _maybe_summary(self) -> None:
        now = time.perf_counter()
        if self.live or now - self.last_summary < self.summary_every or not (study := self.study_line()):
            return
        self.last_summary = now
        self._write(f"progress: {study.removeprefix('study: ')}, {_duration(now - self.start)} elapsed",
                    final=True)


def _duration(seconds: float) -> str:
    """3h05m, 5m12s, 42s."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def format_summary(table: TrialTable, spent: Spent, budget: Budget, stop_reason: str, wall: float) -> str:
    """Best trial per batch size, counts by state, and the budget spent."""
    lines = [f"study {table.study_name}: {len(table.records)} trials, {stop_reason or 'done'}",
             f"{'batch':>7} {'trials':>6} {'done':>5} {'pruned':>6} {'diverged':>8} {'failed':>6}   "
             f"{'best lr':>9} {'momentum':>8} {'eff. lr':>9} {'best ' + table.metric:>16}"]
    for b, rs in table.by_batch_size().items():
        n = StateCounts.of(r.state for r in rs)
        r = table.best(rs)
        head = (f"{b:>7} {len(rs):>6} {n[State.COMPLETE]:>5} {n[State.PRUNED]:>6} "
                f"{n[State.DIVERGED]:>8} {n.failed:>6}   ")
        if r is not None:
            lines.append(head + f"{r.lr:>9.4g} {r.momentum:>8.3f} {r.effective_lr:>9.4g} {r.value:>16.4g}")
        else:
            lines.append(head + f"{'-':>9} {'-':>8} {'-':>9} {'-':>16}")
    lines.append(f"spent: {describe(budget, spent)}; wall time {wall:.0f}s")
    return "\n".join(lines)
