"""vastd: batch GPU jobs on rented vast.ai instances."""

from __future__ import annotations

from functools import cache


@cache
def _version() -> str:
    # importlib.metadata costs ~40 ms to import: only what asks for the version pays it
    # (`vastd status` and the other short commands do not).
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vastd")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0.0.0+unknown"


def __getattr__(name: str) -> str:
    if name == "__version__":
        return _version()
    raise AttributeError(f"module 'vastd' has no attribute {name!r}")
