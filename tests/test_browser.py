"""The HTML report and the MLflow UI, looked at in headless Chromium the way a person would look at them.

Needs Debian's `chromium` (`.ci/run` installs it). Without it the tests are skipped, except in CI (CI=true),
where a missing browser is a failure.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from bstune.report import publish, write_report
from tests.test_report import NAME, ReportStudy, _pixels, report_study  # noqa: F401 - a fixture

pytestmark = pytest.mark.slow  # real studies and subprocesses: the slow suite

CHROMIUM = shutil.which("chromium") or next((p for p in ("/usr/bin/chromium",) if Path(p).exists()), None)
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync")


@pytest.fixture(scope="module")
def chromium() -> str:
    if CHROMIUM:
        return CHROMIUM
    if os.environ.get("CI") == "true":
        pytest.fail("chromium is not installed, and CI must run the browser tests: apt-get install -y chromium")
    pytest.skip("headless Chromium is not installed (apt-get install -y chromium); skipping the browser checks")


def _run_chromium(chromium: str, scratch: Path, *args: str) -> str:
    """Chromium with a fresh profile; returns its stdout (the DOM, for --dump-dom)."""
    profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=scratch)
    done = subprocess.run([chromium, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


class MlflowUI:
    """`mlflow server` on a free port over the study's tracking store; ready once `url` is first read."""

    def __init__(self, tracking_uri: str, folder: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log = folder / "mlflow-server.log"
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1", "--backend-store-uri", tracking_uri,
               "--default-artifact-root", str(folder / "artifacts")]
        env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job-runner process to start
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self._ready = False

    @property
    def url(self) -> str:
        base = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 180  # the server's imports alone take half a minute on a busy machine
        while not self._ready:
            assert self.proc.poll() is None, f"mlflow server exited:\n{self.log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    self._ready = r.status == 200
            except OSError:
                assert time.monotonic() < deadline, f"mlflow server never answered:\n{self.log.read_text()[-3000:]}"
                time.sleep(0.5)
        return base

    def stop(self) -> None:
        """Stop the server and its workers (its own process group)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture(scope="module")
def mlflow_ui(report_study: ReportStudy, tmp_path_factory: pytest.TempPathFactory,  # noqa: F811
              chromium: str) -> MlflowUI:
    ui = MlflowUI(report_study.spec.tracking_uri, tmp_path_factory.mktemp("mlflow-ui"))
    yield ui
    ui.stop()


def test_html_report_renders_with_its_plots(report_study: ReportStudy, chromium: str,  # noqa: F811
                                            mlflow_ui: MlflowUI, tmp_path: Path) -> None:
    # (mlflow_ui is requested here only so the server boots while Chromium draws the report)
    page = write_report(report_study.report, tmp_path, "html")[0]
    shot = tmp_path / "report.png"
    _run_chromium(chromium, tmp_path, "--window-size=1400,5600", "--hide-scrollbars", f"--screenshot={shot}",
                  page.as_uri())
    img = _pixels(shot.read_bytes())[..., :3]
    assert img.shape[:2] == (5600, 1400)
    ink = (img.min(axis=2) < 0.9).mean()
    assert ink > 0.05, f"the page is nearly blank ({ink:.1%} drawn on)"
    # Tables and text are black and grey; the plots bring the colour. The orange of the preferred fit and the
    # viridis greens of the batch sizes can only come from the embedded images.
    rgb = (img * 255).astype(int)
    orange = (np.abs(rgb - [221, 132, 82]).max(axis=2) < 16).sum()
    colourful = (rgb.max(axis=2) - rgb.min(axis=2) > 60).mean()
    assert orange > 500, f"no fitted-law curve in the screenshot ({orange} orange pixels): plots missing?"
    assert colourful > 0.01, f"only {colourful:.2%} of the page is in colour: plots missing?"


def test_mlflow_ui_lists_the_study_its_child_runs_and_the_report(report_study: ReportStudy,  # noqa: F811
                                                                 chromium: str, mlflow_ui: MlflowUI,
                                                                 tmp_path: Path) -> None:
    client = MlflowClient(report_study.spec.tracking_uri)
    experiment = client.get_experiment_by_name(report_study.spec.experiment).experiment_id
    parent = report_study.parent_run_id
    files = write_report(report_study.report, tmp_path / "report", "html")
    publish(report_study.report, files, report_study.spec.tracking_uri)
    children = [f"{NAME}-trial-{r.number:04d}" for r in report_study.table.records]
    budget = "--virtual-time-budget=20000"  # let the single-page app fetch its runs before the DOM is taken

    # The runs table nests child runs under the study's run; sorted by name it lists all of them.
    runs = _run_chromium(chromium, tmp_path, budget, "--dump-dom",
                         f"{mlflow_ui.url}/#/experiments/{experiment}/runs?orderByKey=attributes.run_name"
                         "&orderByAsc=true")
    assert f">{NAME}</span></a>" in runs, "the study's parent run is not listed"
    missing = [c for c in children if f">{c}</span></a>" not in runs]
    assert not missing, f"child runs not listed: {missing}"
    assert f"<strong>{len(children) + 1}</strong> matching runs" in runs

    # The study's own page: its child runs, and a description that points at the report.
    page = _run_chromium(chromium, tmp_path, budget, "--dump-dom",
                         f"{mlflow_ui.url}/#/experiments/{experiment}/runs/{parent}")
    assert "Child runs" in page and any(c in page for c in children)
    assert "report/report.html" in page, "the run's description does not say where the report is"
