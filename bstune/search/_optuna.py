"""Optuna's private API (but for the heartbeats', in `_beats.py`, and the journal's, in `_journal.py`), and the
per-batch-size view of a study built on it.

Optuna gives no public way to read a study's trials past its cache, to write study-level system attributes,
or to hand a sampler or pruner a study that holds only some trials (its HyperbandPruner does the last with a
private `_BracketStudy`). bstune needs all three; if an Optuna release changes them, this module is where.
"""

from __future__ import annotations

import contextlib
import copy
import json
import threading
import warnings
from collections.abc import Container, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.pruners import BasePruner
from optuna.samplers import BaseSampler
from optuna.storages._cached_storage import _CachedStorage
from optuna.trial import FrozenTrial, TrialState

from bstune.trials import BATCH_SIZE


def trial_id(trial: optuna.Trial | FrozenTrial) -> int:
    """The trial's id in its storage (unique across studies, unlike its number)."""
    return trial._trial_id


def fresh_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Every trial as the storage has it now: other workers' new trials included (no cache)."""
    return study._get_trials(deepcopy=False, use_cache=False)


def frozen(trial: optuna.Trial) -> FrozenTrial:
    """A running trial as stored (params, attributes and state)."""
    return trial.study._storage.get_trial(trial._trial_id)


def set_user_attrs(trial: optuna.Trial, attrs: dict[str, Any]) -> None:
    """Several user attributes written at once: one transaction where the storage is a database (a trial's
    start and end write six or more, and each commit costs a few ms), one write each elsewhere."""
    set_trial_user_attrs(trial.study._storage, trial._trial_id, attrs)
    trial._cached_frozen_trial.user_attrs.update(attrs)


def set_trial_user_attrs(storage: Any, trial_id: int, attrs: dict[str, Any]) -> None:
    """`set_user_attrs` by the trial's id (UpdateFinishedTrialError if it has ended)."""
    backend = getattr(storage, "_backend", None)  # Optuna wraps an RDBStorage in a cache
    if hasattr(storage, "set_trial_user_attrs"):  # the journal: one append
        storage.set_trial_user_attrs(trial_id, attrs)
        return
    if not isinstance(backend, optuna.storages.RDBStorage):
        for k, v in attrs.items():
            storage.set_trial_user_attr(trial_id, k, v)
        return
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    with _create_scoped_session(backend.scoped_session, True) as session:
        if not _upsert_user_attrs(backend, session, trial_id, attrs):
            for k, v in attrs.items():
                backend._set_trial_attr_without_commit(session, models.TrialUserAttributeModel, trial_id, k, v)


def _upsert_user_attrs(backend: optuna.storages.RDBStorage, session: Any, trial_id: int,
                       attrs: dict[str, Any]) -> bool:
    """On SQLite and PostgreSQL: the trial looked up once and every attribute in one multi-row upsert, the
    statement Optuna's `_set_trial_attr_without_commit` runs per attribute after its own look-up (a start's
    six attributes: 2 statements, not 12). False where Optuna's way is the only one (MySQL, an old SQLite)."""
    from optuna.storages._rdb import models

    insert = _upsert(backend)
    if not attrs or insert is None:
        return not attrs
    backend.check_trial_is_updatable(trial_id, models.TrialModel.find_or_raise_by_id(trial_id, session).state)
    model = models.TrialUserAttributeModel
    stmt = insert(model).values([{"trial_id": trial_id, "key": k, "value_json": json.dumps(v)}
                                 for k, v in attrs.items()])
    session.execute(stmt.on_conflict_do_update(index_elements=[model.trial_id, model.key],
                                               set_={"value_json": stmt.excluded.value_json}))
    return True


def _upsert(backend: Any) -> Any:
    """The dialect's `insert` that has `on_conflict_do_update` (SQLite 3.24+, PostgreSQL), or None."""
    import sqlite3

    dialect = backend.engine.name if isinstance(backend, optuna.storages.RDBStorage) else ""
    if dialect == "sqlite" and sqlite3.sqlite_version_info >= (3, 24):
        from sqlalchemy.dialects.sqlite import insert
    elif dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        return None
    return insert


def report_values(trial: optuna.Trial, values: dict[int, float]) -> None:
    """Several epochs' `Trial.report` at once: the trial looked up once and the values in one multi-row upsert
    where the storage is SQLite or PostgreSQL (2 statements, not 3 a value), a report each elsewhere. The
    trial's cached copy, which its pruner reads, gets them as `report` gives them (a step reported is kept)."""
    cached = trial._cached_frozen_trial.intermediate_values
    fresh = {step: float(v) for step, v in values.items() if step not in cached}
    backend = getattr(trial.study._storage, "_backend", None)
    insert = _upsert(backend)
    if fresh and hasattr(trial.study._storage, "set_trial_intermediate_values"):  # the journal: one append
        trial.study._storage.set_trial_intermediate_values(trial._trial_id, fresh)
        cached.update(fresh)
        return
    if not fresh or insert is None:
        for step, v in fresh.items():
            trial.report(v, step)
        return
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    model = models.TrialIntermediateValueModel
    with _create_scoped_session(backend.scoped_session, True) as session:
        backend.check_trial_is_updatable(trial._trial_id,
                                         models.TrialModel.find_or_raise_by_id(trial._trial_id, session).state)
        rows = []
        for step, v in fresh.items():
            stored, kind = model.intermediate_value_to_stored_repr(v)
            rows.append({"trial_id": trial._trial_id, "step": step, "intermediate_value": stored,
                         "intermediate_value_type": kind})
        stmt = insert(model).values(rows)
        session.execute(stmt.on_conflict_do_update(
            index_elements=[model.trial_id, model.step],
            set_={"intermediate_value": stmt.excluded.intermediate_value,
                  "intermediate_value_type": stmt.excluded.intermediate_value_type}))
    cached.update(fresh)


def study_system_attrs(study: optuna.Study) -> dict[str, Any]:
    return study._storage.get_study_system_attrs(study._study_id)


def set_study_system_attr(study: optuna.Study, key: str, value: Any) -> None:
    study._storage.set_study_system_attr(study._study_id, key, value)


# --------------------------------------------------------------------------------------------------
# A view of a study holding only one batch size's trials


class _BatchSizeStorage:
    """The storage as one batch size's samplers and pruners may see it: its trials (and the asking trial's),
    study-level sampler state kept apart per batch size, and nothing else. Anything not listed raises, so a
    sampler or pruner cannot read or write the whole study through the view without it showing."""

    _ALLOWED = ("get_study_id_from_name", "get_study_directions", "get_all_trials", "get_study_system_attrs",
                "set_study_system_attr", "set_trial_system_attr", "get_trial")

    def __init__(self, base: Any, batch_size: int, keep_trial_id: int | None, study: optuna.Study) -> None:
        self._base = base
        self._batch_size = batch_size
        self._keep = keep_trial_id
        # what a Study made on the view asks first, answered without the 2 SQL statements of asking the storage
        self._study_id, self._name, self._directions = study._study_id, study.study_name, study.directions

    def __getattr__(self, name: str) -> Any:  # called only for names not defined here
        raise AttributeError(f"the per-batch-size view of the storage has no {name!r} "
                             f"(it allows {', '.join(self._ALLOWED)})")

    def get_study_id_from_name(self, study_name: str) -> int:
        return self._study_id if study_name == self._name else self._base.get_study_id_from_name(study_name)

    def get_study_directions(self, study_id: int) -> list[Any]:
        return self._directions if study_id == self._study_id else self._base.get_study_directions(study_id)

    def _mine(self, t: FrozenTrial) -> bool:
        return t.params.get(BATCH_SIZE) == self._batch_size or t._trial_id == self._keep

    def get_all_trials(self, study_id: int, deepcopy: bool = True,
                       states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        b, keep = self._batch_size, self._keep  # `_mine` inlined: this runs over every trial at each ask
        return [t for t in self._base.get_all_trials(study_id, deepcopy=deepcopy, states=states)
                if t.params.get(BATCH_SIZE) == b or t._trial_id == keep]

    def get_trial(self, trial_id: int) -> FrozenTrial:
        t = self._base.get_trial(trial_id)
        if not self._mine(t):
            raise KeyError(f"trial {trial_id} is not of batch size {self._batch_size}")
        return t

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        """Samplers note what they proposed on the asking trial; no other trial is written."""
        if trial_id != self._keep:
            raise KeyError(f"the per-batch-size view writes only the asking trial, not trial {trial_id}")
        self._base.set_trial_system_attr(trial_id, key, value)

    # Study-level sampler state is kept per batch size: QMC's position in its Sobol sequence lives here, and a
    # shared one would deal each batch size every k-th point of one sequence, not a sequence of its own.
    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        prefix = self._prefix()
        attrs = self._base.get_study_system_attrs(study_id)
        return {k[len(prefix):]: v for k, v in attrs.items() if k.startswith(prefix)}

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        self._base.set_study_system_attr(study_id, self._prefix() + key, value)

    def _prefix(self) -> str:
        return f"bstune.b{self._batch_size}:"


def batch_size_view(study: optuna.Study, batch_size: int, trial: FrozenTrial | None = None,
                    pruner: BasePruner | None = None, sampler: BaseSampler | None = None) -> optuna.Study:
    """A Study over the same storage in which only the trials with this batch size (and ``trial``) exist."""
    storage = _BatchSizeStorage(study._storage, batch_size, trial._trial_id if trial else None, study)
    return optuna.Study(
        study_name=study.study_name, storage=storage,  # type: ignore[arg-type]
        sampler=sampler or optuna.samplers.RandomSampler(), pruner=pruner or optuna.pruners.NopPruner(),
    )


class _OneRead:
    """The storage with every trial list read once per round (`forget` starts the next): a group's members
    ask the pruner one after another about the same epoch, and the study need not be read K times for it."""

    def __init__(self, base: Any) -> None:
        self._base = base
        self._reads: dict[int, list[FrozenTrial]] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._base, name)

    def get_all_trials(self, study_id: int, deepcopy: bool = True,
                       states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        if study_id not in self._reads:  # all of them, once: a sampler's reads of two sets of states share it
            self._reads[study_id] = self._base.get_all_trials(study_id, deepcopy=False)
        trials = [t for t in self._reads[study_id] if states is None or t.state in states]
        return copy.deepcopy(trials) if deepcopy else trials

    def forget(self) -> None:
        self._reads.clear()


class PruneRound:
    """The study's pruner asked about a group's trials with one read of the study per epoch, where that
    changes nothing: each member's own reports are its own (the trial passed in), and pruners that compare
    only finished trials (``pruner.finished_only``: median, percentile) see the same trials however often the
    study is read within a group's epoch. Others (Hyperband's rungs are written by the running trials) read
    it at every ask, as a lone trial does."""

    def __init__(self, study: optuna.Study) -> None:
        self._storage = _OneRead(study._storage)
        self._study = optuna.Study(study_name=study.study_name, storage=self._storage,  # type: ignore[arg-type]
                                   sampler=study.sampler, pruner=study.pruner)
        self._once = bool(getattr(study.pruner, "finished_only", False))
        self._epoch: int | None = None
        # No pruner reads the reports (nor does the law sampler: it reads a PRUNED trial's, and none is pruned)
        self.reads_reports = not isinstance(study.pruner, optuna.pruners.NopPruner)
        # Before its warm-up the pruner decides nothing and reads no report: the epochs before it are written
        # with the first one it reads (`report_values`), or with the trial's end
        self.from_epoch = int(getattr(study.pruner, "warmup", 0))

    def should_prune(self, trial: optuna.Trial, epoch: int) -> bool:
        if epoch != self._epoch or not self._once:
            self._storage.forget()
            self._epoch = epoch
        return self._study.pruner.prune(self._study, trial._get_latest_trial())


def ask(study: optuna.Study) -> optuna.Trial:
    """A new trial; its heartbeat is recorded by `Heartbeats` (Optuna warns that only `optimize` does that)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        return study.ask()


def tell(study: optuna.Study, trial: optuna.Trial, value: float | None, state: TrialState) -> TrialState:
    """`study.tell(..., skip_if_finished=True)` less its last step, a second read of the whole trial from the
    storage to return it (7 SQL statements on an RDB): the state the trial now has (another worker's, if it
    had ended already)."""
    from optuna.study._tell import _tell_with_warning

    return _tell_with_warning(study, trial, value, state=state, skip_if_finished=True)[0]


class OneReadStorage(_CachedStorage):
    """Optuna's cache of an RDB storage, which re-reads every unfinished trial whenever the trial list is
    asked for (7 SQL statements on an RDB, however few rows). Within `one_read()` the list is read from the
    database once: an ask's queue look-up and its sampler's two reads share it, as Optuna's own `use_cache`
    shares one between a trial's suggestions. What this process writes meanwhile (the new trial) is in the
    cache already; what other workers write is read at the next ask. A trial created within it is not read
    back from the database for the `optuna.Trial` made on it (7 more statements): the cache has it as created."""

    def __init__(self, backend: optuna.storages.RDBStorage) -> None:
        super().__init__(backend)
        self._read_once: set[int] | None = None  # studies read within the current `one_read`
        self._created: set[int] = set()  # trials created within it, not yet read back
        self._owner: int | None = None  # the thread in it: the heartbeat threads read nothing

    @contextmanager
    def one_read(self) -> Iterator[None]:
        self._read_once, self._owner = set(), threading.get_ident()
        try:
            yield
        finally:
            self._read_once = self._owner = None
            self._created.clear()

    def _within(self) -> bool:
        return self._read_once is not None and self._owner == threading.get_ident()

    def _read_trials_from_remote_storage(self, study_id: int) -> None:
        if self._within():
            if study_id in self._read_once:  # type: ignore[operator]
                return
            self._read_once.add(study_id)  # type: ignore[union-attr]
        super()._read_trials_from_remote_storage(study_id)

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        trial_id = super().create_new_trial(study_id, template_trial)
        if self._within():
            self._created.add(trial_id)
        return trial_id

    def get_trial(self, trial_id: int) -> FrozenTrial:
        if self._within() and trial_id in self._created:  # read once, right after its creation: as created
            self._created.discard(trial_id)
            with self._lock:
                study_id, number = self._trial_id_to_study_id_and_number[trial_id]
                return copy.deepcopy(self._studies[study_id].trials[number])
        return super().get_trial(trial_id)


def one_read(study: optuna.Study) -> contextlib.AbstractContextManager[None]:
    """`OneReadStorage.one_read` where the study's storage is one, else nothing."""
    storage = study._storage
    return storage.one_read() if isinstance(storage, OneReadStorage) else contextlib.nullcontext()


def rdb_of(study: optuna.Study) -> Any:
    """The study's RDBStorage (under Optuna's cache), or None for other storages."""
    storage = getattr(study._storage, "_backend", study._storage)  # Optuna wraps an RDBStorage in a cache
    return storage if isinstance(storage, optuna.storages.RDBStorage) else None


@dataclass(frozen=True)
class TrialSummary:
    """A trial as a reader of a finished study needs it: its state, value, params and some attributes (no
    intermediate values, no system attributes). Duck-types the parts of a FrozenTrial `bstune.trials` reads."""

    number: int
    _trial_id: int
    state: TrialState
    user_attrs: dict[str, Any]
    params: dict[str, Any]
    value: float | None


def trial_summaries(study: optuna.Study, keys: Sequence[str], params: bool = False) -> list[TrialSummary]:
    """Every trial of the study, with only the user attributes `keys` (and with `params`, its params and
    value), read by a few plain queries: a study of 10,000 trials costs megabytes, not the gigabyte Optuna's
    full trials take."""
    rdb = rdb_of(study)
    if rdb is None:
        return [TrialSummary(t.number, t._trial_id, t.state, {k: t.user_attrs[k] for k in keys if k in t.user_attrs},
                             t.params, t.value) for t in study.get_trials(deepcopy=False)]
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    t_, a_, p_, v_ = models.TrialModel, models.TrialUserAttributeModel, models.TrialParamModel, models.TrialValueModel
    of_study = t_.study_id == study._study_id
    with _create_scoped_session(rdb.scoped_session) as session:
        rows = session.query(t_.trial_id, t_.number, t_.state).filter(of_study).order_by(t_.number).all()
        attrs = (session.query(a_.trial_id, a_.key, a_.value_json).join(t_, a_.trial_id == t_.trial_id)
                 .filter(of_study, a_.key.in_(list(keys))).all())
        points = (session.query(p_.trial_id, p_.param_name, p_.param_value, p_.distribution_json)
                  .join(t_, p_.trial_id == t_.trial_id).filter(of_study).all() if params else [])
        values = (session.query(v_.trial_id, v_.value, v_.value_type).join(t_, v_.trial_id == t_.trial_id)
                  .filter(of_study, v_.objective == 0).all() if params else [])
    by_trial: dict[int, dict[str, Any]] = {}
    for tid, key, value in attrs:
        by_trial.setdefault(tid, {})[key] = json.loads(value)
    dists: dict[str, Any] = {}
    point: dict[int, dict[str, Any]] = {}
    for tid, name, value, dist in points:
        d = dists.get(dist) or dists.setdefault(dist, optuna.distributions.json_to_distribution(dist))
        point.setdefault(tid, {})[name] = d.to_external_repr(value)
    value_of = {tid: v_.stored_repr_to_value(v, kind) for tid, v, kind in values}
    return [TrialSummary(number, tid, TrialState(state), by_trial.get(tid, {}), point.get(tid, {}), value_of.get(tid))
            for tid, number, state in rows]
