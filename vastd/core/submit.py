"""`vastd submit`: copy job files into the inbox atomically (temp name, then rename)."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from vastd.core.files import (
    Layout,
    ensure_directory_exists,
    fsync_directory,
    not_utf8_reason,
)
from vastd.core.jobs import is_candidate_name
from vastd.utils.exceptions import FileOperationError
from vastd.utils.text import is_utf8


def submit_file(layout: Layout, src: Path) -> Path:
    """Copy one CSV into the inbox under a dot-name, fsync, then rename it in place."""
    if not is_candidate_name(src.name):
        # The daemon would ignore it for ever: refuse instead of reporting success.
        raise FileOperationError(
            "job files must end in .csv and be neither dot-files nor temp names"
        )
    if not is_utf8(src.name):
        raise FileOperationError(not_utf8_reason(src.name))
    if not src.exists():
        raise FileOperationError("no such file")
    if not src.is_file():
        raise FileOperationError("not a regular file")
    ensure_directory_exists(layout.inbox)
    final = layout.inbox / src.name
    if final.exists():
        raise FileOperationError(f"{final} already exists in the inbox")
    tmp = layout.inbox / f".{secrets.token_hex(4)}.submit.part"
    try:
        with src.open("rb") as reader, tmp.open("xb") as writer:
            shutil.copyfileobj(reader, writer, 1 << 20)
            writer.flush()
            os.fsync(writer.fileno())
        # link+unlink refuses to replace a file that appeared meanwhile (rename would not).
        os.link(tmp, final)
        os.unlink(tmp)
        fsync_directory(layout.inbox)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise FileOperationError(str(exc)) from exc
    return final


def submit_files(layout: Layout, files: Iterable[Path]) -> Iterator[tuple[Path, Path | Exception]]:
    for src in files:
        try:
            yield src, submit_file(layout, src)
        except FileOperationError as exc:
            yield src, exc
