"""Entry points: ``FILE.py:FUNC`` or ``package.module:FUNC`` in a spec, or a Python callable, found and called.

Built-ins are registered in this same form (`bstune.registry`), so a user's model and bstune's are found the
same way. Every problem is a BstuneError naming the spec field and the fix: a missing file or module, a
module that raises on import, a missing function.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bstune.errors import BstuneError

_LOADED: dict[str, Any] = {}  # file path -> its module, so a file runs once per process


def is_entry(value: object) -> bool:
    """Whether a spec value names an entry point (``X.py:F``, ``pkg.mod:F``) or is a callable."""
    return callable(value) or (isinstance(value, str) and ":" in value)


def split(value: str) -> tuple[str, str]:
    """(file or module, function) of ``X.py:F`` / ``pkg.mod:F``; the file part may itself hold a ':' (C:\\)."""
    where, _, func = value.rpartition(":")
    return where, func


def resolve_path(value: str, folder: Path | None) -> str:
    """The entry with a relative FILE.py made absolute against `folder` (the spec file's)."""
    where, func = split(value)
    if not where.endswith(".py") or folder is None or Path(where).is_absolute():
        return value
    return f"{(folder / where).resolve()}:{func}"


def checked(value: Any, choices: tuple[str, ...], folder: Path | None) -> tuple[Any, str]:
    """(the value, "") for a built-in's name (one of `choices`); (the entry with a relative FILE made absolute,
    "") for a well-formed entry point whose file exists; else (value, the problem in words)."""
    if not isinstance(value, str):
        return value, f"must be a name or FILE.py:FUNC, got {type(value).__name__}"
    if ":" not in value:
        if value in choices:
            return value, ""
        close = difflib.get_close_matches(value, choices, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        names = f"{', '.join(choices)}, or " if choices else ""
        return value, f"unknown value {value[:60]!r}{hint}; give {names}FILE.py:FUNC or package.module:FUNC"
    where, func = split(value)
    if not where or not func.isidentifier():
        return value, f"{value!r} is not an entry point; give FILE.py:FUNC or package.module:FUNC"
    value = resolve_path(value, folder)
    where = split(value)[0]
    if where.endswith(".py") and not Path(where).is_file():
        return value, f"no such file {where} (a relative FILE is read from the spec file's folder)"
    return value, ""


def name_of(value: object) -> str | None:
    """How an entry is shown and stored: the string itself, or ``python:module.qualname`` of a callable."""
    if value is None or isinstance(value, str):
        return value
    module = getattr(value, "__module__", None) or "?"
    return f"python:{module}.{getattr(value, '__qualname__', type(value).__name__)}"


def short(value: object) -> str | None:
    """An entry as a line shows it: a file by its name (``net.py:build``), anything else as `name_of`."""
    name = name_of(value)
    if isinstance(value, str) and ":" in value and split(value)[0].endswith(".py"):
        return f"{Path(split(value)[0]).name}:{split(value)[1]}"
    return name


def load(value: object, field: str) -> Callable[..., Any]:
    """The callable an entry names. BstuneError naming `field` (e.g. workload.model) if it cannot be had."""
    if callable(value):
        return value
    if not isinstance(value, str) or ":" not in value:
        raise BstuneError(f"{field}: {value!r} is not an entry point; give FILE.py:FUNC or package.module:FUNC")
    where, func = split(value)
    module = _module(where, field)
    fn = getattr(module, func, None)
    if fn is None or not callable(fn):
        defined = sorted(n for n, v in vars(module).items() if inspect.isfunction(v) and not n.startswith("_"))
        known = f" (it defines {', '.join(defined[:8])})" if defined else ""
        raise BstuneError(f"{field}: {where} has no function {func!r}{known}; fix the name after ':'")
    return fn


def _module(where: str, field: str) -> Any:
    if where.endswith(".py"):
        return _file_module(where, field)
    try:
        return importlib.import_module(where)
    except ModuleNotFoundError as e:
        if e.name and where.startswith(e.name):
            raise BstuneError(f"{field}: no module named {where!r}; give FILE.py:FUNC or an importable "
                              f"package.module:FUNC") from None
        raise BstuneError(f"{field}: importing {where} raised {_said(e)}; fix the module") from None
    except Exception as e:  # noqa: BLE001 - whatever the user's module raises, named in one line
        raise BstuneError(f"{field}: importing {where} raised {_said(e)}; fix the module") from None


def _file_module(where: str, field: str) -> Any:
    path = Path(where).resolve()
    key = str(path)
    if key in _LOADED:
        return _LOADED[key]
    if not path.is_file():
        raise BstuneError(f"{field}: no such file {where}; a relative FILE is read from the spec file's folder")
    name = f"bstune_user_{path.stem}_{hashlib.sha1(key.encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)  # as `python FILE.py` would: the file may import its neighbours
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - whatever the user's file raises, named in one line
        del sys.modules[name]
        raise BstuneError(f"{field}: importing {where} raised {_said(e)}; fix the file") from None
    _LOADED[key] = module
    return module


def call(fn: Callable[..., Any], available: dict[str, Any]) -> Any:
    """Call `fn` with the keywords it names among `available` (a user's FUNC() names none)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return fn()
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return fn(**available)
    return fn(**{k: v for k, v in available.items() if k in params})


def _said(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
