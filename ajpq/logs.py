"""Messages for the user, through the standard ``logging`` module under the ``ajpq`` logger.

Library code calls :func:`log` (``logger.info``); an application decides where the messages go. The ``ajpq`` console
script calls :func:`setup_logging`, which prints them on stderr as ``ajpq: message`` so that stdout stays clean for
``--json``. Used as a library without it, ajpq prints nothing (the logging module's default for INFO).
"""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger("ajpq")


class _StderrHandler(logging.Handler):
    """Writes to the ``sys.stderr`` of the moment (a redirected or captured stream included)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


def setup_logging(level: int = logging.INFO) -> None:
    """Print ajpq's messages on stderr as ``ajpq: message`` (once, however often it is called)."""
    if not any(isinstance(handler, _StderrHandler) for handler in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("ajpq: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)


def log(message: str) -> None:
    """A message for the user (progress, notes, what was chosen for them)."""
    logger.info(message)
