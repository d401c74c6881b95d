"""examples/: each spec validates (fast) and runs as a short study (slow), as a user would run it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

import bstune
from bstune.cli import main
from bstune.spec import parse_spec
from bstune.trials import State
from tests.cifar_archive import write_cifar10

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SPECS = {"mnist1d": EXAMPLES / "mnist1d" / "mnist1d.yaml", "torchvision": EXAMPLES / "torchvision" / "resnet18.yaml",
         "own_loop": EXAMPLES / "own_loop" / "digits_loop.yaml"}


def _example(name: str, tmp_path: Path, **changes: Any) -> dict:
    """The example's spec as data, its stores (and CIFAR-10 data) under tmp_path, `changes` per section."""
    if name == "mnist1d":
        pytest.importorskip("mnist1d", reason="the MNIST-1D example needs `pip install mnist1d`")
    data = yaml.safe_load(SPECS[name].read_text())
    data |= {"storage": f"sqlite:///{tmp_path}/optuna.db", "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}
    if name == "torchvision":
        write_cifar10(tmp_path, per_batch=32, n_test=24)  # 160 training images
        data["workload"] |= {"data_dir": str(tmp_path), "n_train": None}
    for section, values in changes.items():
        data[section] = {**data.get(section, {}), **values}
    return data


@pytest.mark.parametrize("name", [pytest.param("mnist1d", marks=pytest.mark.slow),  # generating it: seconds
                                  "torchvision", "own_loop"])
def test_each_example_validates(name: str, tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    spec = _example(name, tmp_path)
    for key in ("model", "dataset", "trainer"):  # the entries' files, where the example keeps them
        value = spec["workload"].get(key)
        if isinstance(value, str) and ".py:" in value:
            spec["workload"][key] = str(SPECS[name].parent / value)
    path.write_text(yaml.safe_dump(spec))
    r = CliRunner().invoke(main, ["validate", str(path)])
    assert r.exit_code == 0 and "spec.yaml: ok" in r.output and f"study {spec['name']}:" in r.output, r.output


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SPECS))
def test_each_example_runs_as_a_short_study(name: str, tmp_path: Path) -> None:
    trials = 2 if name == "torchvision" else 4  # ResNet-18 on a CPU: one trial per batch size, one epoch
    short = {"workload": {"epochs": 1 if name == "torchvision" else 2}, "budget": {"trials": trials},
             "search": {"batch_sizes": [16, 32], "pruner": "none", "lr": {"low": 0.003, "high": 0.05}}}
    spec = parse_spec(_example(name, tmp_path, **short), source=str(SPECS[name]))
    result = bstune.run_study(spec)
    assert result.spent.trials == trials and not result.interrupted
    states = [r.state for r in result.table.records]
    assert set(states) <= {State.COMPLETE, State.DIVERGED}, [r.reason for r in result.table.records]  # no failure
    assert all(r.value == r.value for r in result.table.completed()) and State.COMPLETE in states
