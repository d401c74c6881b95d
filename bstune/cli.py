"""The `bstune` command. Thin: each command parses its arguments and calls the Python API.

Bad input of any kind ends with one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click

from bstune.errors import BstuneError, write_output
from bstune.spec import DEFAULT_TRACKING_URI, Execution, StudySpec, load_spec

if TYPE_CHECKING:
    from bstune.analysis import Analysis
    from bstune.trials import TrialTable


def _quiet_libraries() -> None:
    """Optuna's experimental-feature warnings and MLflow's info logs are noise on a terminal."""
    import logging
    import warnings

    # MLflow sets its loggers' level from this when it is imported (after this runs); a user's choice stands.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    warnings.filterwarnings("ignore", module="optuna")
    warnings.filterwarnings("ignore", message=".*experimental.*")
    for name in ("mlflow", "alembic", "optuna"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # MLflow logs a database error with its traceback before raising it; bstune says it in one line
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


def _one_blas_thread() -> contextlib.AbstractContextManager:
    """BLAS held to one thread while the analysis runs: its matrices are small (a few hundred rows), and on a
    busy machine OpenBLAS's threads wait on each other (10^5 CSV rows analysed in 12 s with its default two
    threads at a load of 9 on 2 cores, in 3.9 s with one: benchmarks/ANALYSIS_SCALE.md)."""
    import numpy  # noqa: F401  threadpoolctl limits the libraries already loaded
    import scipy.linalg  # noqa: F401
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


class _Group(click.Group):
    """Turns BstuneError into `error: ...` and exit code 2 for every command, and a Ctrl-C or SIGTERM that
    lands outside a study's trials (which handle their own) into exit code 130 or 143, as the shell would give.
    SIGTERM is taken as Ctrl-C is, and Ctrl-C even where this process started with it ignored (`bstune.signals`)."""

    def invoke(self, ctx: click.Context) -> object:
        from bstune import signals

        _quiet_libraries()
        with signals.handled():
            try:
                return super().invoke(ctx)
            except BstuneError as e:
                click.echo(f"error: {e}", err=True)
                sys.exit(2)
            except KeyboardInterrupt:
                click.echo(f"interrupted ({signals.what_stopped()}); a study resumes when the same command is run "
                           "again", err=True)
                sys.exit(signals.exit_code())


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """bstune: which batch size, learning rate and momentum to use, and how the learning rate must move
    when the batch size moves.

    \b
    Typical use:
      bstune validate studies/digits.yaml   # check a spec, run nothing
      bstune study studies/digits.yaml      # run (or resume) the study
      bstune ui                             # browse the runs in the MLflow UI
    """


def _spec(path: str, storage: str | None, tracking_uri: str | None, fuse: int | None = None) -> StudySpec:
    spec = load_spec(path)
    changes: dict[str, object] = {k: v for k, v in (("storage", storage), ("tracking_uri", tracking_uri)) if v}
    if fuse is not None:
        changes["execution"] = Execution(fuse=fuse)
    return spec.with_overrides(**changes) if changes else spec


_storage_opt = click.option("--storage", metavar="URL", help="Optuna storage URL (overrides the spec's).")
_tracking_opt = click.option("--tracking-uri", metavar="URI", help="MLflow tracking URI (overrides the spec's).")
_study_opt = click.option("--study", "study_name", metavar="NAME",
                          help="The study's name in --storage (instead of SPEC).")
_fuse_opt = click.option(
    "--fuse", type=click.IntRange(min=1), metavar="K",
    help="Train K trials of one batch size together as one stacked model (1: one at a time; default: the spec's "
         "execution.fuse, else 8 for small dense models on a CPU, 16 on a GPU: see the README).")
_target_opt = click.option("--target", type=float, help="Objective value for steps to target (default: from the data).")


@main.command()
@click.argument("spec_file", metavar="SPEC")
def validate(spec_file: str) -> None:
    """Check a study spec without running anything: its fields, its data (loaded, not trained on) and its
    stores (SQLite folders there, databases answering; nothing created in them)."""
    from bstune.search import validate as check

    lines = check(load_spec(spec_file))
    click.echo(f"{spec_file}: ok")
    click.echo("\n".join(f"  {line}" for line in lines))


@main.command()
@click.argument("spec_file", metavar="SPEC")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1, ... (auto: CUDA if present).")
@click.option("--workers", type=int, metavar="N", help="Run N worker processes at once (GPUs shared round-robin).")
@click.option("--trials-per-device", type=int, metavar="K", help="Run K worker processes per GPU (CPU: K in all).")
@_fuse_opt
@_storage_opt
@_tracking_opt
def study(spec_file: str, device: str, workers: int | None, trials_per_device: int | None, fuse: int | None,
          storage: str | None, tracking_uri: str | None) -> None:
    """Run the study in SPEC (a YAML file) until its budget is spent.

    Running the same command again resumes the study: trials already run count against the budget,
    and a trial that was interrupted is run again. With --workers N, N processes run trials at once,
    all claiming them through the study's storage; `bstune worker` adds more from other machines.
    """
    from bstune.search import ConsoleProgress, format_summary, launch, plan_workers, run_study

    spec = _spec(spec_file, storage, tracking_uri, fuse)
    plans = plan_workers(workers, trials_per_device, device)
    t0 = time.perf_counter()
    launched = launch(spec, spec_file, plans, click.echo) if len(plans) > 1 else None
    if launched:
        result = launched.result
    else:
        result = run_study(spec, device=device, progress=ConsoleProgress(spec.search.objective, budget=spec.budget))
    click.echo(format_summary(result.table, result.spent, spec.budget, result.stop_reason, time.perf_counter() - t0))
    if result.interrupted:
        from bstune import signals

        click.echo(f"interrupted ({signals.what_stopped()}): the running trials are recorded as INTERRUPTED and "
                   "queued again; run the same command to resume", err=True)
        sys.exit(signals.exit_code())
    if launched and launched.error:
        click.echo(f"error: {launched.error}", err=True)
        sys.exit(launched.exit_code)
    if result.stop_reason:  # the budget is spent: the study is ready to be read
        click.echo(_study_answer(result.table))
        click.echo(_next_steps(spec_file, spec.tracking_uri, storage, tracking_uri))


def _study_answer(table: TrialTable) -> str:
    """Which batch size to use, three lines (best at budget, fastest to target, critical batch size), or why
    the trials cannot say yet."""
    from bstune.analysis import analyze
    from bstune.report import answer_lines

    try:
        with _one_blas_thread():
            return "\n".join(answer_lines(analyze(table), trend=False))
    except BstuneError as e:
        return f"Which batch size to use: not yet ({e})"


def _next_steps(spec_file: str, tracking_uri: str, storage: str | None = None, tracking_override: str | None = None
                ) -> str:
    """What to run once a study is done (`bstune ui` only where it can serve the tracking store). The study's
    --storage / --tracking-uri overrides go with the commands; a URL with a password is named by the
    environment variable that should hold it (BSTUNE_STORAGE, BSTUNE_TRACKING_URI), never printed."""
    import shlex

    from bstune.errors import redact

    hidden: list[str] = []

    def opt(flag: str, url: str | None, env: str) -> str:
        if not url:
            return ""
        if redact(url) != url:
            hidden.append(env)
            return f' {flag} "${env}"'
        return f" {flag} {shlex.quote(url)}"

    stores = opt("--storage", storage, "BSTUNE_STORAGE") + opt("--tracking-uri", tracking_override,
                                                                 "BSTUNE_TRACKING_URI")
    spec = shlex.quote(spec_file)
    steps = [(f"bstune analyze {spec}{stores}", "how lr* moves with B, the critical batch size"),
             (f"bstune report {spec} --batch-size B{stores}", "lr and momentum to use at B, with the evidence")]
    if tracking_uri.startswith("sqlite:"):
        store = "" if tracking_uri == DEFAULT_TRACKING_URI else f" --tracking-uri {shlex.quote(tracking_uri)}"
        steps.append((f"bstune ui{store}", "every trial in the MLflow UI"))
    width = max(len(cmd) for cmd, _ in steps)
    lines = [f"{'next:' if i == 0 else '':6}{cmd:{width}}  # {why}" for i, (cmd, why) in enumerate(steps)]
    if hidden:
        lines.append(f"{'':6}(set {' and '.join(hidden)} to the URL you gave, password included: it is not printed)")
    return "\n".join(lines)


@main.command()
@click.argument("spec_file", metavar="SPEC")
@click.option("--storage", metavar="URL", envvar="BSTUNE_STORAGE",
              help="The study's Optuna storage, e.g. postgresql://user:pw@host/db (or set BSTUNE_STORAGE, "
                   "which keeps the password off the command line).")
@click.option("--tracking-uri", metavar="URI", envvar="BSTUNE_TRACKING_URI",
              help="MLflow tracking URI (or set BSTUNE_TRACKING_URI).")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1, ... (auto: CUDA if present).")
@click.option("--index", type=int, metavar="I", help="This worker's number; it seeds the samplers (default: "
                                                     "from host and pid).")
@_fuse_opt
@click.option("--parent-pid", type=int, hidden=True)
def worker(spec_file: str, storage: str | None, tracking_uri: str | None, device: str, index: int | None,
           fuse: int | None, parent_pid: int | None) -> None:
    """Join a study that is running (from this machine or another) as one more worker.

    The study must exist: start it with `bstune study SPEC` (with --workers N for several local
    workers). Every worker claims trials through the storage, so no trial runs twice.
    """
    from bstune.search import check_device, run_worker

    spec = _spec(spec_file, storage, tracking_uri, fuse)
    check_device(device)
    code = run_worker(spec, device, index, parent_pid)
    if parent_pid:
        # A launcher's worker: all is stored, so skip the seconds torch and mlflow take to tear down (as
        # multiprocessing's children do); the launcher waits for every worker before its summary.
        sys.stdout.flush()
        os._exit(code)
    sys.exit(code)


@main.command()
@click.argument("spec_file", metavar="SPEC")
@_storage_opt
def status(spec_file: str, storage: str | None) -> None:
    """Show a study while it runs: trials by state, budget spent and left, workers alive. Changes nothing."""
    from bstune.search import format_status, read_status
    from bstune.stores import load_study

    spec = _spec(spec_file, storage, None)
    study = load_study(spec.storage, spec.name, source=spec.source or "SPEC")
    click.echo(format_status(read_status(study, spec), spec.heartbeat_seconds))


def _study_spec(spec_file: str | None, storage: str | None, study_name: str | None,
                tracking_uri: str | None) -> StudySpec:
    """The spec naming an existing study: read from SPEC, or made from --storage URL --study NAME."""
    if spec_file:
        spec = _spec(spec_file, storage, tracking_uri)
        return spec.with_overrides(name=study_name) if study_name else spec
    if not (storage and study_name):
        raise BstuneError("no study given: pass the study's SPEC file, or --storage URL and --study NAME")
    return StudySpec(name=study_name, storage=storage)


@main.command()
@click.argument("spec_file", metavar="[SPEC]", required=False)
@click.option("--format", "fmt", type=click.Choice(["html", "md", "json"]), default="html", show_default=True,
              help="html: one self-contained file; md: Markdown with the PNG plots beside it; json: every number.")
@click.option("--out", "out_dir", metavar="DIR", help="Folder for the report (default: reports/<study name>).")
@click.option("--batch-size", "batch_sizes", multiple=True, metavar="B", callback=lambda c, p, v: _batch_sizes(v),
              help="Also recommend for this batch size (repeatable).")
@_target_opt
@_storage_opt
@_study_opt
@_tracking_opt
@click.option("--mlflow/--no-mlflow", "log_mlflow", default=True, show_default=True,
              help="Log the report under report/ in the study's MLflow parent run.")
def report(spec_file: str | None, fmt: str, out_dir: str | None, batch_sizes: tuple[int, ...],
           target: float | None, storage: str | None, study_name: str | None, tracking_uri: str | None,
           log_mlflow: bool) -> None:
    """Write the report of a study: recommendations per batch size, the fitted law, and plots.

    \b
    The report covers the spec and budget spent; lr, momentum, expected value, steps
    and wall time to a target at each measured batch size, the powers of two between
    them and every --batch-size; the fitted law against the linear and square-root
    rules; and plots. It is also logged under report/ in the study's MLflow parent run.
    """
    from bstune.report import make_report, publish

    spec = _study_spec(spec_file, storage, study_name, tracking_uri)
    table = _table(spec)
    log_to = (tracking_uri or _stored_tracking_uri(spec, table)) if log_mlflow else ""
    with _one_blas_thread():
        rep, files = make_report(table, Path(out_dir) if out_dir else Path("reports") / spec.name, fmt,
                                 batch_sizes=batch_sizes, target=target)
    click.echo(f"report: {files[0]}")
    if log_to:
        run_id = publish(rep, files, log_to)
        click.echo(f"logged under report/ in MLflow run {run_id}")


def _batch_sizes(values: tuple[str, ...]) -> tuple[int, ...]:
    """--batch-size values: whole numbers (256, or 2.56e2) from 1 to 2^24; anything else one line."""
    from bstune.trials import MAX_BATCH_SIZE

    out = []
    for text in values:
        try:
            b = float(text)
        except ValueError:
            raise BstuneError(f"--batch-size: {text!r} is not a number; give a whole number such as 256") from None
        if not (b >= 1 and b == int(b)):
            raise BstuneError(f"--batch-size must be a positive integer, got {text}")
        if b > MAX_BATCH_SIZE:
            raise BstuneError(f"--batch-size: {text} is beyond any batch size trained with (at most 2^24 = "
                              f"{MAX_BATCH_SIZE:,}); give the batch size you will train with")
        out.append(int(b))
    return tuple(out)


def _table(spec: StudySpec | None, csv: str | None = None, direction: str = "minimize") -> TrialTable:
    from bstune.stores import load_table
    from bstune.trials import from_csv

    if csv:
        return from_csv(csv, direction=direction)
    assert spec is not None
    return load_table(spec.storage, spec.name, source=spec.source)


def _source_options(f: Callable) -> Callable:
    """Where the trials come from: a SPEC, --storage/--study, or a --csv table."""
    for opt in reversed([
        click.argument("spec_file", metavar="[SPEC]", required=False),
        _storage_opt,
        _study_opt,
        click.option("--csv", metavar="FILE", help="A CSV of trials (batch_size, lr, momentum, value, state, ...)."),
        click.option("--direction", type=click.Choice(["minimize", "maximize"]), default="minimize",
                     show_default=True, help="With --csv: whether lower or higher values are better."),
        _target_opt,
    ]):
        f = opt(f)
    return f


def _analysis(spec_file: str | None, storage: str | None, study_name: str | None, csv: str | None,
              direction: str, target: float | None) -> tuple[StudySpec | None, TrialTable, Analysis]:
    from bstune.analysis import analyze

    spec = None if csv else _study_spec(spec_file, storage, study_name, None)
    table = _table(spec, csv, direction)
    with _one_blas_thread():
        return spec, table, analyze(table, target=target)


@main.command()
@_source_options
@click.option("--json", "json_path", metavar="PATH",
              help="Write every number here (default: reports/<study>/analysis.json; '-' for none).")
@click.option("--mlflow/--no-mlflow", "log_mlflow", default=True, show_default=True,
              help="Log the numbers (metrics and analysis.json) to the study's MLflow parent run.")
@_tracking_opt
def analyze(spec_file: str | None, storage: str | None, study_name: str | None, csv: str | None, direction: str,
            target: float | None, json_path: str | None, log_mlflow: bool, tracking_uri: str | None) -> None:
    """Fit how the optimal learning rate moves with batch size.

    \b
    Per batch size: the optimum lr and momentum from a smooth fit of the objective
    (with a bootstrap interval) and the largest stable lr. Across batch sizes: a free
    power law lr* = a B^alpha, the linear and square-root rules, and the saturating
    form lr_max / (1 + B_noise / B), compared by AICc; steps to a target against B,
    with S_min, E_min and the critical batch size. Trials come from a study (SPEC, or
    --storage URL --study NAME) or from a CSV table (--csv FILE).
    """
    import json

    from bstune.report import format_analysis

    spec, table, result = _analysis(spec_file, storage, study_name, csv, direction, target)
    run_id = table.meta.get("mlflow_parent_run_id")
    log_to = (tracking_uri or _stored_tracking_uri(spec, table)) if log_mlflow and spec is not None and run_id else ""
    payload = result.to_dict()
    path = None
    if json_path != "-":  # written before anything is printed: a folder that cannot take it fails in one line
        name = table.study_name or Path(csv or "trials").stem
        path = Path(json_path) if json_path else Path("reports") / name / "analysis.json"
        write_output(path, json.dumps(payload, indent=2))
    click.echo(format_analysis(result))
    if path is not None:
        click.echo(f"wrote {path}")
    if log_to:
        from bstune.tracking import Tracker

        tracker = Tracker(log_to)
        tracker.check()
        tracker.log_analysis(run_id, _headline(result), payload)
        click.echo(f"logged to MLflow run {run_id}")


def _stored_tracking_uri(spec: StudySpec, table: TrialTable) -> str:
    """The tracking store the study was run with (the SPEC's, else what the study recorded). The study
    records URLs without their passwords, so one with a password must be given again."""
    if spec.source:
        return spec.tracking_uri
    stored = table.meta.get("spec", {}).get("tracking_uri")
    if stored and ":***@" in stored:
        raise BstuneError(f"the study was tracked in {stored}, whose password bstune does not keep; pass "
                          "--tracking-uri with it (or the SPEC), or --no-mlflow")
    return stored or spec.tracking_uri


def _headline(a: Analysis) -> dict[str, float | None]:
    fits, _ = a.fits_for()
    out: dict[str, float | None] = {"analysis.b_noise": a.b_noise, "analysis.lr_peak_batch_size": a.peak}
    if a.answer is not None:
        for key, choice in (("best", a.answer.best), ("fastest", a.answer.fastest)):
            out[f"analysis.{key}_batch_size"] = None if choice is None else float(choice.batch_size)
        out["analysis.critical_batch_size"] = a.answer.critical
    if "power" in fits:
        out["analysis.alpha"] = fits["power"].alpha
    if a.steps is not None:
        out.update({"analysis.b_crit": a.steps.b_crit, "analysis.s_min": a.steps.s_min,
                    "analysis.e_min": a.steps.e_min})
    for o in a.per_batch:
        if o.fitted:
            out[f"analysis.lr_opt.B{o.batch_size}"] = o.lr
            out[f"analysis.momentum_opt.B{o.batch_size}"] = o.momentum
    return out


@main.command()
@click.option("--batch-size", "-b", "batch_size", metavar="B",
              callback=lambda c, p, v: None if v is None else _batch_sizes((v,))[0],
              help="The batch size you will train with (default: say which batch size to use).")
@_source_options
@click.option("--json", "as_json", is_flag=True, help="Print the recommendation as JSON.")
def recommend(batch_size: int | None, spec_file: str | None, storage: str | None, study_name: str | None,
              csv: str | None, direction: str, target: float | None, as_json: bool) -> None:
    """Which batch size to use, or (with -b B) the learning rate and momentum to use at B.

    \b
    Without -b: the batch size with the best objective at the study's budget, the one
    that reaches the steps-to-target goal soonest in wall time on the trials'
    hardware, and the critical batch size with the regime of each measured batch
    size; each with lr, momentum and the plateau of lrs within one run's seed noise of the best.
    With -b B: B's own fitted optimum where B was measured, else the preferred fit
    of lr*(B); says when B lies outside the measured range (extrapolation), above
    the critical batch size, above the training set or the largest stable lr.
    """
    import json

    from bstune.report import answer_lines, format_recommendation

    _, _, result = _analysis(spec_file, storage, study_name, csv, direction, target)
    if batch_size is None:
        payload = None if result.answer is None else result.answer.to_dict()
        click.echo(json.dumps(payload, indent=2) if as_json else "\n".join(answer_lines(result)))
        return
    rec = result.recommend(batch_size)
    measured = [o.batch_size for o in result.per_batch]
    if measured and not min(measured) / 100 <= batch_size <= max(measured) * 100:
        click.echo(f"warning: B={batch_size:,} is more than 100x outside the measured batch sizes "
                   f"({min(measured)} to {max(measured)}): a guess, not a recommendation", err=True)
    click.echo(json.dumps(rec.to_dict(), indent=2) if as_json else format_recommendation(rec))


@main.command()
@click.option("--tracking-uri", default=DEFAULT_TRACKING_URI, show_default=True, metavar="URI",
              help="The tracking store to show: a study's tracking_uri (SQLite file or database URL).")
@click.option("--port", default=5000, show_default=True, help="Port of the UI on 127.0.0.1.")
def ui(tracking_uri: str, port: int) -> None:
    """Start the MLflow UI on 127.0.0.1 for the local tracking store.

    Each study is a parent run in its experiment (default: bstune) with one nested run per trial; select
    runs and press Compare to plot them against each other. For a remote MLflow server, open its own UI.
    Ctrl-C (or SIGTERM) stops the server and every process it started.
    """
    from bstune.stores import check_sqlite_url
    from bstune.ui import serve

    check_sqlite_url(tracking_uri, "--tracking-uri")
    try:
        serve(tracking_uri, port, click.echo)
    except KeyboardInterrupt:
        click.echo("MLflow UI stopped")


if __name__ == "__main__":
    main()


