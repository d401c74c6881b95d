"""`bstune analyze` and `bstune recommend` from the command line: on a real study and on a CSV table."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from bstune.analysis import analyze
from bstune.cli import _study_answer, main
from bstune.errors import BstuneError
from bstune.report import build_report
from bstune.search import run_study
from bstune.spec import load_spec
from bstune.stores import load_study
from bstune.trials import from_csv
from tests.conftest import write_spec
from tests.simulate import simulate_trials, write_csv


def _invoke(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(main, list(args))
    return r.exit_code, r.output


@pytest.fixture(scope="module")
def csv_table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    table = simulate_trials("saturating", batch_sizes=(32, 64, 128, 256, 512, 1024, 2048), trials_per_batch=30,
                            b_noise=256.0, seed=3, curves=True, epochs=64)
    path = tmp_path_factory.mktemp("csv") / "trials.csv"
    write_csv(table, path)
    return path


def test_analyze_csv_prints_fits_and_writes_json(csv_table: Path, tmp_path: Path) -> None:
    out_json = tmp_path / "a.json"
    code, out = _invoke("analyze", "--csv", str(csv_table), "--json", str(out_json))
    assert code == 0, out
    assert "Optimum per batch size" in out and "saturating" in out and "B_noise" in out
    data = json.loads(out_json.read_text())
    assert {o["batch_size"] for o in data["per_batch"]} == {32, 64, 128, 256, 512, 1024, 2048}
    assert 256 * 0.7 < data["b_noise"] < 256 * 1.3
    # The CSV round-trip loses nothing the analysis uses: same numbers as analysing the table in memory.
    direct = analyze(from_csv(csv_table)).to_dict()
    assert direct["b_noise"] == pytest.approx(data["b_noise"])


def test_recommend_flags_extrapolation_and_critical(csv_table: Path) -> None:
    code, out = _invoke("recommend", "-b", "128", "--csv", str(csv_table), "--json")
    assert code == 0, out
    rec = json.loads(out)
    assert rec["batch_size"] == 128 and rec["lr"] > 0 and 0 <= rec["momentum"] < 1
    assert not rec["extrapolated"] and not rec["above_critical"]
    lo, hi = rec["lr_interval"]
    assert lo <= rec["lr"] <= hi
    code, out = _invoke("recommend", "-b", "16384", "--csv", str(csv_table))
    assert code == 0 and "outside the measured range" in out and "critical batch size" in out, out


def test_absurd_batch_sizes_are_refused_or_warned_in_one_line(csv_table: Path, tmp_path: Path) -> None:
    for b in ("1e26", "16777217", "0.5", "many"):
        r = CliRunner().invoke(main, ["recommend", "-b", b, "--csv", str(csv_table)])
        assert r.exit_code == 2 and r.output.count("\n") == 1 and "--batch-size" in r.output, r.output
    r = CliRunner().invoke(main, ["recommend", "-b", "1e6", "--csv", str(csv_table)])
    assert r.exit_code == 0 and "more than 100x outside the measured batch sizes (32 to 2048)" in r.output, r.output
    big = tmp_path / "big.csv"
    big.write_text("batch_size,lr,momentum,value,state\n64,0.1,0.9,1.0,COMPLETE\n1e9,0.1,0.9,1.0,COMPLETE\n")
    code, out = _invoke("analyze", "--csv", str(big), "--json", "-")
    assert code == 2 and out.strip() == f"error: {big}: line 3: batch_size 1e9 is beyond any batch size trained " \
        "with (at most 2^24 = 16,777,216); check the column's values and units", out


@pytest.mark.slow
def test_analyze_real_study_logs_to_mlflow(tmp_path: Path) -> None:
    path = write_spec(tmp_path, **{"search.batch_sizes": [16, 32, 64], "search.pruner": "none",
                                   "search.lr": {"low": 0.003, "high": 3.0}, "budget.trials": 18})
    spec = load_spec(path)
    result = run_study(spec)
    code, out = _invoke("analyze", str(path), "--json", str(tmp_path / "a.json"))
    assert code == 0, out
    assert "Optimum per batch size" in out and "logged to MLflow run" in out
    run = MlflowClient(spec.tracking_uri).get_run(result.parent_run_id)
    assert any(k.startswith("analysis.lr_opt.B") for k in run.data.metrics)
    artifacts = {a.path for a in MlflowClient(spec.tracking_uri).list_artifacts(result.parent_run_id)}
    assert "analysis.json" in artifacts
    # a tracking store without the study's run: one line, exit 2, no traceback
    other = f"sqlite:///{tmp_path}/other.db"
    code, out = _invoke("analyze", str(path), "--json", "-", "--tracking-uri", other)
    line = out.strip().splitlines()[-1]
    assert code == 2 and line.startswith(f"error: cannot log the analysis to MLflow run {result.parent_run_id}"), out
    code, out = _invoke("recommend", "--batch-size", "32", str(path))
    assert code == 0 and "lr=" in out, out
    # without -b: which batch size to use, the answer first; the parent run carries it
    code, out = _invoke("recommend", str(path))
    assert code == 0, out
    first = out.splitlines()[0]
    assert first.startswith("Best ") and re.search(r"B=(16|32|64) ", first) and "lr=" in first, out
    best = int(re.search(r"B=(\d+)", first).group(1))
    assert run.data.metrics["analysis.best_batch_size"] == best
    assert json.loads((tmp_path / "a.json").read_text())["answer"]["best"]["batch_size"] == best
    # what `bstune study` ends its summary with once the budget is spent
    lines = _study_answer(result.table).splitlines()
    assert len(lines) == 3 and lines[0] == first and lines[1].startswith("Fastest")
    assert lines[2].startswith("Critical batch size")
    # The study records its URLs without passwords: by --storage alone, a password-protected tracking store
    # must be named again, said before anything is written.
    study = load_study(spec.storage, spec.name)
    stored = study.user_attrs["bstune.spec"]
    study.set_user_attr("bstune.spec", {**stored, "tracking_uri": "postgresql://me:***@db.example/mlflow"})
    by_storage = ["--storage", spec.storage, "--study", spec.name]
    code, out = _invoke("analyze", *by_storage, "--json", str(tmp_path / "b.json"))
    assert code == 2 and "password" in out and "--tracking-uri" in out, out
    assert not (tmp_path / "b.json").exists()
    code, out = _invoke("report", *by_storage, "--out", str(tmp_path / "rep"))
    assert code == 2 and "password" in out and not (tmp_path / "rep").exists(), out
    code, out = _invoke("analyze", *by_storage, "--json", str(tmp_path / "b.json"), "--no-mlflow")
    assert code == 0 and (tmp_path / "b.json").exists(), out


@pytest.mark.parametrize("content,words", [
    ("batch_size,lr,value,state\n32,0.1,0.5,COMPLETE\n", ["missing column", "momentum"]),
    ("batch_size,lr,momentum,value,state\n32,-0.1,0.9,0.5,COMPLETE\n", ["line 2", "lr must be > 0"]),
    ("batch_size,lr,momentum,value,state\n0,0.1,0.9,0.5,COMPLETE\n", ["line 2", "batch_size"]),
    ("batch_size,lr,momentum,value,state\n" + "".join(f"{b},0.1,0.9,,DIVERGED\n" for b in (32, 64)),
     ["none of the 2 trials completed", "nothing to fit"]),
    ("batch_size,lr,momentum,value,state\n" + "".join(f"32,{0.01 * (i + 1)},0.9,{i},COMPLETE\n" for i in range(3)),
     ["one batch size (B=32)", "run more trials"]),
])
def test_bad_tables_are_one_line(tmp_path: Path, content: str, words: list[str]) -> None:
    path = tmp_path / "t.csv"
    path.write_text(content)
    code, out = _invoke("analyze", "--csv", str(path), "--json", "-")
    assert code == 2, out
    line = out.strip()
    assert line.startswith("error: ") and "\n" not in line, out
    for w in words:
        assert w in line, (w, line)


def test_no_completed_trial_is_one_line_for_every_analysis_command(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("batch_size,lr,momentum,value,state\n32,0.1,0.9,,DIVERGED\n64,0.2,0.9,0.5,PRUNED\n")
    for args in (["analyze", "--json", "-"], ["recommend"], ["recommend", "-b", "32"]):
        code, out = _invoke(*args, "--csv", str(path))
        assert code == 2 and out.strip().startswith("error: none of the 2 trials completed"), (args, out)
        assert "\n" not in out.strip()
    with pytest.raises(BstuneError, match="none of the 2 trials completed"):
        build_report(from_csv(path))


def test_one_batch_size_recommends_its_own_optimum(tmp_path: Path) -> None:
    table = simulate_trials("power", batch_sizes=(64,), trials_per_batch=20, seed=1)
    path = tmp_path / "one.csv"
    write_csv(table, path)
    code, out = _invoke("recommend", "-b", "64", "--csv", str(path), "--json")
    assert code == 0, out
    rec = json.loads(out)
    assert rec["form"] == "measured" and rec["lr"] == analyze(from_csv(path)).optimum(64).lr
    code, out = _invoke("recommend", "--csv", str(path))
    assert code == 0 and out.startswith("Best value at the study's budget: B=64 "), out
    code, out = _invoke("recommend", "-b", "128", "--csv", str(path))
    assert code == 2 and "no fit of lr*(B)" in out, out


@pytest.mark.slow
def test_unknown_study_is_one_line(tmp_path: Path) -> None:
    spec_file = write_spec(tmp_path, **{"budget.trials": 1})
    run_study(load_spec(spec_file))
    code, out = _invoke("analyze", "--storage", f"sqlite:///{tmp_path}/optuna.db", "--study", "nope")
    assert code == 2 and "no study named 'nope'" in out and "small" in out, out
    # The spec's own study is there: running the spec would not make 'nope'.
    code, out = _invoke("analyze", str(spec_file), "--study", "nope")
    assert code == 2 and "studies there: small; check the study name, or run" in out, out
    code, out = _invoke("analyze")
    assert code == 2 and "--storage URL and --study NAME" in out, out
    typo = tmp_path / "optuan.db"
    code, out = _invoke("analyze", "--storage", f"sqlite:///{typo}", "--study", "small")
    assert code == 2 and "optuan.db does not exist" in out and not typo.exists(), out
