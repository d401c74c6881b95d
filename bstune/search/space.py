"""The joint search space (B, lr, m) and the Optuna sampler and pruner that respect its structure.

Two rules matter for the analysis downstream:
- every batch size gets its share of trials (the analysis needs an optimum per batch size), so the batch
  size is not left to the sampler: each new trial takes the batch size with the fewest trials so far;
- lr and momentum are sampled, and trials pruned, only against trials of the *same* batch size: the best
  lr moves with B, so what is good at B = 32 says little about B = 512, and a median over all batch sizes
  would prune the batch sizes that converge slower per epoch.

Both are done the way Optuna's HyperbandPruner does brackets: the inner sampler or pruner gets a view of
the study in which only the trials of one batch size exist. The exception is the `law` sampler
(law_sampler.py): it takes the move with B out, relative to a fitted lr*(B), and so learns from every batch size.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution
from optuna.pruners import BasePruner
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from bstune.search._optuna import batch_size_view, fresh_trials
from bstune.search.law_sampler import LawSampler
from bstune.spec import Search
from bstune.trials import BATCH_SIZE, LR, ONE_MINUS_M, Attr, State, counts_as_trial


@dataclass(frozen=True)
class Hyperparams:
    """One point of the space: what a trial trains with."""

    batch_size: int
    lr: float
    momentum: float

    @property
    def effective_lr(self) -> float:
        return self.lr / (1.0 - self.momentum)


class SearchSpace:
    """Batch sizes x log-uniform lr x momentum searched log-uniformly on 1 - m."""

    def __init__(self, search: Search) -> None:
        self.batch_sizes = tuple(search.batch_sizes)
        self.lr = search.lr
        self.momentum = search.momentum

    def distributions(self) -> dict[str, BaseDistribution]:
        """The continuous part, as Optuna distributions (momentum omitted when it is fixed)."""
        d: dict[str, BaseDistribution] = {}
        if self.lr[0] < self.lr[1]:
            d[LR] = FloatDistribution(self.lr[0], self.lr[1], log=True)
        lo, hi = 1.0 - self.momentum[1], 1.0 - self.momentum[0]
        if lo < hi:
            d[ONE_MINUS_M] = FloatDistribution(lo, hi, log=True)
        return d

    def suggest(self, trial: optuna.Trial) -> Hyperparams:
        """Ask the trial for a point; the batch size first, so the rest can be conditioned on it."""
        b = int(trial.suggest_categorical(BATCH_SIZE, list(self.batch_sizes)))
        lr = trial.suggest_float(LR, *self.lr, log=True) if self.lr[0] < self.lr[1] else self.lr[0]
        m = self.momentum[0]
        if self.momentum[0] < self.momentum[1]:
            one_minus_m = trial.suggest_float(ONE_MINUS_M, 1.0 - self.momentum[1], 1.0 - self.momentum[0], log=True)
            m = min(max(1.0 - one_minus_m, self.momentum[0]), self.momentum[1])
        return Hyperparams(batch_size=b, lr=float(lr), momentum=float(m))


# --------------------------------------------------------------------------------------------------
# Sampler


class BatchSizeSampler(BaseSampler):
    """Gives each trial the least-covered batch size, then samples (lr, m) with an inner sampler that only
    sees trials of that batch size.

    Batch sizes at which a trial ran out of memory are dropped from the rotation: they will not fit later.
    """

    def __init__(self, inner: BaseSampler, space: SearchSpace, seed: int | None = None) -> None:
        self._inner = inner
        self._space = space
        self._rng = random.Random(seed)
        self._relative: dict[int, dict[str, Any]] = {}
        self._pinned: int | None = None

    def pin(self, batch_size: int | None) -> None:
        """Give every new trial this batch size (a fused group's), until pinned to None."""
        self._pinned = batch_size

    @property
    def inner(self) -> BaseSampler:
        return self._inner

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return {}

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict) -> dict[str, Any]:
        return {}

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        if param_name == BATCH_SIZE:
            assert isinstance(param_distribution, CategoricalDistribution)
            return self._pinned if self._pinned is not None else self.least_covered(study)[0]
        b = trial.params[BATCH_SIZE]
        # A pooled inner sampler (LawSampler) learns across batch sizes and gets the whole study.
        pooled = getattr(self._inner, "sees_all_batch_sizes", False)
        view = study if pooled else batch_size_view(study, b, trial, sampler=self._inner)
        # Model-based samplers (GP, QMC, multivariate TPE) propose all continuous params at once; ask once
        # per trial, on the view, and hand the values out as the objective asks for them.
        if trial.number not in self._relative:
            self._relative = {trial.number: self._inner.sample_relative(view, trial, self._space.distributions())}
        rel = self._relative[trial.number]
        if param_name in rel:
            return rel[param_name]
        return self._inner.sample_independent(view, trial, param_name, param_distribution)

    def least_covered(self, study: optuna.Study, trials: Sequence[FrozenTrial] | None = None) -> tuple[int, int]:
        """The batch size with the fewest trials so far (ties broken at random, batch sizes that ran out of
        memory left out), and how many it has; from `trials` if given (the study's, just read)."""
        choices = self._space.batch_sizes
        counts = {c: 0 for c in choices}
        oom = set()
        for t in fresh_trials(study) if trials is None else trials:
            b = t.params.get(BATCH_SIZE)
            # an interrupted or lost trial was queued again: its retry (waiting, running or done) counts
            if b not in counts or (t.state.is_finished() and not counts_as_trial(t)):
                continue
            if t.state == TrialState.FAIL and t.user_attrs.get(Attr.STATE) == State.OOM:
                oom.add(b)
            counts[b] += 1
        usable = [c for c in choices if c not in oom] or list(choices)
        fewest = min(counts[c] for c in usable)
        return self._rng.choice([c for c in usable if counts[c] == fewest]), fewest

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._inner.before_trial(study, trial)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Any) -> None:
        self._relative.pop(trial.number, None)
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._rng = random.Random()
        self._inner.reseed_rng()


def make_sampler(search: Search, space: SearchSpace, seed_offset: int = 0) -> BatchSizeSampler:
    """The spec's sampler, wrapped so it works per batch size. seed_offset separates parallel workers."""
    s = search.sampler
    seed = None if s.seed is None else s.seed + seed_offset
    n0 = s.n_startup_trials
    if s.name == "tpe":
        # constant liar: trials still running (a fused group's, other workers') count as bad, so the next
        # proposals spread out instead of piling onto one point
        inner: BaseSampler = optuna.samplers.TPESampler(n_startup_trials=n0, seed=seed, multivariate=True,
                                                        constant_liar=True)
    elif s.name == "random":
        inner = optuna.samplers.RandomSampler(seed=seed)
    elif s.name == "qmc":
        inner = optuna.samplers.QMCSampler(qmc_type="sobol", scramble=True, seed=seed, warn_independent_sampling=False)
    elif s.name == "gp":
        inner = optuna.samplers.GPSampler(n_startup_trials=n0, seed=seed)
    elif s.name == "law":
        inner = LawSampler(n_startup_trials=n0 * len(space.batch_sizes), seed=seed)
    else:  # spec validation makes this unreachable
        raise ValueError(f"unknown sampler {s.name!r}")
    return BatchSizeSampler(inner, space, seed=seed)


# --------------------------------------------------------------------------------------------------
# Pruner


class WithinBatchSizePruner(BasePruner):
    """Runs an inner pruner, one per batch size (``make_inner(batch_size)``), against the trials of that
    batch size only. One each, not one shared: a run's length in epochs can differ between batch sizes
    (hold: steps), and Hyperband sizes its brackets by it."""

    def __init__(self, make_inner: Callable[[int], BasePruner], warmup: int = 0, finished_only: bool = False) -> None:
        self._make_inner = make_inner
        self._inner: dict[int, BasePruner] = {}
        self.warmup = warmup  # the inner pruner never prunes before this epoch: no need to read the trials
        self.finished_only = finished_only  # it compares finished trials only (not running ones': see PruneRound)

    def inner(self, batch_size: int) -> BasePruner:
        if batch_size not in self._inner:
            self._inner[batch_size] = self._make_inner(batch_size)
        return self._inner[batch_size]

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        b = trial.params.get(BATCH_SIZE)
        if b is None or trial.last_step is None or trial.last_step < self.warmup:
            return False
        inner = self.inner(b)
        return inner.prune(batch_size_view(study, b, trial, pruner=inner), trial)


# Within this fraction of the chance level a trial counts as at chance: a loss of 2.19 or more for 10 classes
# (chance ln 10 = 2.30), an accuracy of 10.5% or less. Far from any trial that is learning after the warm-up.
DEAD_MARGIN = 0.05


def chance_level(objective: str, num_classes: int) -> float | None:
    """The objective of a model that gives every class the same probability: ln C for a loss, 1/C for the
    accuracy; None where the targets are not class labels (a user's regression: nothing is at chance)."""
    if num_classes < 2:
        return None
    return 1.0 / num_classes if objective == "val_accuracy" else math.log(num_classes)


class DeadPruner(BasePruner):
    """Prunes only the clearly dead trials: after the warm-up, one whose objective is not finite or is still at
    chance level (within DEAD_MARGIN of it). It compares a trial with nothing but the chance level, never
    with the other trials, so the valley's walls, which the analysis fits, run to the end. (A run whose loss
    explodes is stopped by the trainer already, as DIVERGED.)"""

    def __init__(self, chance: float | None, warmup: int) -> None:
        self._chance = chance
        self.warmup = warmup  # it prunes nothing before this epoch
        self.finished_only = True  # reads no other trial: one read of the study a round is plenty (PruneRound)

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or step < self.warmup:
            return False
        value = trial.intermediate_values[step]
        if not math.isfinite(value):
            return True
        if self._chance is None:
            return False
        if study.direction == optuna.study.StudyDirection.MAXIMIZE:
            return value <= self._chance * (1.0 + DEAD_MARGIN)
        return value >= self._chance * (1.0 - DEAD_MARGIN)


def make_pruner(search: Search, epochs_at: Callable[[int], int], num_classes: int = 0) -> BasePruner:
    """The spec's pruner, per batch size; ``epochs_at(batch_size)`` is how many epochs a run there lasts,
    ``num_classes`` the data's (the ``dead`` pruner's chance level)."""
    p = search.pruner
    if p.name == "none":
        return optuna.pruners.NopPruner()
    if p.name == "dead":
        return DeadPruner(chance_level(search.objective, num_classes), p.n_warmup_epochs)

    def make_inner(batch_size: int) -> BasePruner:
        if p.name == "median":
            return optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_epochs)
        if p.name == "percentile":
            # Keeps the best `percentile` percent (the median pruner keeps 50%): a high one prunes only the
            # clearly hopeless trials and lets the valley's walls finish, which the analysis's fit needs.
            return optuna.pruners.PercentilePruner(
                p.percentile, n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_epochs)
        return optuna.pruners.HyperbandPruner(
            min_resource=p.min_resource, max_resource=epochs_at(batch_size), reduction_factor=p.reduction_factor)

    return WithinBatchSizePruner(make_inner, warmup=0 if p.name == "hyperband" else p.n_warmup_epochs,
                                 finished_only=p.name in ("median", "percentile"))
