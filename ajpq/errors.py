"""Project error classes.

Every user-facing failure is one of these (the CLI prints the message, exit code 2). :func:`shown` quotes a value
read from a received file in such a message.
"""

import json
from typing import Any


def shown(value: Any, limit: int = 40) -> str:
    """A value of a received file as JSON, cut to ``limit`` characters (a 5,000-digit number stays one short line)."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):  # not JSON, or an int beyond Python's digit limit for str()
        text = f"an integer of {value.bit_length()} bits" if isinstance(value, int) else type(value).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


MAX_MESSAGE = 1000
"""Longest message an error keeps: a longer one (a received value quoted whole) loses its middle, so what was wrong
(the start) and what to do (the end) stay on one short line."""


class AJPQError(Exception):
    """Base class: a bad input or an impossible request, with a message that says what to do."""

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str) and len(args[0]) > MAX_MESSAGE:
            text, half = args[0], MAX_MESSAGE // 2 - 4
            args = (f"{text[:half]} ... {text[-half:]}",)
        super().__init__(*args)


class DataError(AJPQError):
    """A dataset is missing, malformed or unknown."""


class ModelError(AJPQError):
    """A model name, factory or checkpoint is unknown or does not fit."""


class PolicyError(AJPQError):
    """A policy file is malformed or does not match the model."""


class BudgetError(AJPQError):
    """A size/BOPs budget is out of range or cannot be met."""


class ArtifactError(AJPQError):
    """A compressed-model artifact is corrupted, truncated or of an unknown version."""


class ConfigError(AJPQError):
    """A configuration value is invalid."""


class StorageError(AJPQError):
    """A file could not be written (disk full, read-only or missing folder, no permission)."""
