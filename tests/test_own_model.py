"""A user's model, data set and loss by entry point, on bstune's trainer: found, checked at the boundary (one
line naming the field, exit 2), trained lone and fused (each fused member equal to its lone run)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from torch import nn

from bstune.cli import main
from bstune.errors import BstuneError
from bstune.spec import Workload, load_spec
from bstune.train import TrainConfig, load_dataset, train, train_fused
from bstune.train.func_stacked import why_not_fusable
from tests.conftest import small_spec

pytestmark = pytest.mark.usefixtures("one_thread")

OWN = "tests.own_workload"


def _spec_file(tmp_path: Path, **workload: object) -> Path:
    spec = small_spec(tmp_path, **{f"workload.{k}": v for k, v in workload.items()})
    for key in ("n_train", "width"):
        spec["workload"].pop(key)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_relative_file_entry_resolves_against_the_spec_folder(tmp_path: Path) -> None:
    (tmp_path / "net.py").write_text("import torch\ndef build():\n    return torch.nn.Linear(4, 2)\n")
    spec = load_spec(_spec_file(tmp_path, model="net.py:build", dataset=f"{OWN}:data"))
    assert spec.workload.model == f"{tmp_path.resolve()}/net.py:build"
    assert spec.workload.dataset == f"{OWN}:data"


@pytest.mark.parametrize(("workload", "says"), [
    ({"model": "nowhere.py:build"}, "workload.model: no such file"),
    ({"model": f"{OWN}:no_such"}, "workload.model: ") ,
    ({"model": "no_such_package.mod:build"}, "workload.model: no module named 'no_such_package.mod'"),
    ({"model": "net.py:wrong_width"}, "workload.model: the model's outputs (8, 1) do not fit the loss"),
    ({"model": "net.py:not_a_module"}, "workload.model: "),
    ({"model": "boom.py:build"}, "workload.model: importing "),
    ({"dataset": "net.py:one_split"}, "workload.dataset: "),
    ({"loss": "net.py:per_example"}, "workload.loss: the model's outputs (8, 3) do not fit the loss"),
    ({"trainer": "net.py:no_trainer"}, "workload.trainer: "),
])
def test_a_bad_entry_point_is_one_line_naming_the_field_exit_2(tmp_path: Path, workload: dict, says: str) -> None:
    (tmp_path / "net.py").write_text(
        "import torch\n"
        "def wrong_width():\n    return torch.nn.Linear(13, 1)\n"
        "def not_a_module():\n    return 3\n"
        "def one_split():\n    return [torch.zeros(3, 13)]\n"
        "def per_example(out, y):\n    return torch.nn.functional.cross_entropy(out, y, reduction='none')\n")
    (tmp_path / "boom.py").write_text("raise RuntimeError('broken at import')\n")
    path = _spec_file(tmp_path, **({"model": f"{OWN}:model", "dataset": f"{OWN}:data"} | workload))
    r = CliRunner().invoke(main, ["validate", str(path)])
    line = r.output.strip()
    assert r.exit_code == 2 and "\n" not in line and line.startswith("error: "), r.output
    assert says in line, line
    assert not (tmp_path / "optuna.db").exists()  # nothing created


def test_a_missing_function_is_named_before_what_the_data_would_tell(tmp_path: Path) -> None:
    """The entry points are found before the data is loaded: batch sizes larger than the data set, which
    loading it would find, do not hide a misspelt function."""
    path = _spec_file(tmp_path, model=f"{OWN}:no_such", dataset=f"{OWN}:data")
    spec = yaml.safe_load(path.read_text())
    spec["search"]["batch_sizes"] = [16, 10**6]
    path.write_text(yaml.safe_dump(spec))
    for command in ("validate", "study"):
        r = CliRunner().invoke(main, [command, str(path)])
        assert r.exit_code == 2 and "workload.model: " in r.output and "no_such" in r.output, r.output
        assert r.output.count("\n") == 1


def test_validate_builds_the_users_model_and_says_what_it_runs(tmp_path: Path) -> None:
    path = _spec_file(tmp_path, model=f"{OWN}:model", dataset=f"{OWN}:data", loss=f"{OWN}:smooth_loss")
    r = CliRunner().invoke(main, ["validate", str(path)])
    assert r.exit_code == 0, r.output
    assert f"{OWN}:data/{OWN}:model, loss {OWN}:smooth_loss (140 training examples)" in r.output


def test_a_users_data_set_in_either_form_becomes_tensors() -> None:
    ds = load_dataset(Workload(dataset=f"{OWN}:data"))  # train: a torch Dataset of pairs; val: a pair of tensors
    assert (ds.n_train, ds.input_shape, ds.num_classes) == (140, (13,), 3)
    assert ds.val_x.shape == (38, 13) and ds.train_y.dtype == torch.int64


def test_a_regression_with_its_own_loss_trains_without_accuracy() -> None:
    def data() -> tuple:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(96, 5, generator=g)
        y = x @ torch.arange(1.0, 6.0).unsqueeze(1)
        return (x[:64], y[:64]), (x[64:], y[64:])

    ds = load_dataset(Workload(dataset=data))
    cfg = TrainConfig(batch_size=16, lr=0.02, momentum=0.0, epochs=3, model=lambda: nn.Linear(5, 1),
                      loss=nn.functional.mse_loss, diagnostics_every=2)
    history = train(cfg, ds)
    assert ds.num_classes == 0
    assert history[-1].val_loss < history[0].val_loss
    assert all(h.val_accuracy != h.val_accuracy for h in history)  # NaN: not measured
    assert all(h.grad_norm is not None and h.grad_norm > 0 for h in history)  # the probes ran on a user's loss


def test_fused_members_of_a_users_model_with_batch_norm_and_dropout_equal_their_lone_runs() -> None:
    # float64: equal to the last bits whatever the CPU's kernels; dropout masks are drawn as the lone run draws
    # them, batch-norm running statistics are kept per member (evaluation uses them).
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        ds = load_dataset(Workload(dataset=f"{OWN}:data"))
        points = [(0.1, 0.9, 0.0), (0.03, 0.5, 1e-3), (0.3, 0.0, 0.0)]
        configs = [TrainConfig(batch_size=16, lr=lr, momentum=m, weight_decay=wd, epochs=2, seed=3,
                               model=f"{OWN}:model", diagnostics_every=4) for lr, m, wd in points]
        fused = train_fused(configs, ds)
        for cfg, member in zip(configs, fused, strict=True):
            lone = train(cfg, ds)
            assert member.error is None and len(member.history) == len(lone) == 2
            for a, b in zip(member.history, lone, strict=True):
                assert a.val_loss == pytest.approx(b.val_loss, rel=1e-9, abs=1e-12)
                assert a.train_loss == pytest.approx(b.train_loss, rel=1e-9, abs=1e-12)
                assert a.weight_distance == pytest.approx(b.weight_distance, rel=1e-6)
        assert len({round(m.history[-1].val_loss, 6) for m in fused}) == 3  # the members did differ
    finally:
        torch.set_default_dtype(before)


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(13, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        return h if h.sum() > 0 else -h  # control flow on the weights' output: vmap cannot batch it


def test_a_model_vmap_refuses_is_not_fusable_and_says_why() -> None:
    why = why_not_fusable(_Branchy(), torch.randn(4, 13))
    assert why is not None and "\n" not in why and len(why) < 300
    assert why_not_fusable(nn.Sequential(nn.Linear(13, 8), nn.BatchNorm1d(8), nn.Dropout()), torch.randn(4, 13)) \
        is None


def test_a_user_model_raising_at_build_is_one_bstune_error() -> None:
    def broken() -> nn.Module:
        raise KeyError("no such layer")

    from bstune.train.check import check_model

    with pytest.raises(BstuneError, match=r"^workload.model: building it raised KeyError"):
        check_model(Workload(model=broken, dataset=f"{OWN}:data"), load_dataset(Workload(dataset=f"{OWN}:data")))
