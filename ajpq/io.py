"""File I/O shared by every reader and writer.

* Atomic writes: a crash or Ctrl-C never leaves a half-written policy, checkpoint or artifact behind.
* :func:`parse_json` and :func:`parse_yaml`: the text of a received file (policy, artifact header, run folder,
  configuration) parsed with every failure of the parser turned into one project error naming the file, so that no
  reader lets a parser's own exception (a 5,000-digit number, nesting too deep, a YAML alias bomb) escape.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import yaml

from ajpq.errors import AJPQError

MAX_NUMBER_DIGITS = 4300
"""Python's limit on the digits of an integer read from text (``sys.get_int_max_str_digits``)."""


def parse_json(data: str | bytes, source: str, what: str, error: type[AJPQError], hint: str = "") -> Any:
    """``data`` parsed as JSON, or ``error`` with one line naming ``source`` and saying it is not a ``what``.

    ``hint`` (what to do) ends the message. JSON's ``NaN`` and ``Infinity`` are parsed; callers check values.
    """
    end = f"; {hint}" if hint else ""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError as exc:
        raise error(
            f"{source}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}), so not a {what}{end}"
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{source}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}){end}") from None
    except ValueError:  # int() refuses more than MAX_NUMBER_DIGITS digits
        raise error(f"{source}: holds a number of more than {MAX_NUMBER_DIGITS} digits, so not a {what}{end}") from None
    except RecursionError:
        raise error(f"{source}: JSON nested too deeply to be a {what}{end}") from None


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing aliases (``*name``): no configuration needs them, and nested aliases expand a
    1 KB file into gigabytes ("billion laughs") before any value could be checked."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _AliasRefused(event.start_mark.line + 1)
        return super().compose_node(parent, index)


class _AliasRefused(Exception):
    def __init__(self, line: int) -> None:
        super().__init__(line)
        self.line = line


def parse_yaml(text: str, source: str, error: type[AJPQError]) -> Any:
    """``text`` parsed as safe YAML without aliases, or ``error`` with one line naming ``source``."""
    try:
        return yaml.load(text, Loader=_NoAliasLoader)
    except _AliasRefused as exc:
        raise error(
            f"{source}: line {exc.line} uses a YAML alias (*name); configuration files may not use anchors and "
            "aliases (they can expand a small file into gigabytes): write the values out"
        ) from None
    except yaml.YAMLError as exc:
        where = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip() and line.strip() != "^")
        raise error(f"{source}: not valid YAML ({where})") from None
    except ValueError as exc:  # a 5,000-digit integer, a date such as 2001-13-45
        raise error(f"{source}: a value YAML cannot read ({str(exc)[:100]})") from None
    except RecursionError:
        raise error(f"{source}: YAML nested too deeply to be a configuration") from None


def read_text(path: str | Path, source: str, error: type[AJPQError]) -> str:
    """A UTF-8 file's text, or ``error`` with one line (missing file, a folder, not UTF-8, unreadable)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{source}: no such file") from None
    except IsADirectoryError:
        raise error(f"{source} is a folder; give a file") from None
    except UnicodeDecodeError as exc:
        raise error(f"{source}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start})") from None
    except OSError as exc:
        raise error(f"cannot read {source}: {exc.strerror}") from None


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Write a file through ``write(fileobj)`` (its return value is ignored) into a temporary sibling, then rename it
    over ``path``.

    The rename is atomic on POSIX, so readers see either the old file or the complete new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the permissions open() would
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Atomically replace ``path`` with ``data``."""
    return atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Atomically replace ``path`` with UTF-8 ``text``."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON with a trailing newline."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def cache_dir() -> Path:
    """Where ajpq caches what it computes once (``$AJPQ_CACHE_DIR``, default ``~/.cache/ajpq``)."""
    return Path(os.environ.get("AJPQ_CACHE_DIR", Path.home() / ".cache" / "ajpq"))
