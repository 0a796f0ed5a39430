"""The client side of `<root>/control.sock` (`vastd cancel/retry/drain/undrain`).

Blocking and asyncio-free: a command connects, sends one JSON line, prints the
answer's lines. The root lock says whether a daemon runs at all; with none, nothing
is changed and the command exits 1.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path
from typing import Any

from vastd.core.lock import root_locked
from vastd.utils.exceptions import VastdError

SOCKET_NAME = "control.sock"  # as vastd/orchestration/control.py serves it
ANSWER_TIMEOUT_S = 120.0  # a cancel may wait for a collection under way
_SUN_PATH_MAX = 100


class ControlError(VastdError):
    """No daemon, or it did not answer: nothing was changed (as far as we know)."""


def request(root: Path, payload: dict[str, Any], *, timeout_s: float = ANSWER_TIMEOUT_S) -> Any:
    """Send one request to the daemon of `root`; its decoded answer."""
    running = root_locked(root)
    if running is False:
        raise ControlError(f"no daemon is running for {root}")
    path = root / SOCKET_NAME
    dir_fd: int | None = None
    address = str(path)
    try:
        if len(address.encode()) > _SUN_PATH_MAX:
            dir_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
            address = f"/proc/self/fd/{dir_fd}/{SOCKET_NAME}"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout_s)
            sock.connect(address)
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                # A refusal ("busy") may be answered before the request was read.
                sock.sendall(json.dumps(payload).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                data += chunk
    except FileNotFoundError:
        raise ControlError(f"no daemon is running for {root} (no {path})") from None
    except ConnectionRefusedError:
        raise ControlError(f"no daemon is running for {root} ({path} refuses)") from None
    except TimeoutError:
        raise ControlError(f"the daemon for {root} did not answer within {timeout_s:g}s") from None
    except OSError as exc:
        raise ControlError(f"cannot reach the daemon for {root}: {exc}") from None
    finally:
        if dir_fd is not None:
            with contextlib.suppress(OSError):
                os.close(dir_fd)
    try:
        return json.loads(data)
    except ValueError:
        raise ControlError(f"the daemon for {root} gave no answer") from None


def run_command(
    root: Path, payload: dict[str, Any], prog: str
) -> tuple[int, list[tuple[bool, str]]]:
    """(exit code, (ok, line) per name): 0 when every name was acted on, 1 otherwise."""
    answer = request(root, payload)
    if not isinstance(answer, dict):
        raise ControlError(f"the daemon for {root} gave an answer that is not an object")
    if "error" in answer:
        raise ControlError(f"the daemon refused the request: {answer['error']}")
    lines = []
    for item in answer.get("results", []):
        line = f"{prog}: {item.get('name')}: {item.get('message')}"
        lines.append((item.get("ok") is True, line))
    return (0 if answer.get("ok") else 1), lines
