"""A user's own code named on the command line: ``--model package.module:factory``, ``--dataset package.module:make``.

Only names the user types are imported (never a name read from a file). As tools that import an app by name do
(uvicorn, celery), the current directory is searched too, after everything installed, so ``mynet.py`` next to the
command works without installing it; a module that still cannot be found gets a message saying how to make it
importable.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable
from typing import Any

from ajpq.errors import AJPQError


def is_factory_name(name: str) -> bool:
    """Whether ``name`` names code to import (``package.module:factory``), not a built-in name."""
    return isinstance(name, str) and ":" in name and not name.startswith("python:")


def import_factory(spec: str, what: str, error: type[AJPQError]) -> Callable[..., Any]:
    """The callable ``spec`` (``package.module:attr``) names, or one ``error`` saying what to do.

    Args:
        spec: ``package.module:attr``.
        what: What it is for, in messages ("model", "dataset").
        error: The project error to raise (``ModelError``, ``DataError``).
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise error(f"{what} factory must be written 'package.module:factory', but got {spec!r}")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.append(cwd)  # after site-packages: a local file never shadows an installed module
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.split(".")[0] == exc.name.split(".")[0]:
            raise error(
                f"cannot import module {module_name!r} for {what} {spec!r}: no such module in the current directory "
                f"({cwd}) or on the Python path; run the command from the folder that holds "
                f"{module_name.split('.')[0]}.py (or its package), add that folder to PYTHONPATH "
                "(`PYTHONPATH=/path/to/code ajpq ...`), or `pip install` your package"
            ) from None
        raise error(f"cannot import module {module_name!r} for {what} {spec!r}: {exc}") from exc
    except Exception as exc:  # any error while importing user code is a bad spec, not a crash
        raise error(f"cannot import module {module_name!r} for {what} {spec!r}: {type(exc).__name__}: {exc}") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise error(f"module {module_name!r} has no callable {attr!r} ({what} {spec!r})")
    return factory


def accepted_kwargs(fn: Callable[..., object], offered: dict[str, object]) -> dict[str, object]:
    """The keyword arguments of ``offered`` that ``fn`` takes (all of them if it takes ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(offered)
    ok = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {k: v for k, v in offered.items() if k in params and params[k].kind in ok}
