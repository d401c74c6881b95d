"""What a person sees while a study runs: a live line per trial and a summary table at the end."""

from __future__ import annotations

import sys
import time
from typing import Protocol, TextIO

from bstune.search.space import Hyperparams
from bstune.spec import Budget
from bstune.trials import Spent, State, StateCounts, TrialTable, describe


class Progress(Protocol):
    """What a study tells whoever watches it."""

    def trial_started(self, number: int, config: Hyperparams) -> None: ...
    def epoch_done(self, number: int, config: Hyperparams, epoch: int, epochs: int, value: float) -> None: ...
    def trial_finished(self, number: int, config: Hyperparams, state: str, value: float | None, seconds: float,
                       reason: str) -> None: ...
    def note(self, text: str) -> None: ...


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


def _point(c: Hyperparams) -> str:
    return f"B={c.batch_size:<5d} lr={c.lr:<9.3g} m={c.momentum:<6.3f}"


class ConsoleProgress:
    """On a terminal the trial's line is rewritten every epoch; in a log, one line per finished trial."""

    def __init__(self, metric: str, stream: TextIO | None = None, live: bool | None = None) -> None:
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty() if live is None else live
        self.metric = metric
        self.start = time.perf_counter()
        self.count = 0

    def _write(self, text: str, final: bool) -> None:
        if self.live:
            self.stream.write("\r\033[K" + text + ("\n" if final else ""))
        elif final:
            self.stream.write(text + "\n")
        self.stream.flush()

    def trial_started(self, number: int, config: Hyperparams) -> None:
        self._write(f"trial {number:4d}  {_point(config)}  starting", final=False)

    def epoch_done(self, number: int, config: Hyperparams, epoch: int, epochs: int, value: float) -> None:
        self._write(f"trial {number:4d}  {_point(config)}  epoch {epoch}/{epochs}  {self.metric}={value:.4g}",
                    final=False)

    def trial_finished(self, number: int, config: Hyperparams, state: str, value: float | None, seconds: float,
                       reason: str) -> None:
        self.count += 1
        v = f"{self.metric}={value:.4g}" if value is not None else ""
        why = f"  ({reason})" if reason and state not in (State.COMPLETE, State.PRUNED) else ""
        self._write(f"trial {number:4d}  {_point(config)}  {state:<9s} {v:<18s} {seconds:5.1f}s{why}", final=True)

    def note(self, text: str) -> None:
        self._write(text, final=True)


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
