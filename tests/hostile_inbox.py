"""A corpus of hostile inbox entries, each with the outcome vastd owes it (CONTRACT §3).

Used by bench/chaos.py (and so by tests/test_chaos.py). Every entry is created in a
staging folder and then renamed into the inbox as it is (a symlink stays a symlink,
a FIFO a FIFO). What each one must become is decided here, per entry:

- `refused`: in `failed/` beside an `.error.json` whose `job` is the full id and whose
  `reason` contains `reason`; never run remotely.
- `ignored`: dot-files, temp names and non-`.csv` names stay in the inbox untouched.
- `done`: a valid GARCH file under a hostile *name* (quotes, `$(...)`, backticks, `;`,
  newline, leading `-`, unicode, 200 bytes...): it must run and end in `done/` with
  valid results. Three of them try shell injection with a canary file that must never
  appear (see `canary_names`).
- `failed_run`: valid CSV that the worker itself rejects (exit 1): it ends in `failed/`
  after `[job] max_attempts` attempts, with `last_exit_code == 1`.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

HEADER = "eta,lam,var0,alpha,gamma,beta,p"
Expect = Literal["refused", "ignored", "done", "failed_run"]
CANARY_PREFIX = "CANARY_"


def garch_rows(rng: random.Random, n: int) -> list[str]:
    """`n` valid parameter rows (the worker accepts them)."""
    rows = []
    for _ in range(n):
        alpha, gamma, beta = rng.uniform(0.01, 0.05), rng.uniform(0, 0.05), rng.uniform(0.8, 0.9)
        eta, lam, var0, p = (
            rng.uniform(4, 30),
            rng.uniform(-0.5, 0.5),
            rng.uniform(0.1, 10),
            rng.random(),
        )
        rows.append(",".join(f"{v:.8g}" for v in (eta, lam, var0, alpha, gamma, beta, p)))
    return rows


def garch_text(rng: random.Random, n: int, newline: str = "\n") -> str:
    return newline.join([HEADER, *garch_rows(rng, n)]) + newline


@dataclass(frozen=True)
class HostileEntry:
    """One inbox entry: its name, how to make it, and what vastd must make of it."""

    name: str
    what: str
    expect: Expect
    make: Callable[[Path], None]  # creates the entry at the given path
    rows: int = 0  # data rows (done / failed_run)
    reason: str = ""  # a piece of the refusal reason (refused)
    short: bool = False  # part of the --short profile

    @property
    def job_id(self) -> str:
        return self.name[: -len(".csv")] if self.name.endswith(".csv") else self.name


def _bytes(data: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(data)


def _symlink(target: str) -> Callable[[Path], None]:
    return lambda path: os.symlink(target, path)


def _fifo(path: Path) -> None:
    os.mkfifo(path, 0o644)


def _directory(path: Path) -> None:
    path.mkdir()
    (path / "inner.csv").write_text(HEADER + "\n1,2,3,4,5,6,7\n")


def canary_names(token: str) -> list[str]:
    """Job names that would create `CANARY_<token>*` in $HOME if pasted into a shell."""
    canary = CANARY_PREFIX + token
    return [
        f"$(cd;touch {canary}a)x.csv",
        f"`cd;touch {canary}b`.csv",
        f"semi;cd;touch {canary}c;.csv",
    ]


def build_corpus(
    token: str, *, max_input_bytes: int, seed: int = 7, short: bool = False
) -> list[HostileEntry]:
    """The corpus (>= 30 entries; the short profile keeps a dozen, canaries included)."""
    rng = random.Random(seed)
    valid = garch_text(rng, 3).encode()
    entries: list[HostileEntry] = []

    def add(
        name: str, what: str, expect: Expect, make: Callable[[Path], None], **kw: object
    ) -> None:
        entries.append(HostileEntry(name, what, expect, make, **kw))  # type: ignore[arg-type]

    def good(
        name: str, what: str, *, newline: str = "\n", bom: bool = False, s: bool = False
    ) -> None:
        text = garch_text(rng, 2, newline)
        data = (b"\xef\xbb\xbf" if bom else b"") + text.encode()
        add(name, what, "done", _bytes(data), rows=2, short=s)

    # -- broken content: refused with a reason ------------------------------------------
    add(
        "bad_utf8.csv",
        "invalid UTF-8",
        "refused",
        _bytes(HEADER.encode() + b"\n1,2,\xff\xfe,4,5,6,7\n"),
        reason="not UTF-8",
        short=True,
    )
    add(
        "utf16.csv",
        "UTF-16 with BOM",
        "refused",
        _bytes((HEADER + "\n").encode("utf-16")),
        reason="not UTF-8",
    )
    add(
        "binary_garbage.csv",
        "random bytes (PNG header)",
        "refused",
        _bytes(b"\x89PNG\r\n\x1a\n" + bytes(rng.randrange(256) for _ in range(512))),
        reason="not UTF-8",
    )
    add("empty.csv", "zero bytes", "refused", _bytes(b""), reason="no header", short=True)
    add("only_newlines.csv", "blank lines only", "refused", _bytes(b"\n\n\n"), reason="no header")
    add(
        "header_only.csv",
        "a header, no data row",
        "refused",
        _bytes((HEADER + "\n").encode()),
        reason="no data rows",
        short=True,
    )
    add(
        "header_only_crlf.csv",
        "a header (CRLF), no data row",
        "refused",
        _bytes((HEADER + "\r\n").encode()),
        reason="no data rows",
    )
    add(
        "ragged_long.csv",
        "a row with one field too many",
        "refused",
        _bytes(valid + b"1,2,3,4,5,6,7,8\n"),
        reason="fields",
        short=True,
    )
    add(
        "ragged_short.csv",
        "a row with too few fields",
        "refused",
        _bytes(valid + b"1,2,3\n"),
        reason="fields",
    )
    add(
        "nul_byte.csv",
        "a NUL byte in a row",
        "refused",
        _bytes(valid + b"1,2,3\x00,4,5,6,7\n"),
        reason="NUL",
        short=True,
    )
    add("nul_only.csv", "NUL bytes only", "refused", _bytes(b"\x00" * 64), reason="NUL")
    add(
        "blank_middle.csv",
        "a blank line between rows",
        "refused",
        _bytes(HEADER.encode() + b"\n1,2,3,4,5,6,7\n\n1,2,3,4,5,6,7\n"),
        reason="blank",
    )
    add(
        "unterminated_quote.csv",
        "an unterminated quote",
        "refused",
        _bytes(HEADER.encode() + b'\n"1,2,3,4,5,6,7\n'),
        reason="CSV",
    )
    huge_rows = garch_rows(rng, 1)[0].encode() + b"\n"
    huge = HEADER.encode() + b"\n" + huge_rows * (max_input_bytes // len(huge_rows) + 64)
    add(
        "huge.csv",
        f"valid CSV over max_input_bytes ({len(huge)} bytes)",
        "refused",
        _bytes(huge),
        reason="max_input_bytes",
        short=True,
    )
    add(
        "passwd_link.csv",
        "symlink to /etc/passwd",
        "refused",
        _symlink("/etc/passwd"),
        reason="symbolic link",
        short=True,
    )
    add(
        "dangling_link.csv",
        "dangling symlink",
        "refused",
        _symlink("/nonexistent/vastd-chaos.csv"),
        reason="symbolic link",
    )
    add("fifo.csv", "a FIFO", "refused", _fifo, reason="FIFO", short=True)
    add(
        "folder.csv",
        "a directory named *.csv",
        "refused",
        _directory,
        reason="directory",
        short=True,
    )

    # -- hostile names, valid content: must run and succeed ----------------------------
    canaries = canary_names(token)
    good(canaries[0], "shell injection $(...) with a canary", s=True)
    good(canaries[1], "shell injection with backticks and a canary", s=True)
    good(canaries[2], "shell injection with ';' and a canary")
    good("with  two spaces.csv", "spaces in the name", s=True)
    good('it\'s "quoted".csv', "single and double quotes")
    good("line\nbreak.csv", "a newline in the name", s=True)
    good("-rf --help.csv", "leading '-' (looks like options)", s=True)
    good("dollar $HOME ${PATH} $((1+1)).csv", "$ expansions")
    good("glob *?[a] {x,y}.csv", "glob and brace characters")
    good("pipe | amp & redirect > < .csv", "pipes and redirections")
    good("back\\slash\ttab.csv", "backslash and tab")
    good("unicodé_日本語_😀.csv", "non-ASCII unicode")
    good("x" * 196 + ".csv", "a 200-byte name")
    good("bom_crlf.csv", "UTF-8 BOM and CRLF line endings (valid)", newline="\r\n", bom=True)

    # -- valid CSV the worker refuses: fails for good after max_attempts ----------------
    add(
        "wrong_columns.csv",
        "valid CSV without the GARCH columns (worker exits 1)",
        "failed_run",
        _bytes(b"a,b\n1,2\n"),
        rows=1,
        short=True,
    )
    # 255 bytes: fine for vastd, but the worker's parquet name (<stem>_0_streaming_...)
    # passes the file system's limit, so every attempt fails; the error file name is
    # shortened with a hash (CONTRACT §3).
    add(
        "L" * 251 + ".csv",
        "a 255-byte name (the worker's output name is too long)",
        "failed_run",
        _bytes(valid),
        rows=3,
    )

    # -- names the inbox must ignore -----------------------------------------------------
    for name in (
        ".hidden.csv",
        "upload.csv.part",
        "draft.csv.tmp",
        "edit.csv.swp",
        "backup.csv~",
        "download.csv.crdownload",
        "notes.txt",
        "UPPER.CSV",
        ".csv",
    ):
        add(
            name,
            "dot-file, temp or non-.csv name",
            "ignored",
            _bytes(valid),
            short=name in (".hidden.csv", "upload.csv.part"),
        )
    # fmt: on
    return [e for e in entries if e.short] if short else entries


def stage(entry: HostileEntry, staging: Path) -> Path:
    """Create the entry in `staging` (outside the inbox); returns its path."""
    staging.mkdir(parents=True, exist_ok=True)
    path = staging / entry.name
    entry.make(path)
    return path


def drop(staged: Path, inbox: Path) -> Path:
    """Rename a staged entry into the inbox (atomic; a symlink or FIFO is moved as is)."""
    target = inbox / staged.name
    os.rename(staged, target)
    return target
