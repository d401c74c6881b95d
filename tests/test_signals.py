"""bstune.signals: SIGINT and SIGTERM as KeyboardInterrupt, and never where it would be lost or do harm."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import sqlalchemy
from sqlalchemy.pool import NullPool

from bstune import signals


def _wait_for_interrupt(seconds: float = 2.0) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.005)


def test_sigterm_is_taken_as_ctrl_c_with_the_shells_exit_code() -> None:
    with signals.handled():
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            _wait_for_interrupt()
        assert (signals.exit_code(), signals.what_stopped()) == (143, "SIGTERM")
    with signals.handled():
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            _wait_for_interrupt()
        assert (signals.exit_code(), signals.what_stopped()) == (130, "Ctrl-C")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, "the handlers are put back on the way out"


def test_sigint_is_taken_even_where_it_started_ignored() -> None:
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)  # what a script's `cmd &` starts Python with
    try:
        with signals.handled():
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                _wait_for_interrupt()
    finally:
        signal.signal(signal.SIGINT, before)


class _SignalledWhileFinalized:
    """Sends SIGTERM from its finalizer, so the handler runs inside it (as when a Ctrl-C lands in a GC pass)."""

    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        sum(range(10_000))  # Python code, where the handler runs


def test_a_signal_landing_in_a_finalizer_is_raised_once_out_of_it() -> None:
    """Python prints 'Exception ignored in ... __del__' and drops a KeyboardInterrupt raised in a finalizer:
    the Ctrl-C would be lost. It is raised in the code the finalizer interrupted instead."""
    with signals.handled():
        with pytest.raises(KeyboardInterrupt):
            _SignalledWhileFinalized()  # finalized at once
            _wait_for_interrupt()
    assert signals.exit_code() == 143


def test_a_signal_landing_in_a_database_write_waits_for_its_commit(tmp_path: Path) -> None:
    """A signal inside SQLAlchemy's code (here: as it commits) waits until the write is done, so no
    connection is left mid-transaction holding the database's lock."""
    url = f"sqlite:///{tmp_path}/x.db"
    engine = sqlalchemy.create_engine(url, poolclass=NullPool)
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text("CREATE TABLE t (x INTEGER)"))

    def signal_on_commit(conn: object) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        sum(range(10_000))

    sqlalchemy.event.listen(engine, "commit", signal_on_commit)
    with signals.handled():
        with pytest.raises(KeyboardInterrupt):
            with engine.begin() as conn:
                conn.execute(sqlalchemy.text("INSERT INTO t VALUES (1)"))
            _wait_for_interrupt()
    other = sqlalchemy.create_engine(url, poolclass=NullPool, connect_args={"timeout": 0})
    with other.begin() as conn:  # not locked
        conn.execute(sqlalchemy.text("INSERT INTO t VALUES (2)"))
        assert conn.execute(sqlalchemy.text("SELECT x FROM t ORDER BY x")).scalars().all() == [1, 2]


def test_held_defers_the_first_signal_and_a_second_one_interrupts_at_once() -> None:
    done = []
    with signals.handled():
        with pytest.raises(KeyboardInterrupt):
            with signals.held():
                os.kill(os.getpid(), signal.SIGTERM)
                sum(range(10_000))
                done.append("write")
        assert done == ["write"]
        with pytest.raises(KeyboardInterrupt):
            with signals.held():
                os.kill(os.getpid(), signal.SIGINT)
                sum(range(10_000))
                os.kill(os.getpid(), signal.SIGINT)  # the second: at once
                _wait_for_interrupt()
                done.append("never")
        assert done == ["write"]
