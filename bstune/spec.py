"""The study spec: a YAML file read into typed, validated objects.

Every problem is reported as one line that names the file, the field's path and the fix, e.g.
``studies/x.yaml: search.lr.low: must be > 0, got -1.0 (use a positive learning rate such as 1e-4)``.
Nothing here touches a storage, a tracking store or a data set: validation has no side effects.
"""

from __future__ import annotations

import difflib
import math
import re
import reprlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from bstune import entry, registry
from bstune.errors import BstuneError
from bstune.spec_yaml import Refused, read_yaml

DATASETS = tuple(registry.DATASETS)
MODELS = tuple(registry.MODELS)
OPTIMIZERS = tuple(registry.OPTIMIZERS)
SCHEDULES = ("constant", "cosine", "linear")
SAMPLERS = ("law", "tpe", "random", "qmc", "gp")  # law: bstune.search.law_sampler, pooled across batch sizes
PRUNERS = ("none", "median", "percentile", "hyperband", "dead")
OBJECTIVES = {"val_loss": "minimize", "val_accuracy": "maximize", "train_loss": "minimize"}
HOLD = ("epochs", "steps")
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")

# Upper bounds past which every trial would fail (float32 overflows: lr or weight decay past ~3e38) or never
# end; each far beyond any useful value.
LR_MAX = 1e3
WEIGHT_DECAY_MAX = 1e3
WIDTH_MAX = 65_536
EPOCHS_MAX = 100_000
STEPS_MAX = 10**9
SEED_MAX = 2**32 - 1  # numpy's seeds (Optuna's samplers)
HEARTBEAT_MAX = 86_400

DEFAULT_STORAGE = "sqlite:///mlruns/optuna.db"
DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"


class SpecError(BstuneError):
    """A study spec that cannot be used; the message names the field and the fix."""


@dataclass(frozen=True)
class Workload:
    """What each trial trains: data set, model, optimizer and how long (entry points: docs/own-model.md)."""

    dataset: Any = "digits"  # a built-in's name or an entry point; "" with a trainer of one's own: none
    data_dir: str = "data"
    download: bool = False
    n_train: int | None = None  # use only the first n training examples (None: all)
    val_fraction: float = 0.2  # for data sets without a test split (digits, synthetic)
    augment: bool | None = None  # None: on for cifar10, off otherwise
    model: Any = "mlp"  # a built-in's name or an entry point ("" with a trainer of one's own)
    loss: Any = None  # an entry point: (outputs, targets) -> mean loss; None: cross-entropy
    trainer: Any = None  # an entry point: FUNC(trial) trains as the user likes (bstune.own_loop)
    width: int = 128
    optimizer: str = "sgd"
    epochs: int = 12
    hold: str = "epochs"  # compare trials at equal epochs, or at equal optimizer steps
    steps: int | None = None  # with hold: steps, the optimizer steps every trial takes
    lr_schedule: str = "cosine"
    warmup_epochs: float = 0.0
    weight_decay: float = 0.0
    accumulation_steps: int = 1
    seed: int = 0
    compile: str = "off"  # off | default | reduce-overhead (torch.compile with CUDA graphs: small batches)
    diagnostics_every: int = 16  # noise scale every this-many-th step, gradient statistics too (0: all off)
    grad_histogram_epochs: tuple[int | str, ...] = (1, "last")  # epochs whose gradient histograms are saved


@dataclass(frozen=True)
class Sampler:
    name: str = "law"
    seed: int | None = 0
    n_startup_trials: int = 2  # per batch size: random trials before the model-based sampler takes over


@dataclass(frozen=True)
class Pruner:
    name: str = "median"  # none, median, percentile, hyperband, dead (only trials at chance level after the warm-up)
    n_startup_trials: int = 3  # completed trials of the same batch size before pruning starts
    n_warmup_epochs: int = 4  # never prune before this many epochs
    percentile: float = 75.0  # percentile: keep the best 75% of the batch size's trials at each epoch
    min_resource: int = 1  # hyperband: epochs of the first rung
    reduction_factor: int = 3  # hyperband


@dataclass(frozen=True)
class Search:
    """The joint space: batch sizes x log-uniform lr x momentum (searched on log(1 - m))."""

    batch_sizes: tuple[int, ...] = (16, 32, 64, 128, 256, 512)
    lr: tuple[float, float] = (1e-3, 8.0)
    momentum: tuple[float, float] = (0.0, 0.98)
    objective: str = "val_loss"
    sampler: Sampler = field(default_factory=Sampler)
    pruner: Pruner = field(default_factory=Pruner)

    @property
    def direction(self) -> str:
        return OBJECTIVES[self.objective]


@dataclass(frozen=True)
class Budget:
    """A study stops when any limit is spent. None means no limit of that kind."""

    trials: int | None = None
    examples: float | None = None
    seconds: float | None = None


@dataclass(frozen=True)
class Execution:
    """How trials run (not what they measure: free to change when a study resumes)."""

    fuse: int | None = None  # trials of one batch size trained together as one stacked model; None: by device


@dataclass(frozen=True)
class StudySpec:
    name: str
    workload: Workload = field(default_factory=Workload)
    search: Search = field(default_factory=Search)
    budget: Budget = field(default_factory=Budget)
    execution: Execution = field(default_factory=Execution)
    storage: str = DEFAULT_STORAGE
    tracking_uri: str = DEFAULT_TRACKING_URI
    experiment: str = "bstune"
    heartbeat_seconds: int = 10  # a trial whose worker is silent for 2x this is marked failed and retried
    source: str = ""  # the file it was read from, for messages

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain data (what `load_spec` would read back), for artifacts and reports."""
        d = asdict(self)
        d.pop("source")
        d["workload"].update({k: entry.name_of(d["workload"][k]) for k in ("dataset", "model", "loss", "trainer")})
        d["search"]["batch_sizes"] = list(self.search.batch_sizes)
        d["workload"]["grad_histogram_epochs"] = list(self.workload.grad_histogram_epochs)
        d["search"]["lr"] = {"low": self.search.lr[0], "high": self.search.lr[1]}
        d["search"]["momentum"] = {"low": self.search.momentum[0], "high": self.search.momentum[1]}
        return d

    def with_overrides(self, **changes: Any) -> StudySpec:
        return replace(self, **changes)


# --------------------------------------------------------------------------------------------------
# Reading


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate a study spec; raise SpecError naming the first bad field."""
    p = Path(path)
    src = str(path)
    if not p.exists():
        raise SpecError(f"{src}: no such file (give the path of a study spec, e.g. studies/digits.yaml)")
    if p.is_dir():
        raise SpecError(f"{src}: is a directory, not a study spec file")
    try:
        data = read_yaml(p)
    except Refused as e:
        raise SpecError(f"{src}: {e}") from None
    except OSError as e:
        raise SpecError(f"{src}: cannot read it ({e.strerror})") from None
    return parse_spec(data, source=src, default_name=p.stem)


def parse_spec(data: Any, source: str = "<spec>", default_name: str = "study") -> StudySpec:
    """Validate already-parsed YAML data into a StudySpec."""
    if data is None:
        data = {}
    root = _Section(data, "", source)
    name = root.str("name", default_name)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        root.fail("name", f"must be letters, digits, '_', '.' or '-', got {name!r}")
    workload = _workload(root.section("workload"), Path(source).parent if source != "<spec>" else None)
    search = _search(root.section("search"), workload)
    budget = _budget(root.section("budget"))
    execution = _execution(root.section("execution"))
    spec = StudySpec(
        name=name,
        workload=workload,
        search=search,
        budget=budget,
        execution=execution,
        storage=root.str("storage", DEFAULT_STORAGE),
        tracking_uri=root.str("tracking_uri", DEFAULT_TRACKING_URI),
        experiment=root.str("experiment", "bstune"),
        heartbeat_seconds=root.int("heartbeat_seconds", 10, minimum=1, maximum=HEARTBEAT_MAX),
        source=source,
    )
    root.finish()
    return spec


def _workload(s: _Section, folder: Path | None) -> Workload:
    d = Workload()
    own = (trainer := s.entry("trainer", None, (), folder)) is not None  # then data set and model are optional
    w = Workload(
        dataset=s.entry("dataset", "" if own else d.dataset, DATASETS, folder),
        model=s.entry("model", "" if own else d.model, MODELS, folder),
        loss=s.entry("loss", None, (), folder),
        trainer=trainer,
        data_dir=s.str("data_dir", d.data_dir),
        download=s.bool("download", d.download),
        n_train=s.int("n_train", None, minimum=1),
        val_fraction=s.float("val_fraction", d.val_fraction, minimum=0.01, maximum=0.9),
        augment=s.bool("augment", None),
        width=s.int("width", d.width, minimum=1, maximum=WIDTH_MAX),
        optimizer=s.choice("optimizer", d.optimizer, OPTIMIZERS),
        epochs=s.int("epochs", d.epochs, minimum=1, maximum=EPOCHS_MAX),
        hold=s.choice("hold", d.hold, HOLD),
        steps=s.int("steps", None, minimum=1, maximum=STEPS_MAX),
        lr_schedule=s.choice("lr_schedule", d.lr_schedule, SCHEDULES),
        warmup_epochs=s.float("warmup_epochs", d.warmup_epochs, minimum=0.0),
        weight_decay=s.float("weight_decay", d.weight_decay, minimum=0.0, maximum=WEIGHT_DECAY_MAX),
        accumulation_steps=s.int("accumulation_steps", d.accumulation_steps, minimum=1),
        seed=s.int("seed", d.seed, minimum=0, maximum=SEED_MAX),
        compile=_compile_mode(s),
        diagnostics_every=s.int("diagnostics_every", d.diagnostics_every, minimum=0),
        grad_histogram_epochs=_histogram_epochs(s, d.grad_histogram_epochs),
    )
    late = [e for e in w.grad_histogram_epochs if e != "last" and e > w.epochs]
    if late and w.hold == "epochs":
        s.fail("grad_histogram_epochs", f"epoch {late[0]} is after the last epoch ({w.epochs}); use 'last'")
    if w.hold == "steps" and w.steps is None:
        s.fail("steps", "is required with hold: steps (the optimizer steps every trial takes, e.g. 500)")
    if w.warmup_epochs >= w.epochs and w.hold == "epochs":
        s.fail("warmup_epochs", f"must be less than epochs ({w.epochs}), got {w.warmup_epochs}")
    s.finish()
    return w


def _histogram_epochs(s: _Section, default: tuple[int | str, ...]) -> tuple[int | str, ...]:
    raw = s.raw("grad_histogram_epochs", default)
    if not isinstance(raw, list | tuple):
        raw = [raw]
    for v in raw:
        if v != "last" and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            s.fail("grad_histogram_epochs", f"must list epoch numbers (>= 1) or 'last', got {_show(v)} "
                   f"(e.g. [1, last]; [] for none)")
    return tuple(dict.fromkeys(raw))


def _compile_mode(s: _Section) -> str:
    v = s.raw("compile", "off")
    if isinstance(v, bool):  # compile: true / false
        return "default" if v else "off"
    return s.choice("compile", "off", COMPILE_MODES)


def _search(s: _Section, workload: Workload) -> Search:
    d = Search()
    batch_sizes = _batch_sizes(s, d.batch_sizes)
    lr = s.range("lr", d.lr, positive=True)
    if lr[1] > LR_MAX:
        s.fail("lr", f"high must be <= {LR_MAX:g}, got {lr[1]:g} (every trial would diverge or overflow; "
               f"e.g. high: 10)")
    momentum = s.range("momentum", d.momentum, positive=False)
    if not (0.0 <= momentum[0] and momentum[1] < 1.0):
        s.fail("momentum", f"must lie in [0, 1), got [{momentum[0]}, {momentum[1]}] (e.g. low: 0.0, high: 0.99)")
    sampler_sec = s.section("sampler", shorthand="name")
    sampler = Sampler(
        name=sampler_sec.choice("name", d.sampler.name, SAMPLERS),
        seed=sampler_sec.int("seed", d.sampler.seed, minimum=0, maximum=SEED_MAX),
        n_startup_trials=sampler_sec.int("n_startup_trials", d.sampler.n_startup_trials, minimum=0),
    )
    sampler_sec.finish()
    pruner_sec = s.section("pruner", shorthand="name")
    pruner = Pruner(
        name=pruner_sec.choice("name", d.pruner.name, PRUNERS),
        n_startup_trials=pruner_sec.int("n_startup_trials", d.pruner.n_startup_trials, minimum=0),
        n_warmup_epochs=pruner_sec.int("n_warmup_epochs", d.pruner.n_warmup_epochs, minimum=0),
        percentile=pruner_sec.float("percentile", d.pruner.percentile, minimum=0.0, maximum=100.0),
        min_resource=pruner_sec.int("min_resource", d.pruner.min_resource, minimum=1),
        reduction_factor=pruner_sec.int("reduction_factor", d.pruner.reduction_factor, minimum=2),
    )
    pruner_sec.finish()
    search = Search(
        batch_sizes=batch_sizes,
        lr=lr,
        momentum=momentum,
        objective=s.choice("objective", d.objective, tuple(OBJECTIVES)),
        sampler=sampler,
        pruner=pruner,
    )
    s.finish()
    return search


def _batch_sizes(s: _Section, default: tuple[int, ...]) -> tuple[int, ...]:
    raw = s.raw("batch_sizes", None)
    path = s.path_of("batch_sizes")
    if raw is None:
        return default
    if isinstance(raw, list):
        if not raw:
            s.fail("batch_sizes", "is empty; list at least one batch size, e.g. [32, 64, 128]")
        sizes = []
        for i, v in enumerate(raw):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise SpecError(f"{s.source}: {path}[{i}]: batch sizes must be positive integers, got {v!r}")
            sizes.append(v)
        if len(set(sizes)) != len(sizes):
            s.fail("batch_sizes", f"lists a batch size twice: {sizes}")
        return tuple(sorted(sizes))
    if isinstance(raw, dict):
        sub = _Section(raw, path, s.source)
        lo = sub.int("min", None, minimum=1)
        hi = sub.int("max", None, minimum=1)
        sub.finish()
        if lo is None or hi is None:
            s.fail("batch_sizes", "needs both min and max, e.g. {min: 16, max: 512} (powers of two between them)")
        if lo > hi:
            s.fail("batch_sizes", f"min ({lo}) is larger than max ({hi}); swap them")
        sizes = tuple(2**k for k in range(0, 31) if lo <= 2**k <= hi)
        if not sizes:
            s.fail("batch_sizes", f"no power of two lies between {lo} and {hi}; widen the range or list sizes")
        return sizes
    s.fail("batch_sizes", f"must be a list of integers or {{min: M, max: N}}, got {raw!r}")
    raise AssertionError  # unreachable


def _execution(s: _Section) -> Execution:
    raw = s.raw("fuse", "auto")
    if isinstance(raw, str) and raw != "auto":
        s.fail("fuse", f"must be an integer >= 1 or auto, got {_show(raw)}")
    fuse = None if raw == "auto" else s.int("fuse", None, minimum=1)
    s.finish()
    return Execution(fuse=fuse)


def _budget(s: _Section) -> Budget:
    b = Budget(
        trials=s.int("trials", None, minimum=1),
        examples=s.float("examples", None, minimum=1.0),
        seconds=s.float("seconds", None, minimum=0.001),
    )
    s.finish()
    if b.trials is None and b.examples is None and b.seconds is None:
        s.fail("", "sets no limit; give at least one of trials, examples or seconds (e.g. trials: 24)")
    return b


# --------------------------------------------------------------------------------------------------
# A small validator: reads one mapping, remembers which keys it used, and names every problem.


class _Section:
    def __init__(self, data: Any, path: str, source: str, shorthand: str | None = None) -> None:
        if shorthand is not None and isinstance(data, str):
            data = {shorthand: data}
        if not isinstance(data, dict):
            where = path or "the file"
            raise SpecError(f"{source}: {where}: must be a mapping of key: value, got {_show(data)}")
        self.data = data
        self.path = path
        self.source = source
        self.used: set[str] = set()

    def path_of(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def fail(self, key: str, problem: str) -> None:
        where = self.path_of(key) if key else (self.path or "the file")
        raise SpecError(f"{self.source}: {where}: {problem}")

    def raw(self, key: str, default: Any) -> Any:
        self.used.add(key)
        value = self.data.get(key, default)
        return default if value is None else value

    def section(self, key: str, shorthand: str | None = None) -> _Section:
        return _Section(self.raw(key, {}), self.path_of(key), self.source, shorthand)

    def str(self, key: str, default: str) -> str:
        v = self.raw(key, default)
        if not isinstance(v, str) or not v:
            self.fail(key, f"must be a non-empty string, got {_show(v)}")
        return v

    def bool(self, key: str, default: bool | None) -> bool | None:
        v = self.raw(key, default)
        if v is not None and not isinstance(v, bool):
            self.fail(key, f"must be true or false, got {_show(v)}")
        return v

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        v = self.raw(key, default)
        if v not in choices:
            hint = _did_you_mean(str(v), choices)
            self.fail(key, f"unknown value {_show(v)}{hint}; choose one of {', '.join(choices)}")
        return v

    def entry(self, key: str, default: Any, choices: tuple[str, ...], folder: Path | None) -> Any:
        """A built-in's name (one of `choices`), FILE.py:FUNC, package.module:FUNC, or a callable (bstune.entry)."""
        v = self.raw(key, default)
        if v is None or callable(v) or v == default == "":
            return v
        value, problem = entry.checked(v, choices, folder)
        return value if not problem else self.fail(key, problem)

    def int(self, key: str, default: int | None, minimum: int | None = None,
            maximum: int | None = None) -> int | None:
        v = self.raw(key, default)
        if v is None:
            return None
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            self.fail(key, f"must be an integer, got {_show(v)}")
        if minimum is not None and v < minimum:
            self.fail(key, f"must be >= {minimum}, got {v}")
        if maximum is not None and v > maximum:
            self.fail(key, f"must be <= {maximum:,}, got {v:,}")
        return v

    def float(
        self, key: str, default: float | None, minimum: float | None = None, maximum: float | None = None
    ) -> float | None:
        v = _number(self.raw(key, default))
        if v is None:
            if key in self.data and self.data[key] is not None:
                self.fail(key, f"must be a number, got {_show(self.data[key])}")
            return None
        if not math.isfinite(v):
            self.fail(key, f"must be finite, got {v}")
        if minimum is not None and v < minimum:
            self.fail(key, f"must be >= {minimum}, got {v}")
        if maximum is not None and v > maximum:
            self.fail(key, f"must be <= {maximum:g}, got {v:g}")
        return v

    def range(self, key: str, default: tuple[float, float], positive: bool) -> tuple[float, float]:
        raw = self.raw(key, None)
        if raw is None:
            return default
        if isinstance(raw, list) and len(raw) == 2:
            raw = {"low": raw[0], "high": raw[1]}
        if not isinstance(raw, dict):
            n = _number(raw)
            if n is None:
                self.fail(key, f"must be {{low: A, high: B}} or a single number, got {_show(raw)}")
            raw = {"low": n, "high": n}
        sub = _Section(raw, self.path_of(key), self.source)
        lo = sub.float("low", None)
        hi = sub.float("high", None)
        sub.finish()
        if lo is None or hi is None:
            self.fail(key, "needs both low and high, e.g. {low: 0.001, high: 1.0}")
        if positive and lo <= 0:
            sub.fail("low", f"must be > 0, got {lo} (the search is log-uniform; use e.g. 1e-4)")
        if lo > hi:
            self.fail(key, f"low ({lo}) is larger than high ({hi}); swap them")
        return (lo, hi)

    def finish(self) -> None:
        """Fail on the first key that nothing read (a typo, usually), with a did-you-mean."""
        for key in self.data:
            if key not in self.used:
                hint = _did_you_mean(str(key), sorted(self.used))
                where = self.path_of(str(key))
                known = ", ".join(sorted(self.used))
                raise SpecError(f"{self.source}: {where}: unknown key{hint}; known keys here: {known}")


def _number(v: Any) -> float | None:
    # YAML 1.1 reads "1e-3" (no dot) as a string; accept it as the number it obviously is.
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, int | float):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return None
    return None


def _did_you_mean(word: str, options: Any) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


_REPR = reprlib.Repr()  # bounded, however large or deep the value
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 60, 60


def _show(v: Any) -> str:
    text = _REPR.repr(v)
    return text if len(text) <= 60 else text[:57] + "..."
