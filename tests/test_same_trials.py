"""The trials a small study runs are a fixed function of its spec and seed: the recorded table in
tests/data/study_before_layout.json (made before the package took its current layout) comes out again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bstune.search import run_study
from bstune.spec import load_spec
from tests.conftest import write_spec

pytestmark = pytest.mark.slow  # real studies and subprocesses: the slow suite

RECORDED = Path(__file__).parent / "data" / "study_before_layout.json"
# law sampler (pooled across batch sizes), median pruning, an lr range wide enough to diverge; one trial at a time
OVERRIDES = {"workload.dataset": "synthetic", "workload.n_train": 400, "workload.epochs": 3,
             "search.batch_sizes": [16, 32, 64], "search.lr": {"low": 0.003, "high": 30.0},
             "search.sampler": {"name": "law", "n_startup_trials": 1},
             "search.pruner": {"name": "median", "n_startup_trials": 1, "n_warmup_epochs": 1},
             "budget.trials": 12, "execution.fuse": 1}


def test_same_spec_and_seed_give_the_recorded_trials(tmp_path: Path) -> None:
    recorded = json.loads(RECORDED.read_text())
    table = run_study(load_spec(write_spec(tmp_path, **OVERRIDES))).table
    got = sorted(table.records, key=lambda r: r.number)
    assert [(r.number, r.batch_size, r.state) for r in got] == \
        [(r["number"], r["batch_size"], r["state"]) for r in recorded]
    assert {s["state"] for s in recorded} == {"COMPLETE", "PRUNED", "DIVERGED"}, "the fixture covers each ending"
    for r, want in zip(got, recorded, strict=True):
        assert r.lr == pytest.approx(want["lr"], rel=1e-12) and r.momentum == pytest.approx(want["momentum"], rel=1e-12)
        if want["value"] is None:
            assert r.value is None
        else:
            assert r.value == pytest.approx(want["value"], rel=1e-5)
