"""The Optuna storage: checking that a URL answers, opening it, and finding a study in it.

Any RDB that Optuna supports works: SQLite on one machine (the default, under mlruns/), PostgreSQL or
MySQL across machines. Nothing here creates a study.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna

from bstune.errors import BstuneError, first_line, redact
from bstune.trials import TrialTable, from_study


def sqlite_path(url: str) -> Path | None:
    """The file behind a sqlite:/// URL, or None for other URLs."""
    if not url.startswith("sqlite:///"):
        return None
    return Path(url[len("sqlite:///"):])


def check_sqlite_url(url: str, field: str) -> None:
    """Fail with one line if a sqlite: URL names no file, or a file in a folder that is not there."""
    path = sqlite_path(url)
    if url.startswith("sqlite:") and (path is None or str(path) in ("", ":memory:")):
        # sqlite:// is an in-memory database (gone with the process); sqlite://x.db is not a file URL at all
        raise BstuneError(f"{field}: {url!r} names no file; a SQLite store is a file: sqlite:///relative/path.db "
                          "or sqlite:////absolute/path.db")
    if path is not None and not path.parent.is_dir():
        raise BstuneError(f"{field}: folder {path.parent} does not exist (for {redact(url)}); "
                          f"create it or point {field} elsewhere")


def check_storage(url: str) -> None:
    """Fail with one line if the Optuna storage URL cannot be used; creates nothing."""
    check_sqlite_url(url, "storage")
    if not url.startswith("sqlite"):
        check_database(url, "storage")


# Database servers behind a URL (MLflow's tracking stores take the same ones; SQLite is a file, checked apart)
DATABASE_SCHEMES = ("postgresql", "mysql", "mssql", "oracle")


def is_database_url(url: str) -> bool:
    """postgresql://..., mysql+pymysql://...: a database server (not SQLite, not an MLflow server or folder)."""
    return url.split(":", 1)[0].split("+", 1)[0] in DATABASE_SCHEMES


def check_database(url: str, field: str) -> None:
    """Fail with one line naming `field` if the database at `url` does not answer, within seconds (Optuna and
    MLflow would retry for minutes); creates nothing."""
    import sqlalchemy

    example = "use e.g. sqlite:///mlruns/optuna.db or postgresql://user:password@host/db"
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError) as e:  # ValueError: a port that is not a number
        reason = "" if isinstance(e, sqlalchemy.exc.ArgumentError) else f" ({first_line(e)})"
        raise BstuneError(f"{field}: {redact(url)!r} is not a database URL{reason}; {example}") from None
    try:
        parsed.get_dialect()
    except sqlalchemy.exc.NoSuchModuleError:
        raise BstuneError(f"{field}: {redact(url)!r} is not a database URL (no database is called "
                          f"{parsed.drivername!r}); {example}") from None
    try:
        kwargs: dict[str, Any] = {}
        if url.startswith("postgresql"):
            kwargs["connect_args"] = {"connect_timeout": 5}
        engine = sqlalchemy.create_engine(url, **kwargs)
        with engine.connect():
            pass
        engine.dispose()
    except ModuleNotFoundError as e:
        raise BstuneError(f"{field}: {redact(url)} needs the {e.name} package; install it "
                          f"(for PostgreSQL: pip install 'psycopg[binary]')") from None
    except Exception as e:  # noqa: BLE001 - any failure to connect is reported the same way
        raise BstuneError(f"{field}: cannot connect to {redact(url)} ({first_line(e)}); "
                          f"start the database or fix {field}") from None


def open_storage(url: str, heartbeat_seconds: int | None = None, on_lost: Any = None) -> optuna.storages.RDBStorage:
    """An RDB storage; with heartbeat_seconds, trials whose worker goes silent for twice that are failed."""
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        # Several workers share one SQLite file: wait for the write lock instead of failing at once.
        engine_kwargs["connect_args"] = {"timeout": 60}
    else:
        engine_kwargs["pool_pre_ping"] = True
    return optuna.storages.RDBStorage(
        url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_seconds,
        grace_period=grace_seconds(heartbeat_seconds) if heartbeat_seconds else None,
        heartbeat_stale_trial_callback=on_lost,
    )


def grace_seconds(heartbeat_seconds: int) -> int:
    """How long a running trial's worker may go silent before the trial is declared lost and re-queued."""
    return 2 * heartbeat_seconds


def load_study(url: str, name: str, heartbeat_seconds: int | None = None, source: str = "") -> optuna.Study:
    """An existing study (for analysis, reports, status and joining workers); BstuneError naming the studies
    there if absent. Creates nothing, not even the file of a mistyped SQLite path."""
    how = f"run `bstune study {source}` first" if source else "check the study name"
    db = sqlite_path(url)
    if db is not None and not db.exists():
        raise BstuneError(f"storage: {db} does not exist, so study {name!r} is not there; {how}")
    check_storage(url)
    storage = open_storage(url, heartbeat_seconds)
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        if names:  # the name may be mistyped, or SPEC names another study than the one asked for
            how = f"studies there: {', '.join(names)}; check the study name" + (f", or {how}" if source else "")
        raise BstuneError(f"no study named {name!r} in {redact(url)}; {how}") from None


def load_table(url: str, name: str, source: str = "") -> TrialTable:
    """The trial table of a study in an Optuna storage (BstuneError naming the studies there if absent)."""
    return from_study(load_study(url, name, source=source))
