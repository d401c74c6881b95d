"""The `bstune` command. Thin: each command parses its arguments and calls the Python API.

Bad input of any kind ends with one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import sys
import time

import click

from bstune.errors import BstuneError
from bstune.spec import StudySpec, load_spec


def _quiet_libraries() -> None:
    """Optuna's experimental-feature warnings and MLflow's info logs are noise on a terminal."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", module="optuna")
    warnings.filterwarnings("ignore", message=".*experimental.*")
    for name in ("mlflow", "alembic", "optuna"):
        logging.getLogger(name).setLevel(logging.WARNING)


class _Group(click.Group):
    """Turns BstuneError into `error: ...` and exit code 2 for every command."""

    def invoke(self, ctx: click.Context) -> object:
        _quiet_libraries()
        try:
            return super().invoke(ctx)
        except BstuneError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


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


def _spec(path: str, storage: str | None, tracking_uri: str | None) -> StudySpec:
    spec = load_spec(path)
    changes = {k: v for k, v in (("storage", storage), ("tracking_uri", tracking_uri)) if v}
    return spec.with_overrides(**changes) if changes else spec


_storage_opt = click.option("--storage", metavar="URL", help="Optuna storage URL (overrides the spec's).")
_tracking_opt = click.option("--tracking-uri", metavar="URI", help="MLflow tracking URI (overrides the spec's).")


@main.command()
@click.argument("spec_file", metavar="SPEC")
def validate(spec_file: str) -> None:
    """Check a study spec without running anything."""
    spec = load_spec(spec_file)
    s, w, b = spec.search, spec.workload, spec.budget
    click.echo(f"{spec_file}: ok")
    click.echo(f"  study {spec.name}: {w.dataset}/{w.model}, {w.optimizer}, {w.epochs} epochs, objective {s.objective}")
    click.echo(f"  batch sizes {list(s.batch_sizes)}, lr {s.lr[0]:g}..{s.lr[1]:g}, "
               f"momentum {s.momentum[0]:g}..{s.momentum[1]:g}, sampler {s.sampler.name}, pruner {s.pruner.name}")
    click.echo(f"  budget: trials {b.trials}, examples {b.examples}, seconds {b.seconds}")


@main.command()
@click.argument("spec_file", metavar="SPEC")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1, ... (auto: CUDA if present).")
@_storage_opt
@_tracking_opt
def study(spec_file: str, device: str, storage: str | None, tracking_uri: str | None) -> None:
    """Run the study in SPEC (a YAML file) until its budget is spent.

    Running the same command again resumes the study: trials already run count against the budget,
    and a trial that was interrupted is run again.
    """
    from bstune.progress import ConsoleProgress, format_summary
    from bstune.study import run_study

    spec = _spec(spec_file, storage, tracking_uri)
    t0 = time.perf_counter()
    progress = ConsoleProgress(spec.search.objective)
    result = run_study(spec, device=device, progress=progress)
    click.echo(format_summary(result.table, result.spent, spec.budget, result.stop_reason, time.perf_counter() - t0))
    if result.interrupted:
        click.echo("interrupted: the running trial is recorded as INTERRUPTED and queued again; "
                   "run the same command to resume", err=True)
        sys.exit(130)


@main.command()
@click.option("--tracking-uri", default="sqlite:///mlruns/mlflow.db", show_default=True, metavar="URI")
@click.option("--port", default=5000, show_default=True)
def ui(tracking_uri: str, port: int) -> None:
    """Start the MLflow UI on 127.0.0.1 for the local tracking store."""
    import subprocess

    from bstune.tracking import artifact_root, check_sqlite_url

    check_sqlite_url(tracking_uri, "--tracking-uri")
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", tracking_uri]
    root = artifact_root(tracking_uri)
    if root:
        cmd += ["--default-artifact-root", root]
    click.echo(f"MLflow UI on http://127.0.0.1:{port} (Ctrl-C to stop)")
    try:
        sys.exit(subprocess.call(cmd))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()


