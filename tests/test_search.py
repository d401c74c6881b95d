"""The law sampler (bstune/search/law_sampler.py) and per-batch-size sampler state, on real Optuna studies."""

from __future__ import annotations

import contextlib
import math
import statistics
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial

from bstune.search._optuna import (
    OneReadStorage,
    PruneRound,
    ask,
    batch_size_view,
    one_read,
    report_values,
    set_user_attrs,
    tell,
)
from bstune.search.law_sampler import LawSampler, Observation, fit_law, observations
from bstune.search.space import DEAD_MARGIN, BatchSizeSampler, SearchSpace, chance_level, make_pruner, make_sampler
from bstune.spec import Pruner, Sampler, Search, load_spec
from bstune.stores import open_storage
from bstune.trials import BATCH_SIZE, LR, ONE_MINUS_M
from tests.conftest import write_spec

SIZES = (32, 128, 512)
SEARCH = Search(batch_sizes=SIZES, lr=(1e-3, 8.0), momentum=(0.0, 0.98),
                sampler=Sampler(name="law", seed=3, n_startup_trials=2))
SPACE = SearchSpace(SEARCH)
B_DIST = CategoricalDistribution(list(SIZES))
LOG2_LR_RANGE = math.log2(8.0 / 1e-3)  # 13 octaves


def _optimum(b: int) -> float:
    """log2 of the best effective lr of the toy valley: the linear scaling rule, 0.5 at B = 128."""
    return math.log2(0.5 * b / 128)


def _loss(b: int, lr: float, m: float) -> float:
    """A valley along lr/(1 - m) that moves with B, on a level that differs between batch sizes."""
    d = math.log2(lr / (1.0 - m)) - _optimum(b)
    return 0.1 * math.log2(b) + min(0.05 * d * d, 2.0) + 0.01 * (math.log2(1.0 - m) + 3.3) ** 2


def _study(n_trials: int, search: Search = SEARCH, storage: str | None = None, seed_offset: int = 0) -> optuna.Study:
    space = SearchSpace(search)
    study = optuna.create_study(study_name="toy", storage=storage, load_if_exists=True,
                                sampler=make_sampler(search, space, seed_offset=seed_offset))

    def objective(trial: optuna.Trial) -> float:
        c = space.suggest(trial)
        trial.set_user_attr("lr", c.lr)
        trial.set_user_attr("momentum", c.momentum)
        return _loss(c.batch_size, c.lr, c.momentum)

    study.optimize(objective, n_trials=n_trials)
    return study


def _eff(t: optuna.trial.FrozenTrial) -> float:
    return math.log2(t.params[LR] / t.params[ONE_MINUS_M])


def _spread(values: list[float]) -> float:
    return max(values) - min(values)


def test_proposals_stay_inside_the_bounds_and_the_allocation_stays_even() -> None:
    study = _study(60)
    for t in study.trials:
        assert 1e-3 <= t.params[LR] <= 8.0
        assert 0.02 - 1e-12 <= t.params[ONE_MINUS_M] <= 1.0 + 1e-12
        assert 0.0 <= t.user_attrs["momentum"] <= 0.98
    assert [sum(t.params[BATCH_SIZE] == b for t in study.trials) for b in SIZES] == [20, 20, 20]


def test_plain_quasi_random_sampling_until_enough_trials_have_finished() -> None:
    # n_startup_trials (2) per batch size: 6 finished trials over all batch sizes before the band is used
    study = _study(5)
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    sampler = LawSampler(n_startup_trials=6, seed=0)
    assert sampler.band(observations(study.trials, study.direction), 32) is not None, "toy trials are in a valley"
    # Not used yet: with startup never over, 30 trials cover the whole lr range like the standard protocol.
    lrs = [math.log2(t.params[LR]) for t in _study(30, search=_sampler(SEARCH, n_startup_trials=1000)).trials]
    assert _spread(lrs) > 0.8 * LOG2_LR_RANGE
    # ... and draw lr and momentum independently (a quasi-random pair, not the same number twice)
    trial = study.ask({BATCH_SIZE: B_DIST})
    frozen = study._storage.get_trial(trial._trial_id)
    point = sampler.sample_relative(study, frozen, SPACE.distributions())
    assert set(point) == {LR, ONE_MINUS_M}
    q_lr = math.log2(point[LR] / 1e-3) / LOG2_LR_RANGE
    q_m = math.log2(point[ONE_MINUS_M] / 0.02) / math.log2(1.0 / 0.02)
    assert abs(q_lr - q_m) > 1e-6


def test_proposals_move_with_the_law_across_batch_sizes() -> None:
    study = _study(90)
    law = fit_law(observations(study.trials, study.direction))
    assert 0.8 < law.slope < 1.2, "the toy optimum scales linearly with B"
    assert law(128) == pytest.approx(_optimum(128), abs=0.75)
    late = study.trials[30:]
    for b in SIZES:
        offsets = [_eff(t) - _optimum(b) for t in late if t.params[BATCH_SIZE] == b]
        assert abs(statistics.median(offsets)) < 1.5, f"B={b}: proposals centred away from its optimum"
        # spread over the valley and its walls (not packed at the best point), but not over the whole range
        assert 3.0 < _spread(offsets) < 0.8 * (LOG2_LR_RANGE + math.log2(50))
    centre = {b: statistics.median(_eff(t) for t in late if t.params[BATCH_SIZE] == b) for b in SIZES}
    assert centre[512] - centre[32] > 2.5, "4 octaves apart in the toy"


def test_band_is_the_pooled_valley_widened_by_the_margin() -> None:
    # one valley seen at B=64 (in it: r = -1 .. 1 around the law) and nothing in a valley elsewhere
    obs = [Observation(64, x - 3.0, -3.0, s, d) for x, s, d in ((-1.0, 0.1, 0.0), (1.0, 0.3, 0.3), (4.0, 0.9, 1.0))]
    sampler = LawSampler(margin=2.0)
    law = fit_law(obs)
    lo, hi = sampler.band(obs, 64)
    assert (lo, hi) == pytest.approx((-1.0 - 2.0, 1.0 + 2.0))  # the trial at 4 is out of the valley
    # at a batch size 4 octaves up, the same band moved by the law (prior slope 1/2 with one batch size)
    lo2, hi2 = sampler.band(obs, 1024)
    assert (lo2 - lo, hi2 - hi) == pytest.approx((2.0, 2.0)) and law.slope == pytest.approx(0.5)
    assert sampler.band([Observation(64, 0.0, 0.0, 0.5, math.inf)], 64) is None, "no trial in a valley yet"


def test_law_fit_uses_the_prior_slope_until_batch_sizes_disagree() -> None:
    obs = [Observation(64, math.log2(0.1), -3.0, s / 4, 0.0) for s in range(4)]
    law = fit_law(obs)
    assert law.slope == pytest.approx(0.5)
    assert law(64) == pytest.approx(math.log2(0.1) + 3.0)
    obs += [Observation(1024, math.log2(0.1) + 4.0, -3.0, s / 4, 0.0) for s in range(4)]
    assert fit_law(obs).slope == pytest.approx(1.0, abs=0.1)  # 4 octaves apart in B and in lr


def test_observations_rank_and_depth_within_each_batch_size() -> None:
    study = optuna.create_study()
    dists = {BATCH_SIZE: B_DIST} | SPACE.distributions()
    for b, lr, value, state, attrs in [
        (32, 0.1, 0.5, TrialState.COMPLETE, {}), (32, 0.2, 0.3, TrialState.COMPLETE, {}),
        (32, 4.0, None, TrialState.PRUNED, {"bstune.state": "DIVERGED"}),
        (512, 0.1, 2.0, TrialState.COMPLETE, {}), (512, 0.01, None, TrialState.PRUNED, {}),
        (512, 1.0, None, TrialState.FAIL, {"bstune.state": "OOM"}),
    ]:
        inter = {3: 2.2} if state == TrialState.PRUNED and not attrs else {}
        study.add_trial(create_trial(state=state, value=value, params={BATCH_SIZE: b, LR: lr, ONE_MINUS_M: 0.1},
                                     distributions=dists, user_attrs=attrs, intermediate_values=inter))
    obs = {(o.batch_size, round(2**o.log2_lr, 3)): o for o in observations(study.get_trials(), study.direction)}
    assert len(obs) == 5, "an OOM trial says nothing about the lr"
    assert obs[(32, 0.2)].score < obs[(32, 0.1)].score < obs[(32, 4.0)].score
    assert obs[(512, 0.1)].score < obs[(512, 0.01)].score
    assert obs[(512, 0.1)].depth == 0.0, "2.0 is B=512's best, whatever B=32 reached"
    assert 0.0 < obs[(32, 0.1)].depth < 1.0
    assert not obs[(32, 4.0)].complete and not obs[(512, 0.01)].complete


def test_stateless_workers_share_one_storage(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path}/o.db"
    _study(5, storage=storage, seed_offset=0)
    _study(5, storage=storage, seed_offset=1000)  # a second worker (another process) joins
    study = optuna.load_study(study_name="toy", storage=storage)
    points = [(t.params[LR], t.params[ONE_MINUS_M]) for t in study.trials]
    assert len(set(points)) == 10, "no point proposed twice"
    # Everything the sampler knows is in the storage: two fresh objects with one seed propose the same point.
    trial = study.ask({BATCH_SIZE: B_DIST})
    frozen = study._storage.get_trial(trial._trial_id)
    one = LawSampler(n_startup_trials=4, seed=7).sample_relative(study, frozen, SPACE.distributions())
    two = LawSampler(n_startup_trials=4, seed=7).sample_relative(study, frozen, SPACE.distributions())
    assert one and one == two


def test_batch_size_sampler_gives_a_pooled_sampler_the_whole_study() -> None:
    sampler = make_sampler(SEARCH, SPACE)
    assert isinstance(sampler, BatchSizeSampler) and isinstance(sampler.inner, LawSampler)
    study = optuna.create_study(sampler=sampler)
    dists = {BATCH_SIZE: B_DIST} | SPACE.distributions()
    for b in (32, 128):  # a valley at each, where the toy has it; nothing at all at B=512 yet
        for d in (-1.0, -0.5, 0.0, 0.5, 1.0, 6.0):
            lr = 2.0 ** (_optimum(b) + d) * 0.1
            study.add_trial(create_trial(value=_loss(b, lr, 0.9), params={BATCH_SIZE: b, LR: lr, ONE_MINUS_M: 0.1},
                                         distributions=dists))
    for _ in range(4):
        trial = study.ask({BATCH_SIZE: B_DIST} | SPACE.distributions())
        assert trial.params[BATCH_SIZE] == 512
        # B=512's first proposals already come from the band the other batch sizes found, moved by the law
        assert abs(_eff(study._storage.get_trial(trial._trial_id)) - _optimum(512)) < 1.0 + 2.0 + 0.5


def test_a_retried_trial_counts_once_in_the_allocation() -> None:
    study = optuna.create_study(sampler=make_sampler(SEARCH, SPACE))
    dists = {BATCH_SIZE: B_DIST} | SPACE.distributions()
    params = {LR: 0.1, ONE_MINUS_M: 0.1}
    for b, state, attrs in [(32, TrialState.FAIL, {"bstune.state": "INTERRUPTED"}),  # Ctrl-C: queued again
                            (32, TrialState.FAIL, {}),  # a worker died: LOST, queued again
                            (32, TrialState.COMPLETE, {}), (32, TrialState.COMPLETE, {}),  # their retries
                            (128, TrialState.COMPLETE, {}), (128, TrialState.COMPLETE, {}),
                            (128, TrialState.COMPLETE, {}), (512, TrialState.FAIL, {"bstune.state": "DIVERGED"}),
                            (512, TrialState.COMPLETE, {}), (512, TrialState.COMPLETE, {})]:
        study.add_trial(create_trial(state=state, value=1.0 if state == TrialState.COMPLETE else None,
                                     params={BATCH_SIZE: b} | params, distributions=dists, user_attrs=attrs))
    # B=32 has 2 trials, the others 3 (a diverged trial counts): the retries' originals do not
    trial = study.ask({BATCH_SIZE: B_DIST} | SPACE.distributions())
    assert trial.params[BATCH_SIZE] == 32


def test_qmc_gives_each_batch_size_its_own_sobol_sequence() -> None:
    search = Search(batch_sizes=(32, 64, 128), lr=(1e-3, 1.0), momentum=(0.0, 0.9),
                    sampler=Sampler(name="qmc", seed=5))
    study = _study(12, search=search)
    alone = _study(4, search=Search(batch_sizes=(32,), lr=(1e-3, 1.0), momentum=(0.0, 0.9),
                                   sampler=Sampler(name="qmc", seed=5)))
    expected = [t.params[LR] for t in alone.trials]
    for b in (32, 64, 128):
        got = [t.params[LR] for t in study.trials if t.params[BATCH_SIZE] == b]
        assert got == pytest.approx(expected), f"B={b} did not get the first points of a Sobol sequence"


def test_spec_names_the_law_sampler(tmp_path: Path) -> None:
    spec = load_spec(write_spec(tmp_path, **{"search.sampler": {"name": "law", "n_startup_trials": 1}}))
    sampler = make_sampler(spec.search, SearchSpace(spec.search))
    assert spec.search.sampler.name == "law" and isinstance(sampler.inner, LawSampler)


def _sampler(search: Search, **changes: object) -> Search:
    import dataclasses

    return dataclasses.replace(search, sampler=dataclasses.replace(search.sampler, **changes))


@pytest.mark.parametrize(("sampler", "pruner"), [("tpe", "median"), ("random", "percentile"), ("qmc", "hyperband"),
                                                 ("gp", "median"), ("law", "hyperband"), ("qmc", "dead")])
def test_every_sampler_and_pruner_works_through_the_per_batch_size_view(tmp_path: Path, sampler: str,
                                                                        pruner: str) -> None:
    search = Search(batch_sizes=SIZES, lr=(1e-3, 8.0), momentum=(0.0, 0.98),
                    sampler=Sampler(name=sampler, seed=1, n_startup_trials=2),
                    pruner=Pruner(name=pruner, n_startup_trials=1, n_warmup_epochs=1))
    space = SearchSpace(search)
    study = optuna.create_study(study_name="toy", storage=f"sqlite:///{tmp_path}/optuna.db",
                                sampler=make_sampler(search, space), pruner=make_pruner(search, lambda b: 4))

    def objective(trial: optuna.Trial) -> float:
        c = space.suggest(trial)
        trial.set_user_attr("lr", c.lr)
        trial.set_user_attr("momentum", c.momentum)
        for epoch in range(1, 5):  # a curve that falls towards the valley's value
            trial.report(_loss(c.batch_size, c.lr, c.momentum) + 1.0 / epoch, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return _loss(c.batch_size, c.lr, c.momentum)

    study.optimize(objective, n_trials=12)
    states = [t.state for t in study.trials]
    assert TrialState.FAIL not in states, "the view lacks something the sampler or pruner asks for"
    assert sorted(t.params[BATCH_SIZE] for t in study.trials) == sorted(SIZES * 4)


@pytest.mark.parametrize(("objective", "classes"), [("val_loss", 10), ("val_accuracy", 10), ("val_loss", 0)])
def test_the_dead_pruner_ends_only_trials_at_chance_or_not_finite_after_the_warm_up(objective: str,
                                                                                    classes: int) -> None:
    search = Search(batch_sizes=SIZES, objective=objective, pruner=Pruner(name="dead", n_warmup_epochs=3))
    chance = chance_level(objective, classes)
    assert chance == (None if classes == 0 else math.log(10) if objective == "val_loss" else 0.1)
    study = optuna.create_study(direction=search.direction, pruner=make_pruner(search, lambda b: 6, classes))
    at_chance = chance if chance is not None else 2.3
    worse = -1.0 if search.direction == "maximize" else 1.0  # a step away from learning, in the objective's sense
    curves = {
        "at chance": [at_chance] * 6,
        "just off chance": [at_chance] * 2 + [at_chance * (1.0 - worse * 2 * DEAD_MARGIN)] * 4,
        "learning": [at_chance - worse * 0.5 * k for k in range(6)],
        "not finite": [at_chance - worse * 0.5 * k for k in range(3)] + [math.nan] * 3,
    }
    pruned_at = {}
    for name, curve in curves.items():
        trial = study.ask()
        for epoch, value in enumerate(curve, start=1):
            trial.report(value, epoch)
            if trial.should_prune():
                pruned_at[name] = epoch
                study.tell(trial, state=TrialState.PRUNED)
                break
        else:
            study.tell(trial, curve[-1] if math.isfinite(curve[-1]) else 0.0)
    # never before the warm-up's end (epoch 3), however dead; a trial with no chance level only when not finite
    expected = {"not finite": 4} | ({"at chance": 3} if chance is not None else {})
    assert pruned_at == expected


def test_the_per_batch_size_view_shows_one_batch_size_and_allows_only_what_it_lists() -> None:
    study = _study(9)
    asking = study.trials[0]
    view = batch_size_view(study, 128, asking)
    assert {t.params[BATCH_SIZE] for t in view.get_trials() if t.number != asking.number} == {128}
    with pytest.raises(AttributeError, match="allows"):
        view._storage.delete_study(study._study_id)
    with pytest.raises(KeyError, match="writes only the asking trial"):
        view._storage.set_trial_system_attr(study.trials[1]._trial_id, "x", 1)


class _CountingStorage:
    """The study's real storage, counting how often its trials are read."""

    def __init__(self, base: object) -> None:
        self._base = base
        self.reads = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self._base, name)

    def get_all_trials(self, *args: object, **kwargs: object) -> object:
        self.reads += 1
        return self._base.get_all_trials(*args, **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("pruner", ["median", "percentile", "hyperband"])
def test_a_group_asks_the_pruner_with_one_read_per_epoch_and_the_same_answers(tmp_path: Path, pruner: str) -> None:
    search = Search(batch_sizes=SIZES, lr=(1e-3, 8.0), momentum=(0.0, 0.98),
                    sampler=Sampler(name="random", seed=1, n_startup_trials=2),
                    pruner=Pruner(name=pruner, n_startup_trials=2, n_warmup_epochs=1, percentile=25.0))

    def curve(c: object, epoch: int) -> float:
        return _loss(c.batch_size, c.lr, c.momentum) + 1.0 / epoch

    def group_of_six(path: Path) -> tuple[optuna.Study, _CountingStorage, list[optuna.Trial], list[object]]:
        """Twelve finished trials, then six running ones, the same in every call (seeded)."""
        space = SearchSpace(search)
        study = optuna.create_study(study_name="toy", storage=f"sqlite:///{path}",
                                    sampler=make_sampler(search, space), pruner=make_pruner(search, lambda b: 6))

        def finished(trial: optuna.Trial) -> float:
            c = space.suggest(trial)
            for epoch in range(1, 7):
                trial.report(curve(c, epoch), epoch)
            return curve(c, 6)

        study.optimize(finished, n_trials=12)
        for lr in (0.5, 0.35, 0.7, 0.002, 0.003, 0.004):  # three near the valley's floor, three far up its wall
            study.enqueue_trial({BATCH_SIZE: 128, LR: lr, ONE_MINUS_M: 0.5})
        counting = _CountingStorage(study._storage)
        study._storage = counting
        group = [study.ask() for _ in range(6)]
        return study, counting, group, [space.suggest(t) for t in group]

    _, _, alone_group, points = group_of_six(tmp_path / "alone.db")
    study, counting, group, same_points = group_of_six(tmp_path / "round.db")
    assert same_points == points
    rounds = PruneRound(study)
    alone, together = [], []
    for epoch in range(1, 7):
        before = counting.reads
        for t, u, c in zip(alone_group, group, points, strict=True):
            for trial, answers in ((t, alone), (u, together)):
                if trial.number not in [n for n, pruned in answers if pruned]:  # a pruned trial is asked no more
                    trial.report(curve(c, epoch), epoch)
            if t.number not in [n for n, pruned in alone if pruned]:
                alone.append((t.number, t.should_prune()))
            if u.number not in [n for n, pruned in together if pruned]:
                together.append((u.number, rounds.should_prune(u, epoch)))
        if pruner != "hyperband":
            assert counting.reads - before <= 1, "more than one read of the study per epoch"
    assert together == alone
    pruned = {n for n, p in alone if p}
    assert {t.number for t in alone_group[3:]} <= pruned < {t.number for t in alone_group}, "not the test meant"


@pytest.mark.parametrize("kind", ["sqlite", "journal", "memory"])
def test_user_attributes_written_at_once_reach_the_storage_and_the_trial(tmp_path: Path, kind: str) -> None:
    storage = {"sqlite": f"sqlite:///{tmp_path}/optuna.db", "memory": None,
               "journal": optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(
                   str(tmp_path / "journal.log")))}[kind]
    study = optuna.create_study(study_name="toy", storage=storage)
    trial = study.ask()
    set_user_attrs(trial, {"a": 1, "b": [0.5, 2], "c": "x"})
    set_user_attrs(trial, {"a": 2})
    assert trial.user_attrs == {"a": 2, "b": [0.5, 2], "c": "x"}
    again = optuna.load_study(study_name="toy", storage=storage) if storage else study
    assert again.trials[0].user_attrs == {"a": 2, "b": [0.5, 2], "c": "x"}
    study.tell(trial, 1.0)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):  # as set_user_attr: the trial is done
        set_user_attrs(trial, {"a": 3})


@pytest.mark.parametrize("kind", ["sqlite", "memory"])
def test_reports_written_at_once_reach_the_storage_and_the_pruner(tmp_path: Path, kind: str) -> None:
    storage = f"sqlite:///{tmp_path}/optuna.db" if kind == "sqlite" else None
    study = optuna.create_study(study_name="toy", storage=storage)
    trial = study.ask()
    report_values(trial, {1: 0.5, 2: math.inf, 3: 0.75})
    report_values(trial, {3: 9.0, 4: 0.25})  # a step reported is kept, as Trial.report keeps it
    wanted = {1: 0.5, 2: math.inf, 3: 0.75, 4: 0.25}
    assert trial._get_latest_trial().intermediate_values == wanted  # what the pruner reads
    again = optuna.load_study(study_name="toy", storage=storage) if storage else study
    assert again.trials[0].intermediate_values == wanted and again.trials[0].last_step == 4
    study.tell(trial, state=TrialState.PRUNED)
    assert again.trials[0].value == 0.25  # a pruned trial's value is its last report, as before
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        report_values(trial, {5: 0.1})


def _proposals(tmp_path: Path, name: str, once: bool) -> tuple[list[tuple[int, float, float]], int]:
    """Twelve TPE trials asked and told on a SQLite storage as a study opens it, each ask and its suggestions
    within `one_read` or not: the points proposed, and the SQL statements of the last ask."""
    import sqlalchemy

    storage = OneReadStorage(open_storage(f"sqlite:///{tmp_path}/{name}.db", 20, writing=True))
    search = _sampler(SEARCH, name="tpe", n_startup_trials=2)
    space = SearchSpace(search)
    study = optuna.create_study(study_name="toy", storage=storage, sampler=make_sampler(search, space))
    statements = []
    sqlalchemy.event.listen(storage._backend.engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    points = []
    for _ in range(12):
        statements.clear()
        with one_read(study) if once else contextlib.nullcontext():
            trial = ask(study)
            c = space.suggest(trial)
        n = len(statements)
        points.append((c.batch_size, c.lr, c.momentum))
        assert tell(study, trial, _loss(c.batch_size, c.lr, c.momentum), TrialState.COMPLETE) == TrialState.COMPLETE
        assert tell(study, trial, 0.0, TrialState.COMPLETE) == TrialState.COMPLETE  # ended: its state, unchanged
    return points, n


def test_an_ask_reads_the_trial_list_once_and_proposes_the_same(tmp_path: Path) -> None:
    once, fewer = _proposals(tmp_path, "once", True)
    each, more = _proposals(tmp_path, "each", False)
    assert once == each  # the same points, from the same trials
    assert fewer + 14 <= more, (fewer, more)  # two reads of the trial list (7 statements each) and a trial's
