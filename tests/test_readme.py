"""The README is a user's page: its spec block is studies/digits.yaml and its table of fields holds spec.py's
defaults, so neither can drift from the code."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import yaml

from bstune.spec import StudySpec, parse_spec

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
_ROW = re.compile(r"^\| `([a-z_.]+)` \| (`[^`]*`|[^|]+?) \|", re.M)


def _fields(cls: type, prefix: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(cls):
        if f.name == "source":
            continue
        sub = f.default_factory if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
        if sub is not None and dataclasses.is_dataclass(sub):
            out += _fields(sub, f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def _nested(path: str, value: object) -> dict:
    node: dict = {}
    top = node
    *parents, last = path.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return top


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def test_the_spec_block_is_the_default_study_verbatim() -> None:
    digits = (ROOT / "studies" / "digits.yaml").read_text()
    assert f"```yaml\n{digits.rstrip()}\n```" in README


def test_the_table_of_fields_holds_every_field_with_spec_py_default() -> None:
    rows = dict(_ROW.findall(README))
    assert set(_fields(StudySpec)) <= set(rows), set(_fields(StudySpec)) - set(rows)
    checked = 0
    for path, cell in rows.items():
        if not cell.startswith("`"):
            continue  # said in words (the study's name is the file's)
        # a spec must set some budget: another kind than the one checked
        base = {"budget": {"seconds": 1.0} if path == "budget.trials" else {"trials": 1}}
        written = parse_spec(_merge(base, _nested(path, yaml.safe_load(cell.strip("`")))), default_name="x")
        assert written == parse_spec(base, default_name="x"), f"README says {path} defaults to {cell}"
        checked += 1
    assert checked >= 40


def test_ci_runs_exactly_the_readme_test_commands() -> None:
    blocks = re.findall(r"```bash\n(.*?)\n```", README, re.S)
    tests = [b for b in blocks if "pytest" in b]
    ci = (ROOT / ".ci" / "run").read_text()
    assert len(tests) == 2
    for command in tests:
        assert command in ci
