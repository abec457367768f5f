"""Which task a name means: the shipped families, and a researcher's own from a file or module.

A task *spec* is what a user types after `--task`:

- a shipped name (`sine`, `square`, `digits`, ...; `nos evolve --list-tasks` lists them);
- `path/to/file.py:FACTORY` -- the file is imported and `FACTORY()` must return a `TaskFamily`;
- `package.module:FACTORY` -- the same for an importable module.

A user's code runs only because the user named it on the command line (`allow_code=True`): a spec
read back from a database is resolved only when it is a shipped name, or when the user names the
same file again (`nos evolve --resume NAME --task FILE.py:FACTORY`), and its identity is checked
against the stored one. Every failure is one line (`TaskError`).
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .api import TaskFamily


class TaskError(ValueError):
    """A task spec that cannot be resolved (one line for the user)."""


def _waves(wave: str) -> Callable[[Mapping[str, Any]], TaskFamily]:
    def make(overrides: Mapping[str, Any]) -> TaskFamily:
        from .sine import SineConfig, WaveFamily

        return WaveFamily(SineConfig(**{**overrides, "wave": wave}))

    return make


def _supervised(name: str) -> Callable[[Mapping[str, Any]], TaskFamily]:
    def make(overrides: Mapping[str, Any]) -> TaskFamily:
        from . import supervised

        return getattr(supervised, name)()

    return make


def _functions(name: str) -> Callable[[Mapping[str, Any]], TaskFamily]:
    def make(overrides: Mapping[str, Any]) -> TaskFamily:
        from . import functions

        return getattr(functions, name)()

    return make


# name -> factory(wave overrides); the wave families share the sine task's knobs (`--sine-width`, ...)
SHIPPED: dict[str, Callable[[Mapping[str, Any]], TaskFamily]] = {
    "sine": _waves("sine"),
    "square": _waves("square"),
    "sawtooth": _waves("sawtooth"),
    "triangle": _waves("triangle"),
    "damped": _waves("damped"),
    "digits": _supervised("digits"),
    "teacher_student": _supervised("teacher_student"),
    "rosenbrock": _functions("rosenbrock"),
    "quadratic": _functions("quadratic"),
}
WAVES = ("sine", "square", "sawtooth", "triangle", "damped")

_CODE_SPEC = re.compile(r"^(?P<target>[^:]+):(?P<factory>[A-Za-z_][A-Za-z0-9_]*)$")
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def is_shipped(spec: str) -> bool:
    return spec in SHIPPED


def is_code(spec: str) -> bool:
    """Does the spec name user code (a file or module and a factory)?"""
    return _CODE_SPEC.match(spec) is not None


def check_spec(spec: str) -> str:
    """The spec if it is well formed (a shipped name or TARGET:FACTORY); TaskError otherwise."""
    if is_shipped(spec) or is_code(spec):
        return spec
    raise TaskError(f"unknown task {spec!r}: choose from {', '.join(SHIPPED)}, or give FILE.py:FACTORY "
                    "or module:FACTORY")


# families of user code named in this process (on its command line, or sent by the coordinator to a
# Dask worker): spec -> family, so that the rest of the process resolves them without importing again
_NAMED: dict[str, TaskFamily] = {}


def resolve(spec: str, overrides: Mapping[str, Any] | None = None, *, allow_code: bool = False) -> TaskFamily:
    """The family a spec names. `overrides`: the sine task's knobs (width, pretrain steps), applied to
    the wave families. User code is imported only with `allow_code` (the user typed the spec), and
    remembered for the rest of the process."""
    check_spec(spec)
    if is_shipped(spec):
        return SHIPPED[spec](dict(overrides or {}))
    if spec in _NAMED:
        return _NAMED[spec]
    if not allow_code:
        raise TaskError(f"task {spec!r} is user code; name it on the command line again (--task {spec})")
    _NAMED[spec] = family = _load(spec)
    return family


def named(identity: str | None = None) -> list[TaskFamily]:
    """The families of user code named in this process (with `identity`: only those that have it).
    A resumed run finds its task by identity, whatever path the user typed this time."""
    return [f for f in _NAMED.values() if identity is None or f.identity() == identity]


def _load(spec: str) -> TaskFamily:
    m = _CODE_SPEC.match(spec)
    assert m is not None
    target, factory_name = m.group("target"), m.group("factory")
    if target.endswith(".py") or "/" in target or "\\" in target:
        module = _import_file(Path(target))
    elif _MODULE.match(target):
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise TaskError(f"task {spec!r}: cannot import module {target!r} ({_line(e)})") from None
        except Exception as e:  # the user's module failed while importing
            raise TaskError(f"task {spec!r}: importing {target!r} raised {type(e).__name__}: {_line(e)}") from None
    else:
        raise TaskError(f"task {spec!r}: {target!r} is neither a .py file nor a module name")
    factory = getattr(module, factory_name, None)
    if factory is None or not callable(factory):
        raise TaskError(f"task {spec!r}: {target} has no callable {factory_name!r}")
    try:
        family = factory()
    except Exception as e:
        raise TaskError(f"task {spec!r}: {factory_name}() raised {type(e).__name__}: {_line(e)}") from None
    if not isinstance(family, TaskFamily):
        raise TaskError(f"task {spec!r}: {factory_name}() returned {type(family).__name__}, not a "
                        "nos.tasks.api.TaskFamily (e.g. nos.tasks.module.ModuleTask)")
    return family


def _import_file(path: Path) -> Any:
    if not path.is_file():
        raise TaskError(f"task file {str(path)!r} does not exist")
    name = f"nos_user_task_{abs(hash(str(path.resolve())))}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise TaskError(f"task file {str(path)!r} cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise TaskError(f"task file {str(path)!r} raised {type(e).__name__} on import: {_line(e)}") from None
    return module


def _line(e: BaseException) -> str:
    return (str(e).splitlines() or [""])[0][:160]


def listing() -> list[tuple[str, str]]:
    """(name, one-line description) of every shipped family."""
    out = []
    for name in SHIPPED:
        try:
            out.append((name, resolve(name).describe()))
        except Exception as e:  # a family whose module is missing still lists
            out.append((name, f"(unavailable: {_line(e)})"))
    return out
