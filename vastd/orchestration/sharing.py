"""`[paths] group`: a group that may drop files into inbox/ and read results/.

With a group set, the root is 0710 (its members may pass, not list: state.json stays
private), inbox/ is 2770 (members drop files; setgid keeps the group on them) and
results/ is 2750, each job's results dirs 2750 and files 0640 once installed. With
`group = ""` nothing is changed: every folder stays 0700, owner only.
"""

from __future__ import annotations

import grp
import os
import stat
from pathlib import Path

from vastd.core.files import Layout
from vastd.utils.exceptions import ConfigError
from vastd.utils.logging import get_logger

log = get_logger("vastd.sharing")

INBOX_MODE = 0o2770
RESULTS_MODE = 0o2750
ROOT_MODE = 0o710
FILE_MODE = 0o640


def group_id(name: str) -> int | None:
    """The gid of `[paths] group`, None for ""; ConfigError naming the key if unknown."""
    if not name:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ConfigError([f"paths.group: no group named {name!r} on this machine"]) from None


def _set(path: Path, gid: int, mode: int) -> None:
    os.chown(path, -1, gid)  # only a group the daemon's user is in (or root) may be given
    os.chmod(path, mode)


def share_folders(layout: Layout, gid: int | None) -> None:
    """At start: the root, inbox/ and results/ get the group and their modes."""
    if gid is None:
        return
    try:
        _set(layout.root, gid, ROOT_MODE)
        _set(layout.inbox, gid, INBOX_MODE)
        _set(layout.results, gid, RESULTS_MODE)
    except PermissionError as exc:
        raise ConfigError(
            [
                f"paths.group: cannot give {exc.filename} to gid {gid}: {exc.strerror}"
                " (the daemon's user must be a member of the group)"
            ]
        ) from None
    log.info("folders_shared", gid=gid, inbox=oct(INBOX_MODE), results=oct(RESULTS_MODE))


def share_results(folder: Path, group: str) -> None:
    """After a job's results are installed: its dirs 2750, its files 0640, in the group."""
    if not group or not folder.is_dir():
        return
    try:
        gid = grp.getgrnam(group).gr_gid
        _set(folder, gid, RESULTS_MODE)
        for dirpath, dirnames, filenames in os.walk(folder):
            for name in dirnames:
                _set(Path(dirpath) / name, gid, RESULTS_MODE)
            for name in filenames:
                path = Path(dirpath) / name
                if stat.S_ISREG(path.lstat().st_mode):
                    _set(path, gid, FILE_MODE)
    except (KeyError, OSError) as exc:
        # the results are there and valid; only the group cannot read them yet
        log.warning("results_share_failed", folder=str(folder), error=str(exc))
