"""`bstune report` on a real small study: what the report says, its plots, and its place in MLflow."""

from __future__ import annotations

import base64
import functools
import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from matplotlib.image import imread
from mlflow import MlflowClient

from bstune.analysis import Analysis, analyze
from bstune.cli import main
from bstune.errors import BstuneError
from bstune.report import Report, build_report, format_analysis, report_batch_sizes, write_report
from bstune.search import run_study
from bstune.spec import StudySpec, load_spec
from bstune.stores import load_study
from bstune.trials import TrialTable, from_study
from tests.conftest import one_thread, write_spec

NAME = "rptstudy"  # distinctive, so finding it in a page means finding the study
# 3 batch sizes x 5 trials of the digits data, momentum fixed (1-D valleys), lr spread evenly by QMC:
# enough for every batch size to get a fitted optimum, and quick.
STUDY = {
    "name": NAME, "workload.dataset": "digits", "workload.n_train": 1000, "workload.width": 32,
    "workload.epochs": 5, "workload.diagnostics_every": 0,
    "search.batch_sizes": [16, 32, 64], "search.lr": {"low": 0.004, "high": 3.0},
    "search.momentum": {"low": 0.9, "high": 0.9}, "search.sampler": {"name": "qmc"},
    "search.pruner": {"name": "none"}, "budget": {"trials": 15},
}
REQUESTED = 48  # a batch size between the measured ones


@dataclass
class ReportStudy:
    spec: StudySpec
    spec_file: Path
    table: TrialTable
    analysis: Analysis  # analysed independently of the report, the way `bstune recommend` does
    report: Report
    parent_run_id: str


@functools.cache
def _report_study(base: Path) -> ReportStudy:
    folder = base / "report-study"
    folder.mkdir()
    spec_file = write_spec(folder, **STUDY)
    spec = load_spec(spec_file)
    with one_thread():
        result = run_study(spec)
    table = from_study(load_study(spec.storage, NAME))
    return ReportStudy(spec=spec, spec_file=spec_file, table=table, analysis=analyze(table),
                       report=build_report(table, batch_sizes=[REQUESTED]), parent_run_id=result.parent_run_id)


@pytest.fixture(scope="session")
def report_study(tmp_path_factory: pytest.TempPathFactory) -> ReportStudy:
    """One real study for the report and browser tests (built once per session)."""
    return _report_study(tmp_path_factory.getbasetemp())


def _pixels(png: bytes) -> np.ndarray:
    assert png[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return imread(io.BytesIO(png), format="png")


def assert_real_plot(png: bytes, what: str) -> None:
    """A plot a person can read: a sizeable image that is neither blank nor one colour."""
    img = _pixels(png)[..., :3]
    h, w = img.shape[:2]
    assert w >= 800 and h >= 400, f"{what}: {w}x{h} is too small to read"
    ink = (img.min(axis=2) < 0.9).mean()  # share of pixels that are not (near) white
    assert 0.03 < ink < 0.6, f"{what}: {ink:.1%} of the image is drawn on"
    rgb = (img.reshape(-1, 3) * 255).astype(np.uint32)
    colours = len(np.unique(rgb[:, 0] << 16 | rgb[:, 1] << 8 | rgb[:, 2]))
    assert colours > 50, f"{what}: only {colours} colours"


# ------------------------------------------------------------------------------------------------ tests


def test_study_gives_the_analysis_what_it_needs(report_study: ReportStudy) -> None:
    table, a = report_study.table, report_study.analysis
    assert table.batch_sizes() == [16, 32, 64]
    assert sum(o.fitted and o.bracketed for o in a.per_batch) >= 2, format_analysis(a)
    assert report_study.report.rows, report_study.report.rows_error


def test_recommendation_table_agrees_with_analysis_recommend(report_study: ReportStudy) -> None:
    rep, a = report_study.report, report_study.analysis
    sizes = [r.batch_size for r in rep.rows]
    assert sizes == [16, 32, REQUESTED, 64]  # measured, the powers of two between them, and the one asked for
    assert [r.source for r in rep.rows] == ["measured", "measured", "requested", "measured"]
    for row in rep.rows:
        rec = a.recommend(row.batch_size)
        assert row.lr == pytest.approx(rec.lr) and row.momentum == pytest.approx(rec.momentum)
        assert row.lr_interval == pytest.approx(rec.lr_interval)
        assert row.lr_interval[0] <= row.lr <= row.lr_interval[1]
        assert row.extrapolated == rec.extrapolated
        # what the fitted linear and square-root rules would say instead, at the same momentum
        fits, scale = (a.effective_fits, 1 - rec.momentum) if a.basis == "effective" else (a.fits, 1.0)
        assert row.linear_rule_lr == pytest.approx(fits["linear"].predict(row.batch_size) * scale)
        assert row.sqrt_rule_lr == pytest.approx(fits["sqrt"].predict(row.batch_size) * scale)
    # The measured batch sizes expect their own fitted optimum's value.
    for o in a.per_batch:
        row = next(r for r in rep.rows if r.batch_size == o.batch_size)
        if o.fitted:
            assert row.expected_value == pytest.approx(o.value)
    # Wall time is examples to the target over the trials' own throughput.
    for row in rep.rows:
        assert row.examples_per_second and row.examples_per_second > 0
        if row.steps is not None:
            assert row.seconds == pytest.approx(row.steps * row.batch_size / row.examples_per_second)


@pytest.mark.fresh_stores
def test_html_report_is_one_file_with_every_plot_embedded(report_study: ReportStudy, tmp_path: Path) -> None:
    files = write_report(report_study.report, tmp_path, "html")
    assert files == [tmp_path / "report.html"] and sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]
    page = files[0].read_text()
    sources = re.findall(r"<img [^>]*src='([^']*)'", page)
    assert len(sources) == 4 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r"(src|href)=['\"](?!data:)", page), "the page must not load anything from outside"
    for src in sources:
        assert_real_plot(base64.b64decode(src.split(",", 1)[1]), "embedded plot")
    for heading in ("Budget spent", "Recommendations", "Fitted law", "Preferred law vs the linear",
                    "Optimum per batch size", "Study spec"):
        assert f"<h2>{heading}" in page
    # The B=48 row shows the lr that Analysis.recommend gives, as a person reads it.
    rec = report_study.analysis.recommend(REQUESTED)
    row = re.search(rf"<tr><td>{REQUESTED}</td>(.*?)</tr>", page)
    assert row and f"<td>{rec.lr:.3g}</td>" in row.group(1) and f"<td>{rec.momentum:.3f}</td>" in row.group(1)
    assert f"name: {NAME}" in page  # the spec as run


def test_markdown_report_references_the_pngs_beside_it(report_study: ReportStudy, tmp_path: Path) -> None:
    files = write_report(report_study.report, tmp_path / "md", "md")
    text = files[0].read_text()
    images = re.findall(r"!\[[^\]]+\]\(([^)]+)\)", text)
    assert sorted(images) == sorted(f"{k}.png" for k in report_study.report.plots)
    for name in images:
        png = (files[0].parent / name).read_bytes()
        assert_real_plot(png, name)
    assert "| B | source | lr |" in text and f"| {REQUESTED} | requested |" in text


def test_json_report_holds_every_number(report_study: ReportStudy, tmp_path: Path) -> None:
    rep = report_study.report
    files = write_report(rep, tmp_path, "json")
    data = json.loads(files[0].read_text())
    # The plots it names are written beside it, as PNG.
    assert data["plots"] and sorted(data["plots"]) == sorted(f.name for f in files[1:])
    assert all((tmp_path / name).read_bytes().startswith(b"\x89PNG") for name in data["plots"])
    assert data["analysis"] == json.loads(json.dumps(report_study.analysis.to_dict()))
    assert [r["batch_size"] for r in data["recommendations"]] == [r.batch_size for r in rep.rows]
    for got, row in zip(data["recommendations"], rep.rows, strict=True):
        assert got["lr"] == pytest.approx(row.lr) and got["expected_value"] == pytest.approx(row.expected_value)
    table = report_study.table
    assert data["spent"]["trials"] == len(table.records) == 15
    assert data["spent"]["examples"] == sum(r.examples_seen for r in table.records) > 0
    assert data["spent"]["limits"]["trials"] == 15
    assert data["law"]["basis"] == report_study.analysis.basis
    assert data["spec"]["name"] == NAME and data["mlflow_parent_run_id"] == report_study.parent_run_id
    assert data["plots"] == [f"{k}.png" for k in rep.plots]


def test_report_batch_sizes_fill_in_powers_of_two() -> None:
    assert report_batch_sizes([16, 128], [48, 4096]) == [
        (16, "measured"), (32, "in between"), (48, "requested"), (64, "in between"), (128, "measured"),
        (4096, "requested")]
    assert report_batch_sizes([24, 100]) == [(24, "measured"), (32, "in between"), (64, "in between"),
                                             (100, "measured")]


@pytest.mark.slow
def test_cli_report_writes_it_and_logs_it_to_the_parent_run(report_study: ReportStudy, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["report", str(report_study.spec_file), "--format", "md", "--out", str(out),
                                  "--batch-size", "48"])
    assert r.exit_code == 0, r.output
    assert (out / "report.md").exists() and f"| {REQUESTED} | requested |" in (out / "report.md").read_text()
    client = MlflowClient(report_study.spec.tracking_uri)
    run_id = report_study.parent_run_id
    logged = {a.path for a in client.list_artifacts(run_id, "report")}
    assert {f"report/{n}" for n in ("report.md", "lr_vs_batch.png", "objective_map.png", "steps_tradeoff.png",
                                    "budget_and_curves.png")} <= logged
    note = client.get_run(run_id).data.tags["mlflow.note.content"]
    assert "report/report.md" in note and str((out / "report.md").resolve()) in note
    # The study by storage and name, without its spec file; JSON only, MLflow left alone.
    r = CliRunner().invoke(main, ["report", "--storage", report_study.spec.storage, "--study", NAME, "--format",
                                  "json", "--out", str(tmp_path / "j"), "--no-mlflow"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "j" / "report.json").read_text())["study"] == NAME


@pytest.mark.parametrize(("args", "message"), [
    (["--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
    ([], None),  # filled in below: the spec's study, under another name
])
def test_cli_report_bad_input_is_one_line_and_exit_2(report_study: ReportStudy, tmp_path: Path, args: list[str],
                                                     message: str | None) -> None:
    spec = str(report_study.spec_file)
    if message is None:
        args, message = ["--study", "nosuch"], "no study named 'nosuch'"
    r = CliRunner().invoke(main, ["report", spec, "--out", str(tmp_path), "--no-mlflow", *args])
    assert r.exit_code == 2 and r.output.startswith("error: ") and message in r.output, r.output
    assert r.output.count("\n") == 1, r.output


def test_cli_report_needs_a_study_and_a_folder(report_study: ReportStudy, tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["report"])
    assert r.exit_code == 2 and "pass the study's SPEC file, or --storage URL and --study NAME" in r.output
    a_file = tmp_path / "taken"
    a_file.write_text("")
    r = CliRunner().invoke(main, ["report", str(report_study.spec_file), "--out", str(a_file), "--no-mlflow"])
    assert r.exit_code == 2 and "is a file; give a folder" in r.output, r.output


def test_build_report_rejects_bad_batch_sizes(report_study: ReportStudy) -> None:
    with pytest.raises(BstuneError, match="positive integer"):
        build_report(report_study.table, batch_sizes=[-4], analysis=report_study.analysis)


def test_child_runs_carry_what_the_compare_views_need(report_study: ReportStudy) -> None:
    client = MlflowClient(report_study.spec.tracking_uri)
    exp = client.get_experiment_by_name(report_study.spec.experiment)
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{report_study.parent_run_id}'",
                                  max_results=100)
    assert len(children) == 15
    values = {r.number: r.value for r in report_study.table.records}
    for run in children:
        for key in ("batch_size", "lr", "momentum", "effective_lr", "noise_scale", "epochs"):
            assert math.isfinite(float(run.data.params[key])), key  # numeric, so the UI can plot them
        m = run.data.metrics
        assert {"final_objective", "final_val_loss", "train_seconds", "val_loss", "examples_seen"} <= set(m)
        assert m["train_seconds"] > 0
        assert m["final_objective"] == pytest.approx(values[int(run.data.tags["bstune.trial"])])
