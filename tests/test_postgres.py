"""The scale-out scenarios on a real PostgreSQL server (the storage for workers on several machines).

The server is named by BSTUNE_TEST_POSTGRES; `.ci/postgres.sh` starts one on 127.0.0.1 and sets it. Without
it these tests skip, except in CI (CI=true), where a missing server is a failure. Each test gets new
databases (Optuna's and MLflow's), owned by a new role with a random password, and drops them afterwards.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_study import _study
from tests.test_workers import Stores, check_claim_lock, check_example_budget, check_four_workers_one_killed

pytestmark = pytest.mark.slow  # real studies and subprocesses: the slow suite


def _admin_url() -> str:
    """The server's URL (its role may create databases and roles); skips, or fails in CI, without one."""
    url = os.environ.get("BSTUNE_TEST_POSTGRES", "")
    why = "" if url else "BSTUNE_TEST_POSTGRES is not set (.ci/postgres.sh starts a server and sets it)"
    if url:
        try:
            with _engine(url).connect():
                pass
        except Exception as e:  # noqa: BLE001 - any failure means "no usable server"
            why = f"no PostgreSQL server answers at BSTUNE_TEST_POSTGRES ({type(e).__name__})"
    if why:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI runs the PostgreSQL tests: {why}")
        pytest.skip(why)
    return url


@pytest.fixture
def stores() -> Iterator[Stores]:
    """Two new databases (Optuna's, MLflow's) owned by a new role with a random password; dropped after."""
    from sqlalchemy.engine import make_url

    admin = _admin_url()
    tag = secrets.token_hex(6)
    role, password = f"bstune_r{tag}", f"pw-{secrets.token_hex(12)}"
    names = [f"bstune_t{tag}_optuna", f"bstune_t{tag}_mlflow"]
    engine = _engine(admin)
    with engine.connect() as c:
        c.exec_driver_sql(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
        c.exec_driver_sql(f"GRANT {role} TO CURRENT_USER")  # so it may make the role a database's owner
        for name in names:
            c.exec_driver_sql(f"CREATE DATABASE {name} OWNER {role}")
    url = make_url(admin).set(username=role, password=password)
    optuna_url, mlflow_url = (url.set(database=n).render_as_string(hide_password=False) for n in names)
    try:
        yield Stores(optuna_url, mlflow_url, password)
    finally:
        for name in names:
            _drop(engine, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        _drop(engine, f"DROP ROLE IF EXISTS {role}")
        engine.dispose()


def test_four_workers_one_killed_run_exactly_the_budget(tmp_path: Path, stores: Stores) -> None:
    spec, outputs = check_four_workers_one_killed(tmp_path, stores)
    # Both URLs carry a password: it is in no output, no file, and no row of either database (MLflow params,
    # tags and artifacts' paths; Optuna's study and trial attributes), while the URLs are kept redacted.
    pw = stores.password
    assert pw in stores.storage and pw in stores.tracking_uri
    assert not [text for text in outputs if pw in text], "a command printed the password"
    leaked = [f for f in tmp_path.rglob("*") if f.is_file() and pw.encode() in f.read_bytes()]
    assert not leaked, f"files hold the password: {leaked}"
    assert (tmp_path / "mlruns").is_dir(), "the artifacts (spec.yaml, summary.json) were searched too"
    for url in (stores.storage, stores.tracking_uri):
        assert pw not in _dump(url)
    stored = _study(spec).user_attrs["bstune.spec"]
    assert "***" in stored["storage"] and "***" in stored["tracking_uri"]


def test_example_budget_is_overspent_by_at_most_the_trials_in_flight(tmp_path: Path, stores: Stores) -> None:
    check_example_budget(tmp_path, stores)


def test_claim_lock_excludes_and_a_killed_holder_frees_it(stores: Stores) -> None:
    check_claim_lock(stores.storage)


def _dump(url: str) -> str:
    """Every row of every table in the database, as text."""
    import sqlalchemy

    engine = _engine(url)
    rows = []
    with engine.connect() as c:
        for table in sqlalchemy.inspect(c).get_table_names():
            rows += [repr(tuple(row)) for row in c.exec_driver_sql(f'SELECT * FROM "{table}"')]
    engine.dispose()
    return "\n".join(rows)


def _drop(engine: Any, sql: str) -> None:
    # Without pg_signal_backend, FORCE cannot end an autovacuum worker in the database; it soon ends by itself.
    for attempt in range(20):
        try:
            with engine.connect() as c:
                c.exec_driver_sql(sql)
            return
        except Exception:  # noqa: BLE001
            if attempt == 19:
                raise
            time.sleep(0.5)


def _engine(url: str) -> Any:
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    return sqlalchemy.create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT",
                                    connect_args={"connect_timeout": 5})


@pytest.mark.slow
def test_chaos_soak_of_sigkills_loses_nothing_and_counts_nothing_twice(tmp_path: Path, stores: Stores) -> None:
    """tests/test_crash.py's soak, on PostgreSQL: the claim lock is an advisory lock, the clock the server's."""
    from bstune.spec import load_spec
    from tests.chaos import check_consistent, soak
    from tests.conftest import write_spec

    path = write_spec(tmp_path, heartbeat_seconds=2, storage=stores.storage, tracking_uri=stores.tracking_uri,
                      **{"budget.trials": 30, "workload.epochs": 2, "workload.n_train": 400})
    with open(tmp_path / "soak.log", "w") as log:
        done = soak(path, 2, seconds=30, seed=26, log=log, min_kills=3)
    assert done["worker killed"] + done["launcher killed"] + done["killed at a point"] >= 3, done
    check_consistent(load_spec(path), 30)
