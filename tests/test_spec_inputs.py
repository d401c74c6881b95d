"""Hostile or broken spec files: bounded YAML (size, aliases), encoding, duplicate keys, and numeric fields
past which every trial would fail. Each is one line naming the file and the fix, exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from bstune.cli import main
from bstune.spec import LR_MAX, load_spec
from bstune.spec_yaml import MAX_ALIASES, MAX_SPEC_BYTES
from tests.conftest import small_spec


def _validate(path: Path) -> str:
    """`bstune validate` on `path`: asserts exit 2 and one `error:` line, returns it."""
    result = CliRunner().invoke(main, ["validate", str(path)])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {path}: "), result.output
    return lines[0]


def _spec_text(tmp_path: Path) -> str:
    return yaml.safe_dump(small_spec(tmp_path), sort_keys=False)


def test_an_alias_bomb_is_refused_before_it_is_expanded(tmp_path: Path) -> None:
    bomb = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i, name in enumerate("bcdefghi"):
        prev = "abcdefghi"[i]
        bomb.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    path = tmp_path / "bomb.yaml"
    path.write_text(_spec_text(tmp_path) + "workload_extra:\n" + "\n".join("  " + line for line in bomb) + "\n")
    line = _validate(path)
    assert f"more than {MAX_ALIASES} aliases" in line


def test_a_few_aliases_and_merge_keys_still_work(tmp_path: Path) -> None:
    text = _spec_text(tmp_path).replace("workload:\n", "workload:\n  <<: &w {epochs: 2}\n", 1)
    text = text.replace("  epochs: 3\n", "").replace("search:\n", "search:\n  <<: {}\n", 1)
    path = tmp_path / "ok.yaml"
    path.write_text(text + "experiment: &e bstune-x\n")
    spec = load_spec(path)
    assert spec.workload.epochs == 2 and spec.experiment == "bstune-x"


def test_a_spec_over_the_size_limit_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text(_spec_text(tmp_path) + "#" * MAX_SPEC_BYTES)
    assert f"a spec must be under {MAX_SPEC_BYTES:,}" in _validate(path)


def test_a_spec_that_is_not_utf8_is_named_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes((_spec_text(tmp_path) + "experiment: caf\xe9\n").encode("latin-1"))
    line = _validate(path)
    assert "not UTF-8" in line and "0xe9" in line and f"line {_spec_text(tmp_path).count(chr(10)) + 1}" in line


@pytest.mark.parametrize("text,key,line", [
    ("name: a\nname: b\n", "'name'", 2),
    ("workload:\n  epochs: 3\n  model: mlp\n  epochs: 5\n", "'epochs'", 4),
    ("budget: {trials: 3, trials: 4}\n", "'trials'", 1),
])
def test_a_key_given_twice_is_refused_naming_it_and_its_line(tmp_path: Path, text: str, key: str,
                                                            line: int) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    msg = _validate(path)
    assert f"line {line}: key {key} is given twice" in msg


def test_deep_nesting_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text("name: x\nworkload: " + "[" * 50_000 + "]" * 50_000 + "\n")
    assert "error:" in _validate(path)


@pytest.mark.parametrize("overrides,words", [
    ({"search.lr": {"low": 1e300, "high": 1e308}}, ["search.lr", f"high must be <= {LR_MAX:g}"]),
    ({"search.lr": {"low": 0.01, "high": 1e4}}, ["search.lr", f"<= {LR_MAX:g}"]),
    ({"workload.weight_decay": 1e300}, ["workload.weight_decay", "must be <= 1000"]),
    ({"workload.width": 10**9}, ["workload.width", "must be <= 65,536"]),
    ({"workload.epochs": 10**9}, ["workload.epochs", "must be <= 100,000"]),
    ({"search.sampler.seed": 2**40}, ["search.sampler.seed", "must be <= 4,294,967,295"]),
    ({"heartbeat_seconds": 10**20}, ["heartbeat_seconds", "must be <="]),
])
def test_numbers_that_would_fail_every_trial_are_refused(tmp_path: Path, overrides: dict, words: list[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(small_spec(tmp_path, **overrides)))
    msg = _validate(path)
    for w in words:
        assert w in msg, msg
    assert not (tmp_path / "optuna.db").exists()
