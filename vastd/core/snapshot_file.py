"""Reading a state.json file (and its backup), with nothing of the daemon's machinery:
the store (core/snapshot.py) and `vastd status` (a short-lived process that should
import little) read snapshots through this one module."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NoReturn

from pydantic import ValidationError

from vastd.core.records import SCHEMA_VERSION, Snapshot
from vastd.utils.exceptions import StateManagementError
from vastd.utils.logging import get_logger

READABLE_VERSIONS = (1, SCHEMA_VERSION)  # 1: finished jobs inside, migrated on load
log = get_logger("vastd.state")


def _not_json(constant: str) -> NoReturn:
    raise ValueError(f"{constant} is not a JSON number")


def load_state(file_path: Path) -> Snapshot:
    """Parse one snapshot file; StateManagementError if it is unreadable or invalid."""
    try:
        raw = file_path.read_bytes()
        # NaN and Infinity are not JSON: loaded, they were saved back as null, which
        # no snapshot may hold, into the file and its backup alike.
        data = json.loads(raw, parse_constant=_not_json)
    except (OSError, ValueError) as exc:  # (UnicodeDecodeError, JSONDecodeError included)
        raise StateManagementError(f"{file_path}: {exc}") from None
    if not isinstance(data, dict) or data.get("version") not in READABLE_VERSIONS:
        raise StateManagementError(
            f"{file_path}: not a snapshot of version {' or '.join(map(str, READABLE_VERSIONS))}"
        )
    try:
        return Snapshot.model_validate(data)
    except ValidationError as exc:
        raise StateManagementError(f"{file_path}: invalid snapshot: {exc}") from None


def read_snapshot(path: Path) -> tuple[Snapshot, Path]:
    """state.json, else its backup (with a warning), else an empty snapshot; and the file
    it came from. Both present and unreadable: StateManagementError (never start empty
    over them)."""
    backup = path.with_name(path.name + ".bak")
    errors = []
    for candidate in (path, backup):
        if not candidate.exists():
            continue
        try:
            snap = load_state(candidate)
        except StateManagementError as exc:
            errors.append(str(exc))
            continue
        if candidate is backup:
            log.warning("state_restored_from_backup", path=str(backup), errors=errors)
        return snap, candidate
    if errors:
        raise StateManagementError(
            "refusing to start: the snapshot and its backup are both unreadable ("
            + "; ".join(errors)
            + "). Move them aside to start fresh."
        )
    return Snapshot(), path
