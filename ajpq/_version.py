"""The version of ajpq, in one place: read by ``ajpq.__version__`` and by the build (pyproject's dynamic version)."""

__version__ = "0.1.0"
