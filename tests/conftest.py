"""Shared test set-up: one private reference-model cache per test session, no progress bars."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # shared helpers such as nets.py


@pytest.fixture(scope="session", autouse=True)
def _ajpq_environment(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Auto-pretrained references go to a session folder (trained once, shared by all tests and subprocesses)."""
    os.environ["AJPQ_CACHE_DIR"] = str(tmp_path_factory.mktemp("ajpq-cache"))
    os.environ["AJPQ_NO_PROGRESS"] = "1"
