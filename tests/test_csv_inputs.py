"""CSV tables of trials: rows become trials by their number only, and every bad table is one line."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from bstune.cli import main
from bstune.errors import BstuneError
from bstune.trials import State, from_csv

HEAD = "batch_size,lr,momentum,value,state\n"


def _table(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "t.csv"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_an_interrupted_trial_and_its_retry_stay_two_trials(tmp_path: Path) -> None:
    """Same point, no number column: two rows, two trials; the completed retry is the optimum."""
    path = _table(tmp_path, HEAD + "32,0.1,0.9,,INTERRUPTED\n32,0.1,0.9,0.25,COMPLETE\n64,0.2,0.9,0.5,COMPLETE\n")
    table = from_csv(path)
    assert [(r.state, r.value) for r in table.records] == [
        (State.INTERRUPTED, None), (State.COMPLETE, 0.25), (State.COMPLETE, 0.5)]
    assert table.best().value == 0.25 and table.best().batch_size == 32


def test_rows_are_grouped_by_number_only(tmp_path: Path) -> None:
    text = ("number,batch_size,lr,momentum,value,state,epoch,epoch_value,examples_seen\n"
            "0,32,0.1,0.9,,INTERRUPTED,1,0.9,100\n"
            "1,32,0.1,0.9,0.3,COMPLETE,2,0.3,200\n"
            "1,32,0.1,0.9,0.3,COMPLETE,1,0.6,100\n")
    table = from_csv(_table(tmp_path, text))
    assert [r.number for r in table.records] == [0, 1]
    assert [p.epoch for p in table.records[1].curve] == [1, 2] and table.records[1].examples_seen == 200
    assert table.best().number == 1


@pytest.mark.parametrize("text,words", [
    ("number,batch_size,lr,momentum,value,state\n3,32,0.1,0.9,0.3,COMPLETE\n3,64,0.1,0.9,0.3,COMPLETE\n",
     ["line 3", "trial 3", "line 2", "its own number"]),
    (HEAD.strip() + ",epoch\n32,0.1,0.9,0.3,COMPLETE,1\n", ["line 2", "needs a number column"]),
    (HEAD + "nan,0.1,0.9,0.3,COMPLETE\n", ["line 2", "batch_size must be a positive integer", "nan"]),
    (HEAD + "inf,0.1,0.9,0.3,COMPLETE\n", ["line 2", "batch_size must be finite"]),
    (HEAD + "32,nan,0.9,0.3,COMPLETE\n", ["line 2", "lr must be > 0"]),
    (HEAD + "32,0.1,nan,0.3,COMPLETE\n", ["line 2", "momentum must lie in [0, 1)"]),
    ("number,batch_size,lr,momentum,value,state,epoch,optimizer_steps\n0,32,0.1,0.9,0.3,COMPLETE,1,many\n",
     ["line 2", "optimizer_steps must be a number", "'many'"]),
    ("number,batch_size,lr,momentum,value,state,epoch,examples_seen\n0,32,0.1,0.9,0.3,COMPLETE,1,-5\n",
     ["line 2", "examples_seen must be a whole number >= 0"]),
    (HEAD.encode() + b"32,0.1,0.9,0.3,COMPL\xc9T\n", ["not UTF-8", "0xc9"]),
    (HEAD + "32,0.1,0.9,0.3," + "x" * 200_000 + "\n", ["not a readable CSV", "field larger than field limit"]),
], ids=["number-disagrees", "epoch-without-number", "batch-nan", "batch-inf", "lr-nan", "momentum-nan",
        "steps-not-a-number", "examples-negative", "not-utf8", "huge-field"])
def test_bad_tables_are_one_line(tmp_path: Path, text: str | bytes, words: list[str]) -> None:
    path = _table(tmp_path, text)
    with pytest.raises(BstuneError):
        from_csv(path)
    r = CliRunner().invoke(main, ["analyze", "--csv", str(path), "--json", "-"])
    line = r.output.strip()
    assert r.exit_code == 2 and line.startswith("error: ") and "\n" not in line, r.output
    for w in words:
        assert w in line, (w, line)


def test_a_directory_as_the_table_is_one_line(tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["analyze", "--csv", str(tmp_path), "--json", "-"])
    assert r.exit_code == 2 and r.output.strip() == f"error: {tmp_path}: is a directory, not a CSV file of trials"
