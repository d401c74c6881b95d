"""Where a tiny-study trial's Optuna side goes: SQL statements by call, and CPU by function.

Runs benchmarks/study_time.py's tiny study (`TINY`: a linear model on 128 digits examples, 2 epochs, TPE, no
pruning, the embedded SQLite default, fused) in this process with a listener on every SQLAlchemy engine, and
counts the statements each trial costs, by what issued them: the first bstune function on the stack and the
outermost Optuna call it made (`ask`, `suggest_float`, `tell`, `get_all_trials`, ...). The MLflow writes of the
trial runs go to the writer process and are not counted here; the parent run's are. With `--floor` it runs
instead Optuna alone on the same storage settings (RDBStorage with heartbeats, WAL): a loop of ask, three
suggestions and tell with the same TPE, no bstune code, which is Optuna's own floor a trial on SQLite.

    python benchmarks/optuna_profile.py --trials 300            # statements and CPU a trial, by call
    python benchmarks/optuna_profile.py --trials 300 --floor    # Optuna's own floor, same storage
    python benchmarks/optuna_profile.py --trials 300 --cprofile 25   # and the 25 dearest functions
    python benchmarks/optuna_profile.py --default               # the default study (digits.yaml, 144 trials)
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import io
import os
import pstats
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

_STATEMENTS: collections.Counter = collections.Counter()
_TRAINING_CPU = [0.0]  # CPU seconds inside the trainer, less its per-epoch callbacks (the bookkeeping's)
_SKIP = ("_optuna.py", "contextlib.py")  # bstune's helpers: attribute to their caller, which says what for


def _site() -> tuple[str, str]:
    """(bstune function, outermost Optuna call) of the statement being executed."""
    f = sys._getframe(2)
    optuna_call, ours = "", ""
    while f is not None:
        name = f.f_code.co_filename
        if "/optuna/" in name and "/bstune/" not in name:
            optuna_call = f.f_code.co_name
        elif "/bstune/" in name or "optuna_profile" in name:
            if not name.endswith(_SKIP) and not ours:
                ours = f"{Path(name).stem}.{f.f_code.co_name}"
                break
        f = f.f_back
    return ours, optuna_call


def _listen() -> None:
    import sqlalchemy

    def before(conn, cursor, statement, parameters, context, executemany) -> None:  # noqa: ANN001
        ours, call = _site()
        _STATEMENTS[(ours, call, statement.split(None, 1)[0].upper())] += 1

    sqlalchemy.event.listen(sqlalchemy.engine.Engine, "before_cursor_execute", before)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _url(kind: str, folder: Path) -> str:
    """The Optuna storage URL of `kind` (sqlite, journal, journal-fsync: the journal's file) in `folder`."""
    return f"sqlite:///{folder}/optuna.db" if kind == "sqlite" else f"journal:///{folder}/optuna.journal"


def study(trials: int, folder: Path, default: bool = False, kind: str = "sqlite") -> int:
    """The tiny study of `trials` trials in this process (with `default`: studies/digits.yaml as shipped, its
    trial budget, no seconds limit, as benchmarks/study_time.py runs it); how many it ran."""
    import yaml
    from study_time import SPEC, TINY

    import bstune.search.objective as objective
    from bstune.search import SilentProgress, run_study
    from bstune.spec import load_spec

    spec = TINY | {"budget": {"trials": trials}}
    if default:
        spec = yaml.safe_load(SPEC.read_text())
        spec["budget"].pop("seconds", None)
    spec |= {"storage": _url(kind, folder), "tracking_uri": f"sqlite:///{folder}/mlflow.db"}
    def timed(fn, sign: float):  # noqa: ANN001, ANN202 - CPU in the trainer, less its per-epoch callbacks
        def wrapped(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            start = _cpu()
            try:
                return fn(*args, **kwargs)
            finally:
                _TRAINING_CPU[0] += sign * (_cpu() - start)
        return wrapped

    objective.train_fused = timed(objective.train_fused, 1.0)
    objective._TrialRun.on_epoch = timed(objective._TrialRun.on_epoch, -1.0)
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return run_study(load_spec(str(path)), progress=SilentProgress()).spent.trials


def floor(trials: int, folder: Path, kind: str = "sqlite") -> int:
    """Optuna alone on a storage as bstune opens it (`kind`: sqlite, journal, journal-fsync: the journal
    synced at every append): ask, a heartbeat, three suggestions, tell."""
    import optuna

    from bstune.search._journal import open_journal
    from bstune.stores import open_storage

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    if kind == "sqlite":
        storage = open_storage(_url(kind, folder), 20, writing=True)
    else:
        storage = open_journal(str(folder / "optuna.journal"), 20, fsync=kind == "journal-fsync")
    sampler = optuna.samplers.TPESampler(seed=0, multivariate=True, constant_liar=True)
    s = optuna.create_study(study_name="floor", storage=storage, sampler=sampler)
    for _ in range(trials):
        t = s.ask()
        storage.record_heartbeat(t._trial_id)
        t.suggest_categorical("batch_size", [16, 32, 64])
        t.suggest_float("lr", 1e-3, 1.0, log=True)
        t.suggest_float("one_minus_m", 0.01, 1.0, log=True)
        s.tell(t, 1.0)
    return trials


def _reopen(kind: str, folder: Path, trials: int) -> None:
    """What a process joining the study pays to read it (`bstune status`, a worker): a fresh storage, every trial."""
    import optuna

    from bstune.stores import open_storage

    cpu = _cpu()
    storage = open_storage(_url(kind, folder))
    n = len(optuna.load_study(study_name="floor", storage=storage).get_trials(deepcopy=False))
    size = sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith("optuna."))
    print(f"reopened: {n} trials read in {1000 * (_cpu() - cpu):.0f} ms CPU; the store {size / trials:.0f} bytes "
          "a trial")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=300)
    ap.add_argument("--floor", action="store_true", help="Optuna alone, no bstune code")
    ap.add_argument("--storage", choices=("sqlite", "journal", "journal-fsync"), default="sqlite",
                    help="the Optuna storage (journal: a journal:/// file; sqlite: the embedded default; "
                         "journal-fsync: with --floor, the journal synced at every append)")
    ap.add_argument("--default", action="store_true", help="the default study (studies/digits.yaml) instead")
    ap.add_argument("--cprofile", type=int, default=0, help="print this many functions by cumulative CPU")
    args = ap.parse_args()
    _listen()
    prof = cProfile.Profile(time.process_time) if args.cprofile else None
    with tempfile.TemporaryDirectory() as tmp:
        cpu, wall = _cpu(), time.perf_counter()
        if prof:
            prof.enable()
        folder = Path(tmp)
        n = floor(args.trials, folder, args.storage) if args.floor else study(args.trials, folder, args.default,
                                                                               args.storage)
        if prof:
            prof.disable()
        cpu, wall = _cpu() - cpu, time.perf_counter() - wall
        total = sum(_STATEMENTS.values())
        if args.floor:
            _reopen(args.storage, folder, n)
    print(f"{n} trials: {1000 * cpu / n:.1f} ms CPU a trial ({'with' if prof else 'no'} profiler; outside "
          f"training {1000 * (cpu - _TRAINING_CPU[0]) / n:.1f}), "
          f"{1000 * wall / n:.1f} ms wall, {total / n:.1f} SQL statements a trial, load {os.getloadavg()[0]:.1f}")
    print("\n| statements a trial | kind | bstune caller | Optuna call |\n|---:|---|---|---|")
    for (ours, call, kind), count in sorted(_STATEMENTS.items(), key=lambda kv: -kv[1]):
        if count / n >= 0.05:
            print(f"| {count / n:.2f} | {kind} | {ours or '-'} | {call or '-'} |")
    if prof:
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(args.cprofile)
        print(out.getvalue())


if __name__ == "__main__":
    main()
