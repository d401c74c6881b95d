"""What a study may spend and what it has spent, read back from the Optuna storage.

Spending is recorded on each trial as it runs (examples processed and seconds of training, updated every
epoch), so a resumed study, or several workers on one storage, all count the same totals.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from optuna.trial import FrozenTrial, TrialState

from bstune.results import RETRIED_STATES
from bstune.spec import Budget


@dataclass(frozen=True)
class Spent:
    trials: int  # finished trials that count against the trial limit
    examples: int
    seconds: float
    running: int = 0

    def as_dict(self) -> dict[str, float]:
        return {"trials": self.trials, "examples": self.examples, "seconds": round(self.seconds, 3)}


def trial_state(t: FrozenTrial) -> str:
    """bstune's state of an Optuna trial (see results.STATES)."""
    if t.state == TrialState.RUNNING:
        return "RUNNING"
    if t.state == TrialState.WAITING:
        return "WAITING"
    recorded = t.user_attrs.get("bstune.state")
    if recorded:
        return recorded
    if t.state == TrialState.COMPLETE:
        return "COMPLETE"
    if t.state == TrialState.PRUNED:
        return "PRUNED"
    # FAIL without our own record: the worker died mid-trial and the heartbeat check failed it.
    return "LOST"


def counts_as_trial(t: FrozenTrial) -> bool:
    return t.state.is_finished() and trial_state(t) not in RETRIED_STATES


def spent(trials: Iterable[FrozenTrial]) -> Spent:
    n = examples = running = 0
    seconds = 0.0
    for t in trials:
        if t.state == TrialState.WAITING:
            continue
        running += t.state == TrialState.RUNNING
        n += counts_as_trial(t)
        examples += int(t.user_attrs.get("examples_seen", 0))
        seconds += float(t.user_attrs.get("train_seconds", 0.0))
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
