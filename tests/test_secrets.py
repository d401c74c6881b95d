"""Passwords never show: one redaction for every URL form SQLAlchemy accepts, used wherever a URL is shown or
stored (messages, `status`, the study's stored spec, MLflow's spec.yaml, the report)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from bstune.errors import redact
from bstune.search.study import _public_spec
from bstune.spec import StudySpec
from bstune.trials import StudyAttr, from_study

# (text, what it must read after redaction); every secret below contains the word SECRET.
URL_FORMS = [
    ("postgresql://u:SECRET@h/db", "postgresql://u:***@h/db"),
    ("postgresql+psycopg://v:top/SECRETslash@h/db", "postgresql+psycopg://v:***@h/db"),
    ("postgresql://u:p@SECRET@h:5432/db", "postgresql://u:***@h:5432/db"),  # '@' unencoded in the password
    ("postgresql://u:a?b:SECRET@h/db", "postgresql://u:***@h/db"),  # '?' and ':' in the password
    ("mysql+pymysql://u:p%40SECRET%2F@h/db", "mysql+pymysql://u:***@h/db"),  # percent-encoded
    ("redis://:SECRET@h:6379", "redis://:***@h:6379"),  # no user name
    ("postgresql://u@h/db?password=SECRET", "postgresql://u@h/db?password=***"),
    ("postgresql://u@h/db?sslmode=require&sslpassword=SECRET&x=1",
     "postgresql://u@h/db?sslmode=require&sslpassword=***&x=1"),
    ("postgresql://u:SECRET@h/db?application_name=a@b", "postgresql://u:***@h/db?application_name=a@b"),
    ("https://user:SECRET@mlflow.example.com:5000", "https://user:***@mlflow.example.com:5000"),
    ("error at 'postgresql://a:SECRET1@h1/db' and \"mysql://b:SEC/RET2@h2/db\", then postgresql://c:SECRET3@h3.",
     "error at 'postgresql://a:***@h1/db' and \"mysql://b:***@h2/db\", then postgresql://c:***@h3."),
    ("connection failed: host=h password=SECRET dbname=db", "connection failed: host=h password=*** dbname=db"),
    # nothing to hide: left as it is
    ("sqlite:///mlruns/optuna.db", "sqlite:///mlruns/optuna.db"),
    ("sqlite:////data/a@b/optuna.db", "sqlite:////data/a@b/optuna.db"),
    ("postgresql://u@h:5432/db", "postgresql://u@h:5432/db"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
]


@pytest.mark.parametrize(("text", "expected"), URL_FORMS)
def test_redact_hides_the_password_of_every_url_form(text: str, expected: str) -> None:
    assert redact(text) == expected
    assert "SECRET" not in redact(text) and "SEC/RET" not in redact(text)
    assert redact(expected) == expected


def test_the_stored_spec_and_spec_yaml_carry_no_password() -> None:
    spec = StudySpec(name="s", storage="postgresql+psycopg://v:top/slashpw@h/db",
                     tracking_uri="postgresql://v@h/mlflow?password=qpw")
    public = _public_spec(spec)
    assert public["storage"] == "postgresql+psycopg://v:***@h/db"
    assert public["tracking_uri"] == "postgresql://v@h/mlflow?password=***"


def test_a_table_read_from_a_study_shows_no_password_even_if_one_was_stored(tmp_path: Path) -> None:
    """The report prints the table's spec: a spec stored with a password is redacted when read."""
    study = optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path}/o.db")
    study.set_user_attr(StudyAttr.SPEC, {"storage": "postgresql://v:top/slashpw@h/db",
                                         "tracking_uri": "postgresql://v@h/m?password=qpw"})
    meta = from_study(study).meta["spec"]
    assert meta == {"storage": "postgresql://v:***@h/db", "tracking_uri": "postgresql://v@h/m?password=***"}
    assert study.user_attrs[StudyAttr.SPEC]["storage"] == "postgresql://v:top/slashpw@h/db"  # not rewritten


@pytest.mark.parametrize("url", ["postgresql+psycopg://v:top/slashpw@127.0.0.1:1/db",
                                 "postgresql+psycopg://v@127.0.0.1:1/db?password=slashpw"])
@pytest.mark.slow
def test_status_names_the_store_without_its_password(tmp_path: Path, url: str) -> None:
    spec = Path(__file__).parents[1] / "studies" / "digits.yaml"
    r = subprocess.run([sys.executable, "-m", "bstune.cli", "status", str(spec), "--storage", url],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "127.0.0.1:1/db" in r.stderr and "***" in r.stderr
    assert "slashpw" not in r.stderr + r.stdout


@pytest.mark.slow
def test_next_steps_carry_the_overrides_and_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After `bstune study SPEC --storage A --tracking-uri B` the printed commands read that study."""
    import shlex

    from click.testing import CliRunner

    from bstune.cli import main
    from tests.conftest import write_spec

    monkeypatch.chdir(tmp_path)
    spec = write_spec(tmp_path, **{"budget.trials": 4})
    (tmp_path / "elsewhere").mkdir()
    storage, tracking = (f"sqlite:///{tmp_path}/elsewhere/{n}.db" for n in ("optuna", "mlflow"))
    out = CliRunner().invoke(main, ["study", str(spec), "--storage", storage, "--tracking-uri", tracking]).output
    steps = [line.removeprefix("next:").split("#")[0] for line in out[out.index("next:"):].splitlines()]
    analyze = shlex.split(steps[0])
    assert analyze == ["bstune", "analyze", str(spec), "--storage", storage, "--tracking-uri", tracking]
    assert shlex.split(steps[1])[:5] == ["bstune", "report", str(spec), "--batch-size", "B"]
    assert shlex.split(steps[2]) == ["bstune", "ui", "--tracking-uri", tracking]
    r = CliRunner().invoke(main, [*analyze[1:], "--json", "-"])
    # it reads the study's trials (4 are too few to fit: the analysis says so, naming them)
    assert r.exit_code == 0 or "found B=16: 2, B=64: 2" in r.output, r.output


def test_next_steps_never_print_a_password() -> None:
    from bstune.cli import _next_steps

    text = _next_steps("s.yaml", "postgresql://v:top/slashpw@h/m", "postgresql://v@h/o?password=qpw",
                       "postgresql://v:top/slashpw@h/m")
    assert "slashpw" not in text and "qpw" not in text
    assert '--storage "$BSTUNE_STORAGE" --tracking-uri "$BSTUNE_TRACKING_URI"' in text
    assert "set BSTUNE_STORAGE and BSTUNE_TRACKING_URI to the URL you gave" in text
