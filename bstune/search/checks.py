"""Everything that can be wrong with a study's input, checked before anything is created.

`check_input` runs before every study (and every worker); `validate` is `bstune validate`: the same checks
and the stores' too, without training or creating anything, and the spec summarised in a few lines.
"""

from __future__ import annotations

from bstune import entry
from bstune.errors import BstuneError
from bstune.spec import StudySpec
from bstune.stores import check_storage
from bstune.tracking import check_tracking_uri
from bstune.train import CIFAR10_TRAIN, Dataset, load_dataset, needs_download
from bstune.train.check import check_model


def validate(spec: StudySpec) -> list[str]:
    """Check the spec's data (loaded, not trained on) and stores (nothing created in them); the lines that
    describe what the study would run. Raises BstuneError naming the first problem."""
    s, w, b = spec.search, spec.workload, spec.budget
    if needs_download(w):
        n_train = min(CIFAR10_TRAIN, w.n_train or CIFAR10_TRAIN)
        check_batch_sizes(spec, n_train)
        data_line = f"{w.dataset}/{w.model} ({n_train} training examples, downloaded into {w.data_dir}/ first)"
    else:
        n_train = check_input(spec).n_train
        data_line = _what(spec, n_train)
    check_storage(spec.storage)
    check_tracking_uri(spec.tracking_uri)
    limits = [f"{k} {v:,.0f}" if k != "seconds" else f"{k} {v:g}"
              for k, v in (("trials", b.trials), ("examples", b.examples), ("seconds", b.seconds)) if v is not None]
    lines = [f"study {spec.name}: {data_line}, {w.optimizer}, {w.epochs} epochs, objective {s.objective}",
             f"batch sizes {list(s.batch_sizes)}, lr {s.lr[0]:g}..{s.lr[1]:g}, momentum {_range(s.momentum)}, "
             f"sampler {s.sampler.name}, pruner {s.pruner.name}",
             f"budget: {', '.join(limits) or 'none'}"]
    if len(s.batch_sizes) < 2:
        lines.append("note: one batch size tunes lr and momentum there; `bstune analyze` needs 2 or more batch "
                     "sizes to fit how lr* moves with B (5 or more to tell its forms apart)")
    return lines


def _what(spec: StudySpec, n_train: int) -> str:
    w = spec.workload
    if w.trainer is not None:
        data = f", data {entry.short(w.dataset)} ({n_train} training examples)" if n_train else ""
        return f"trainer {entry.short(w.trainer)}{data}"
    loss = f", loss {entry.short(w.loss)}" if w.loss is not None else ""
    return f"{entry.short(w.dataset)}/{entry.short(w.model)}{loss} ({n_train} training examples)"


def _range(r: tuple[float, float]) -> str:
    return f"{r[0]:g} (held)" if r[0] == r[1] else f"{r[0]:g}..{r[1]:g}"


def check_input(spec: StudySpec, data: Dataset | None = None) -> Dataset:
    """Fail with one line if the spec's data or batch sizes cannot be trained on; returns the data (loaded
    unless given). Creates nothing."""
    if data is None:
        check_entries(spec)
        check_batch_sizes(spec, None)  # before a long load
        try:
            data = load_dataset(spec.workload)
        except BstuneError as e:
            raise BstuneError(f"{_where(spec)}{e}") from None
    check_batch_sizes(spec, data.n_train)
    check_workload(spec, data)
    return data


def check_entries(spec: StudySpec) -> None:
    """Every function of the user's the workload names can be imported (before its data is loaded, and before
    anything that loading would tell)."""
    for name in ("dataset", "model", "loss", "trainer"):
        value = getattr(spec.workload, name)
        if value is not None and not _builtin(value):
            try:
                entry.load(value, f"workload.{name}")
            except BstuneError as e:
                raise BstuneError(f"{_where(spec)}{e}") from None


def check_workload(spec: StudySpec, data: Dataset) -> None:
    """A user's model or loss: built and one batch pushed through it (`bstune validate` too); the objective
    fits the targets."""
    w = spec.workload
    if spec.search.objective == "val_accuracy" and data.n_train and not data.num_classes:
        raise BstuneError(f"{_where(spec)}search.objective: val_accuracy needs class targets (integers) and "
                          f"{entry.name_of(w.dataset)} has others; use val_loss")
    if w.trainer is not None:
        try:
            entry.load(w.trainer, "workload.trainer")
        except BstuneError as e:
            raise BstuneError(f"{_where(spec)}{e}") from None
    elif (not _builtin(w.model) or w.loss is not None or not _builtin(w.dataset)):
        try:
            check_model(w, data)
        except BstuneError as e:
            raise BstuneError(f"{_where(spec)}{e}") from None


def _builtin(value: object) -> bool:
    return isinstance(value, str) and ":" not in value


def check_batch_sizes(spec: StudySpec, n_train: int | None) -> None:
    """Fail with one line if a batch size cannot be trained on: not divisible by the accumulation steps, or
    (``n_train`` given) larger than the training set."""
    sizes, accumulation = spec.search.batch_sizes, spec.workload.accumulation_steps
    if accumulation > 1 and (bad := [b for b in sizes if b % accumulation]):
        raise BstuneError(f"{_where(spec)}search.batch_sizes: {bad} not divisible by "
                          f"workload.accumulation_steps ({accumulation})")
    if n_train and (bad := [b for b in sizes if b > n_train]):  # 0: no data set of bstune's (a trainer's own)
        # Such a batch is the whole training set: each of them would run the same full-batch training.
        raise BstuneError(f"{_where(spec)}search.batch_sizes: {bad} larger than the training set ({n_train} "
                          f"examples of {spec.workload.dataset}); drop them, or use at most {n_train}")


def _where(spec: StudySpec) -> str:
    return f"{spec.source}: " if spec.source else ""


