"""The training function a restore re-runs: what ``run.json`` records of it, and what may be loaded.

Storage is untrusted (docs/security.md): anyone who can write the run directory can rewrite
``run.json``. So what is recorded here is data for a person to confirm, never an instruction:

- `record_call` writes the function's name and its JSON-able arguments, with every argument
  whose name looks secret (``api_token``, ``aws_secret_access_key``...), that holds a URL with a
  password, or that a ``record_args`` allow-list leaves out replaced by a `NOT_RECORDED` marker.
  Nothing else of the process (``sys.argv``, the environment, storage options) is recorded.
- `check_entrypoint` refuses the standard library and builtins as entrypoints, whoever names
  them (``os:system``, ``subprocess:run``, ``builtins:eval``), before anything is imported.
- `load_function` imports a function; one that ``run.json`` named must also be a
  `moai_ckpt.fault_tolerant` function. Whether a recorded one may run at all is the CLI's
  decision (``--entrypoint``, ``--trust-run-json`` or a confirmation on a terminal).
"""

from __future__ import annotations

import builtins
import importlib
import importlib.util
import inspect
import json
import os
import re
import sys
import sysconfig
from collections.abc import Callable, Collection
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from moai_ckpt.errors import EntrypointError, redact_url

NOT_RECORDED = "$not_recorded"
CALL_ENV = "MOAI_CKPT_CALL"  # a call's JSON arguments handed to another process (never stored)
FAULT_TOLERANT_MARK = "__wrapped_storage__"  # set by fault_tolerant on the function it returns

# words of an argument name that make its value a secret (``api_key``, ``hfToken``, ``db_passwd``)
_SECRET_WORDS = frozenset(
    {
        "auth",
        "authorization",
        "authentication",
        "oauth",
        "cookie",
        "credential",
        "credentials",
        "creds",
        "key",
        "apikey",
        "passphrase",
        "passwd",
        "password",
        "pwd",
        "secret",
        "secrets",
        "token",
    }
)
_SECRET_SUFFIXES = ("token", "secret", "password", "passwd", "apikey", "accesskey", "secretkey", "privatekey")
_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")
_URL_WITH_USERINFO = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^/?#\s]*@")


class RecordedCall(BaseModel):
    """``run.json``'s ``entry``: the training function and the arguments it was called with.

    Older files also hold ``cwd`` and ``argv``; they are ignored.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    function: str | None = None
    args: list[Any] | None = None
    kwargs: dict[str, Any] | None = None


def looks_secret(name: str) -> bool:
    """Whether an argument or key named ``name`` probably holds a secret.

    ``name`` is split into words (``aws_secret_access_key`` -> aws, secret, access, key;
    ``hfToken`` -> hf, token); one of them names a secret, or ends like one (``authtoken``).
    """
    words = [w.lower() for w in _WORD.findall(name)]
    return any(w in _SECRET_WORDS or w.endswith(_SECRET_SUFFIXES) for w in words)


def marker(name: str, reason: str) -> dict[str, str]:
    """What ``run.json`` holds in place of an argument it does not record."""
    return {NOT_RECORDED: name, "reason": reason}


def is_marker(value: Any) -> bool:
    return isinstance(value, dict) and NOT_RECORDED in value


def function_spec(fn: Callable[..., Any]) -> str | None:
    """``module:qualname`` (or ``/abs/file.py:qualname`` for a script) that `load_function` finds
    ``fn`` by, or None when another process cannot (a function defined inside another)."""
    if "<locals>" in fn.__qualname__ or "<lambda>" in fn.__qualname__:
        return None
    module = fn.__module__
    if module != "__main__":
        return f"{module}:{fn.__qualname__}"
    main_file = getattr(sys.modules["__main__"], "__file__", None)
    return f"{os.path.abspath(main_file)}:{fn.__qualname__}" if main_file else None


def record_call(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    record_args: Collection[str] | None = None,
) -> dict[str, Any]:
    """What ``run.json`` records of ``fn(run, *args, **kwargs)``: its name and redacted arguments.

    Args:
        fn: the training function (it receives the `Run` first, then ``args`` and ``kwargs``).
        args: its positional arguments after the run.
        kwargs: its keyword arguments.
        record_args: the only argument names to record (their values as given, secret-looking
            names included: the caller listed them); None: every argument whose name does not
            look secret.
    """
    names = _positional_names(fn, len(args))
    return {
        "function": function_spec(fn),
        "args": [_recorded(name, value, record_args) for name, value in zip(names, args, strict=True)],
        "kwargs": {name: _recorded(name, value, record_args) for name, value in kwargs.items()},
    }


def _positional_names(fn: Callable[..., Any], count: int) -> list[str]:
    """The parameter name each of ``count`` positional arguments after the run binds to."""
    try:
        params = list(inspect.signature(fn).parameters.values())[1:]  # the first one is the run
    except (TypeError, ValueError):
        params = []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = [p.name for p in params if p.kind in kinds]
    rest = next((p.name for p in params if p.kind is inspect.Parameter.VAR_POSITIONAL), None)
    return [names[i] if i < len(names) else (rest or f"arg{i}") for i in range(count)]


def _recorded(name: str, value: Any, record_args: Collection[str] | None) -> Any:
    if record_args is not None:
        if name not in record_args:
            return marker(name, "not in record_args")
    elif looks_secret(name):
        return marker(name, "secret-looking name")
    try:
        data = json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError, RecursionError):
        return marker(name, f"not JSON-able ({type(value).__name__})")
    return _scrub(name, data)


def _scrub(path: str, data: Any) -> Any:
    """``data`` with secret-looking keys and URLs that carry a password replaced by markers."""
    if isinstance(data, dict):
        return {
            k: marker(f"{path}.{k}", "secret-looking name") if looks_secret(k) else _scrub(f"{path}.{k}", v)
            for k, v in data.items()
        }
    if isinstance(data, list):
        return [_scrub(f"{path}[{i}]", v) for i, v in enumerate(data)]
    if isinstance(data, str) and _URL_WITH_USERINFO.search(data):
        return marker(path, "a URL with credentials")
    return data


def not_recorded(value: Any) -> list[str]:
    """The names of the arguments that ``value`` (a recorded call's arguments) holds markers for."""
    if is_marker(value):
        return [str(value[NOT_RECORDED])]
    if isinstance(value, dict):
        return [name for v in value.values() for name in not_recorded(v)]
    if isinstance(value, list):
        return [name for v in value for name in not_recorded(v)]
    return []


# -- loading ---------------------------------------------------------------------------------------

_REFUSED_MODULES = frozenset(sys.stdlib_module_names) | frozenset(sys.builtin_module_names) | {"__main__"}
_PACKAGES_DIR = frozenset({"site-packages", "dist-packages"})  # installed packages, even below the stdlib folder


def _split(spec: str) -> tuple[str, str]:
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise EntrypointError(f"entrypoint {spec!r} is not 'module:function' or 'file.py:function'")
    return target, name


def _refused_module(module: str) -> bool:
    return module.split(".", 1)[0] in _REFUSED_MODULES


def _stdlib_file(path: str) -> bool:
    """A file of the standard library itself (not of a site-packages folder inside it)."""
    real = os.path.realpath(path)
    paths = sysconfig.get_paths()
    roots = {os.path.realpath(paths[k]) for k in ("stdlib", "platstdlib") if k in paths}
    inside = any(real.startswith(root.rstrip(os.sep) + os.sep) for root in roots)
    return inside and not _PACKAGES_DIR.intersection(real.split(os.sep))


def check_entrypoint(spec: str) -> str:
    """Refuse an entrypoint in the standard library or builtins (before importing anything).

    Returns ``spec``. Raises `EntrypointError`.
    """
    target, name = _split(spec)
    if any(part.startswith("__") for part in name.split(".")):
        raise EntrypointError(f"entrypoint {spec!r}: {name!r} is not a function name")
    refused = _stdlib_file(target) if target.endswith(".py") else _refused_module(target)
    if refused:
        raise EntrypointError(
            f"entrypoint {spec!r} is refused: the standard library and builtins are never run as a training function"
        )
    return spec


def load_function(spec: str, *, recorded: bool = False) -> Callable[..., Any]:
    """``package.module:function`` or ``path/to/file.py:function`` -> the function.

    A file is loaded under a module name of its own, so its ``__main__`` block does not run.

    Args:
        spec: the entrypoint.
        recorded: ``spec`` was read from ``run.json``: it must name a `fault_tolerant` function
            (what ``run.json`` records), not any callable of an importable module.

    Raises:
        EntrypointError: refused (`check_entrypoint`), not found, or not a training function.
    """
    target, name = _split(check_entrypoint(spec))
    module = _load_file(target) if target.endswith(".py") else _import(target, spec)
    fn: Any = module
    for part in name.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise EntrypointError(f"{target!r} has no {name!r}")
    if not callable(fn):
        raise EntrypointError(f"entrypoint {spec!r} is not callable")
    origin = getattr(fn, "__module__", None) or ""
    if _refused_module(origin) or isinstance(fn, type(builtins.eval)):
        raise EntrypointError(
            f"entrypoint {spec!r} is refused: it is {origin or 'a builtin'} code, not a training function"
        )
    if recorded and not (inspect.isfunction(fn) and hasattr(fn, FAULT_TOLERANT_MARK)):
        raise EntrypointError(f"entrypoint {spec!r} from run.json is not a moai_ckpt.fault_tolerant function")
    return fn


def _load_file(target: str) -> Any:
    if not os.path.exists(target):
        raise EntrypointError(f"entrypoint file {target} does not exist")
    module_name = "_moai_entry_" + os.path.splitext(os.path.basename(target))[0]
    loader = importlib.util.spec_from_file_location(module_name, target)
    if loader is None or loader.loader is None:
        raise EntrypointError(f"cannot load {target}")
    module = importlib.util.module_from_spec(loader)
    sys.modules[module_name] = module
    sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
    loader.loader.exec_module(module)
    return module


def _import(target: str, spec: str) -> Any:
    try:
        return importlib.import_module(target)
    except ImportError as exc:
        raise EntrypointError(f"cannot import {target!r} for entrypoint {spec!r}: {exc}") from exc


def parse_recorded(entry: dict[str, Any] | None, url: str) -> RecordedCall | None:
    """``run.json``'s ``entry`` checked as data (None when it records none)."""
    if entry is None:
        return None
    try:
        return RecordedCall.model_validate(entry)
    except ValidationError as exc:
        raise EntrypointError(f"run.json's entry does not validate: {exc.errors()[0]['msg']}", url=url) from None


def describe(value: Any, limit: int = 300) -> str:
    """A recorded value for a message: JSON (control characters escaped), cut at ``limit``."""
    text = redact_url(json.dumps(value, ensure_ascii=True, default=str))
    return text if len(text) <= limit else text[: limit - 3] + "..."
