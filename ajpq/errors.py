"""Project error classes.

Every user-facing failure is one of these (the CLI prints the message, exit code 2).
"""


class AJPQError(Exception):
    """Base class: a bad input or an impossible request, with a message that says what to do."""


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
