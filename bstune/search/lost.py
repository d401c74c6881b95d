"""Trials whose worker died, made whole: failed in Optuna, their MLflow run agreeing, their point run again.

A worker may die (SIGKILL, power loss, a storage error) at any instant of a trial's life. Every write of that
life is ordered (docs/scale-out.md) so that what it leaves is one of three things: nothing counted; a RUNNING
trial whose heartbeat goes stale (or that never beat: `StaleTrials`); or a trial that ended with Optuna,
`bstune.state` and its MLflow run agreeing. A stale trial is failed by the next worker to claim trials, and
`Settler` (the storage's stale-trial callback) settles it:

- its final state is `trials.trial_state`: LOST, unless the dead worker had already recorded a FAIL-type end
  (FAILED, OOM, INTERRUPTED), which then stands;
- its MLflow run is closed with that state (made and closed if the worker died before making it);
- a LOST or INTERRUPTED trial's point is queued to run again, once.

A worker killed while settling leaves some of that undone; the sweeps finish it on a later claim or run, and
repair what an older bstune left (a `bstune.state` Optuna never heard, a run closed FINISHED for a lost trial).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial

from bstune.run_spool import repair_orphans, settle_trial
from bstune.search._optuna import fresh_trials, trial_id
from bstune.search.progress import Progress
from bstune.signals import kill_point
from bstune.tracking import Tracker
from bstune.trials import RETRIED_STATES, TOLD_AS, Attr, State, trial_state

LOST_REASON = "worker stopped sending heartbeats (killed or lost) during the trial; re-queued"


def lost_marks(trial: FrozenTrial) -> dict[str, str]:
    """What a stale trial's attributes say as it is failed (`StaleTrials`): LOST, unless its worker had
    recorded a FAIL-type end, which stands. So `bstune.state` agrees with Optuna's state."""
    recorded = trial.user_attrs.get(Attr.STATE)
    if recorded in TOLD_AS and TOLD_AS[State(recorded)] == "FAIL":
        return {}
    return {Attr.STATE: State.LOST, Attr.REASON: LOST_REASON}


def requeue(study: optuna.Study, trial: FrozenTrial) -> None:
    """Queue a trial's exact point to run again (after an interruption or a lost worker), once: a second call
    (a repair after a kill) finds the retry queued and does nothing."""
    if any(t.user_attrs.get(Attr.RETRY_OF) == trial.number for t in fresh_trials(study)):
        return
    # a retry killed before its point was suggested has it only as the queue's fixed params
    params = dict(trial.params) or dict(trial.system_attrs.get("fixed_params", {}))
    study.enqueue_trial(params, user_attrs={Attr.RETRY_OF: trial.number})


class Settler:
    """Settles trials whose worker died; `parent` is the study's MLflow run, once it is known."""

    def __init__(self, tracker: Tracker, progress: Progress, spools: Path | None = None) -> None:
        self.tracker, self.progress, self.spools = tracker, progress, spools
        self.parent: str | None = None

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """The stale-trial callback (under the claim lock): `trial` was just failed in Optuna."""
        self.settle(study, trial)
        state = trial_state(trial)
        what = "re-queued" if state in RETRIED_STATES else f"its worker had recorded it {state}"
        self.progress.note(f"trial {trial.number} was lost with its worker; {what}")

    def settle(self, study: optuna.Study, trial: FrozenTrial, requeue_it: bool = True) -> None:
        """Make an ended trial whole (idempotent): its MLflow run first, then its retry, so a retry queued
        means the run was settled too. Re-queue only under the claim lock (two workers might both find the
        retry missing)."""
        state = trial_state(trial)
        self.settle_run(study, trial, state,
                        LOST_REASON if state == State.LOST else trial.user_attrs.get(Attr.REASON, ""))
        kill_point("settled_run")
        if requeue_it and state in RETRIED_STATES:
            requeue(study, trial)

    def settle_run(self, study: optuna.Study, trial: FrozenTrial, state: State, reason: str) -> None:
        """The trial's MLflow run closed as `state` (made if it has none); idempotent."""
        if self.parent is not None:
            settle_trial(self.spools, self.tracker, self.parent, study.study_name, trial.number, trial_id(trial),
                         state, reason)

    def sweep_unqueued(self, study: optuna.Study, trials: Sequence[FrozenTrial]) -> None:
        """Under the claim lock: settle the LOST or INTERRUPTED trials with no retry queued (their worker, or
        the one settling them, died before queueing it)."""
        retried = {t.user_attrs.get(Attr.RETRY_OF) for t in trials}
        for t in trials:
            if t.state.is_finished() and t.number not in retried and trial_state(t) in RETRIED_STATES:
                self.settle(study, t)

    def repair_spools(self, study: optuna.Study) -> None:
        """Apply the MLflow writes that dead workers spooled and their writers had not applied (`run_spool`),
        then settle each trial that ended in them as Optuna has it: so a late write cannot leave a run
        disagreeing with its trial. Before any trial is settled (under the claim lock, and when a run opens or
        closes the study)."""
        if self.spools is None or not self.spools.is_dir():
            return
        for tid in sorted(repair_orphans(self.spools, self.tracker)):
            with contextlib.suppress(KeyError):
                t = study._storage.get_trial(tid)
                if t.state.is_finished():
                    self.settle(study, t, requeue_it=False)  # a missing retry is queued by the next claim

    def sweep(self, study: optuna.Study) -> None:
        """When a run opens or closes the study: apply dead workers' spooled MLflow writes, settle the trials
        whose `bstune.state` Optuna never heard (an older bstune closed their MLflow run as they said), and
        close the MLflow runs left RUNNING by trials that ended (their worker died between telling Optuna and
        closing the run)."""
        if self.parent is None:
            return
        self.repair_spools(study)
        trials = study.get_trials(deepcopy=False)
        for t in trials:
            recorded = t.user_attrs.get(Attr.STATE)
            if t.state.is_finished() and recorded in TOLD_AS and TOLD_AS[State(recorded)] != t.state.name:
                self.settle(study, t, requeue_it=False)  # a missing retry is queued by the next claim
        by_id = {trial_id(t): t for t in trials}
        for run in self.tracker.trial_runs(self.parent, running=True):
            t = by_id.get(int(run.data.tags.get("optuna.trial_id", -1)))
            if t is not None and t.state.is_finished():
                self.settle(study, t, requeue_it=False)
