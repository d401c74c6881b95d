"""The Optuna storage: checking that a URL answers, opening it, and finding a study in it.

Any RDB that Optuna supports works: SQLite on one machine (the default, under mlruns/), PostgreSQL or
MySQL across machines; and on one machine an Optuna journal file, `journal:///path.journal`
(`bstune.search._journal`). Nothing here creates a study.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import warnings
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna

from bstune.errors import BstuneError, first_line, redact
from bstune.spec import DEFAULT_STORAGE, DEFAULT_TRACKING_URI
from bstune.trials import READ_ATTRS, TrialTable, from_study

DEFAULT_URLS = (DEFAULT_STORAGE, DEFAULT_TRACKING_URI)  # their folder, mlruns/, is made when missing


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
    if path is not None:
        _check_folder(path, url, field)


def _check_folder(path: Path, url: str, field: str) -> None:
    """Fail with one line if the folder of a store's file is not there (the default stores' is made)."""
    if not path.parent.is_dir() and url not in DEFAULT_URLS:
        raise BstuneError(f"{field}: folder {path.parent} does not exist (for {redact(url)}); "
                          f"create it or point {field} elsewhere")


def journal_path(url: str) -> Path | None:
    """The file behind a journal:/// URL (an Optuna journal file, `bstune.search._journal`), or None."""
    if not url.startswith(JOURNAL_PREFIX):
        return None
    return Path(url[len(JOURNAL_PREFIX):])


def file_store(url: str) -> Path | None:
    """The file behind a storage URL on this machine (a SQLite database or a journal), or None."""
    return sqlite_path(url) or journal_path(url)


def check_storage(url: str) -> None:
    """Fail with one line if the Optuna storage URL cannot be used (for a SQLite file or a journal: not there
    to be made, not an Optuna storage, corrupt, read-only); creates nothing."""
    if url.startswith("journal:"):
        check_journal(url, "storage")
        return
    check_sqlite_url(url, "storage")
    if url.startswith("sqlite"):
        check_sqlite_store(url, "storage", OPTUNA)
    else:
        check_database(url, "storage")


JOURNAL_PREFIX = "journal:///"
_SQLITE_MAGIC = b"SQLite format 3\x00"


def check_journal(url: str, field: str) -> None:
    """Fail with one line unless `url` names a journal file that can be the study's: absent (to be created,
    in a folder that is there) or an Optuna journal; and writable, with its folder (the lock files beside it).
    Reads the file's first line only."""
    path = journal_path(url)
    if path is None or str(path) in ("", "."):
        raise BstuneError(f"{field}: {url!r} names no file; a journal is a file: journal:///relative/path.journal "
                          "or journal:////absolute/path.journal")
    _check_folder(path, url, field)
    if path.is_dir():
        raise BstuneError(f"{field}: {path} is a folder; a journal is a file: point {field} at one inside it")
    if path.exists() and path.stat().st_size:
        problem = _journal_problem(path)
        if problem:
            raise BstuneError(f"{field}: {path} {problem}; point {field} at an Optuna journal, or at a new file")
    check_writable(path, field, "a study appends to the journal and locks files beside it")


def _journal_problem(path: Path) -> str:
    """Why the non-empty file at `path` is not an Optuna journal ("" if it is one)."""
    with open(path, "rb") as f:
        head = f.read(len(_SQLITE_MAGIC))
        f.seek(0)
        first = f.readline(1 << 20)
    if head == _SQLITE_MAGIC:
        other = "an MLflow tracking store" if _tables(path)[0] >= MLFLOW[0] else "a SQLite database"
        return f"is {other}, not a journal (for a SQLite Optuna storage write sqlite:///{path})"
    try:
        op = json.loads(first)
    except (ValueError, UnicodeDecodeError):
        op = None
    if op is None and not first.endswith(b"\n") and first.startswith(b'{"op_code":'):
        return ""  # a study killed while it wrote its first operation: the journal cuts it off
    if not isinstance(op, dict) or "op_code" not in op or "worker_id" not in op:
        return "is not an Optuna journal (its first line is not a journal operation)"
    return ""


# What each store holds: a few of its tables, and its name in messages.
OPTUNA = ({"studies", "trials", "version_info"}, "an Optuna storage")
MLFLOW = ({"experiments", "runs", "metrics"}, "an MLflow tracking store")


def check_sqlite_store(url: str, field: str, kind: tuple[set[str], str]) -> None:
    """Fail with one line unless the SQLite file at `url` can be `kind`'s store: absent or empty (to be
    created), or a sound SQLite database holding `kind`'s tables; and writable. Reads the file only."""
    path = sqlite_path(url)
    if path is None:
        return
    if path.exists() and path.stat().st_size:
        wanted, name = kind
        tables, problem = _tables(path)
        if problem == "ok" and tables and not wanted <= tables and _after_creation(path):
            tables, problem = _tables(path)  # another study was creating it (`creating`): as it left it
        if problem != "ok":
            raise BstuneError(f"{field}: {path} is not a sound SQLite database ({problem}); restore it from a "
                              f"backup, or move it away to start a new one")
        if tables and not wanted <= tables:
            other = next((n for t, n in (OPTUNA, MLFLOW) if t <= tables), "")
            what = f"is {other}, not {name}" if other else f"holds other tables ({', '.join(sorted(tables)[:4])})"
            swapped = " (storage and tracking_uri swapped?)" if other else ""
            raise BstuneError(f"{field}: {path} {what}{swapped}; point {field} at {name}'s own file")
    check_writable(path, field, "SQLite writes the file and a journal beside it")


def check_writable(path: Path, field: str, why: str) -> None:
    """Fail with one line if the store's file, or the nearest folder above it that exists, is read-only."""
    folder = next(p for p in path.parents if p.exists())  # the default folder is made when the study starts
    read_only = path if path.exists() and not os.access(path, os.W_OK) else None
    if read_only or not os.access(folder, os.W_OK | os.X_OK):
        raise BstuneError(f"{field}: {read_only or folder} is read-only ({why}); make it writable, or point "
                          f"{field} at a writable folder")


def _tables(path: Path) -> tuple[set[str], str]:
    """The tables of the SQLite file at `path` and its quick check ("ok", or what is wrong), read only."""
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            return tables, db.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.DatabaseError as e:  # e.g. "file is not a database"
        return set(), str(e)


def make_default_folder(url: str) -> None:
    """Create the default stores' folder (mlruns/) if `url` is a default store's; any other missing folder
    stays an error (`check_sqlite_url`): it is usually a typo."""
    if url in DEFAULT_URLS:
        file_store(url).parent.mkdir(exist_ok=True)


_CREATING: dict[Path, int] = {}  # the SQLite stores whose create lock this process holds: by which thread


def _create_lock(path: Path) -> Path:
    """The file `creating` locks beside the SQLite store at `path`."""
    return path.with_name(path.name + ".create-lock")


@contextlib.contextmanager
def creating(*urls: str) -> Iterator[None]:
    """Hold a lock beside each SQLite store while it may be created, so that two processes starting at once
    do not both create its tables (MLflow's migrations fail in the second). A store whose file is gone loses
    its write-ahead log too (`tune_sqlite`), which SQLite would otherwise apply to the new file."""
    paths = sorted({p for p in map(sqlite_path, urls) if p is not None})
    with contextlib.ExitStack() as stack:
        for path in paths:
            lock = stack.enter_context(open(_create_lock(path), "a"))
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not path.exists():  # a deleted database's write-ahead log would be read into the new one
                for leftover in (path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
                    leftover.unlink(missing_ok=True)
            _CREATING[path] = threading.get_ident()
            stack.callback(_CREATING.pop, path, None)
        yield


def _after_creation(path: Path | None) -> bool:
    """Wait while a study creates the SQLite store at `path` (`creating`): opening it meanwhile would create
    its tables a second time, under the creator's feet. Whether it waited on the lock (never on one this
    thread holds: it would wait on itself)."""
    if path is None or _CREATING.get(path) == threading.get_ident() or not _create_lock(path).exists():
        return False
    with open(_create_lock(path)) as held:
        fcntl.flock(held, fcntl.LOCK_SH)
    return True


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


def open_storage(url: str, heartbeat_seconds: int | None = None, on_lost: Any = None,
                 writing: bool = False) -> optuna.storages.BaseStorage:
    """The storage: a journal file (`bstune.search._journal`) or an RDB; with heartbeat_seconds, trials whose
    worker goes silent for twice that are failed. A study that `writing` to a SQLite file gets it tuned for
    many small writes (`tune_sqlite`)."""
    path = journal_path(url)
    if path is not None:
        from bstune.search._journal import open_journal

        grace = grace_seconds(heartbeat_seconds) if heartbeat_seconds else None
        return open_journal(str(path), heartbeat_seconds, on_lost, grace)
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        # Several workers share one SQLite file: wait for the write lock instead of failing at once.
        engine_kwargs["connect_args"] = {"timeout": 60}
    else:
        engine_kwargs["pool_pre_ping"] = True
    with warnings.catch_warnings():  # Optuna calls its heartbeat arguments experimental: a script need not hear it
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(
            url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_seconds,
            grace_period=grace_seconds(heartbeat_seconds) if heartbeat_seconds else None,
            heartbeat_stale_trial_callback=on_lost,
        )
    if writing:
        tune_sqlite(storage.engine)
    return storage


_tuned: weakref.WeakSet = weakref.WeakSet()


def tune_sqlite(engine: Any) -> None:
    """Make a SQLite store cheap to write to: a write-ahead log, synced to disk at its checkpoints rather than
    at every commit. A study makes thousands of small commits (each trial's attributes, each epoch's report
    and metrics), and a synced commit costs ~10 ms, more than a small trial's epoch. A crash of the process
    loses nothing; a power cut may lose the last commits, whose trials then run again. No-op for other
    databases, and for an engine already tuned."""
    import sqlalchemy

    if engine.dialect.name != "sqlite" or engine in _tuned:
        return

    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    sqlalchemy.event.listen(engine, "connect", on_connect)
    _tuned.add(engine)
    engine.dispose()  # connections opened before the listener reconnect with it


def grace_seconds(heartbeat_seconds: int) -> int:
    """How long a running trial's worker may go silent before the trial is declared lost and re-queued."""
    return 2 * heartbeat_seconds


def load_study(url: str, name: str, heartbeat_seconds: int | None = None, source: str = "") -> optuna.Study:
    """An existing study (for analysis, reports, status and joining workers); BstuneError naming the studies
    there if absent. Creates nothing, not even the file of a mistyped SQLite path."""
    how = f"run `bstune study {source}` first" if source else "check the study name"
    db = file_store(url)
    if db is not None and not db.exists():
        raise BstuneError(f"storage: {db} does not exist, so study {name!r} is not there; {how}")
    _after_creation(sqlite_path(url))
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
    """The trial table of a study in an Optuna storage (BstuneError naming the studies there if absent), read
    with only what the table holds (a study of 10,000 trials in tens of megabytes)."""
    from bstune.search._optuna import trial_summaries

    study = load_study(url, name, source=source)
    return from_study(study, trials=trial_summaries(study, READ_ATTRS, params=True))
