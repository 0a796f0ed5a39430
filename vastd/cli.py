"""The `vastd` command: run, submit, status, check-config, demo.

Exit codes: 0 clean stop, 2 bad config or arguments (a message naming the key,
never a traceback), 1 any other fatal error.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from vastd.utils.config import Settings, load_config, resolve_config_path
from vastd.utils.exceptions import ConfigError, StateManagementError, VastdError

EXIT_OK = 0
EXIT_FATAL = 1
EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vastd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument(
            "--config", help="config file (default: $VASTD_CONFIG or /etc/vastd/config.toml)"
        )
        return p

    run = with_config(sub.add_parser("run", help="the daemon, in the foreground"))
    run.add_argument("--log-level", default=os.environ.get("VASTD_LOG_LEVEL", "INFO"))
    submit = with_config(sub.add_parser("submit", help="put job files into the inbox atomically"))
    submit.add_argument("files", nargs="+", metavar="FILE")
    status = with_config(sub.add_parser("status", help="jobs, instances, progress"))
    status.add_argument("--json", action="store_true", help="machine-readable output")
    with_config(sub.add_parser("check-config", help="validate and print the effective config"))
    demo = sub.add_parser("demo", help="the whole system against the built-in simulator")
    demo.add_argument("--jobs", type=int, default=12)
    demo.add_argument("--instances", type=int, default=3)
    demo.add_argument("--rows", type=int, default=5, help="rows per job file")
    demo.add_argument("--workdir", help="where to keep the demo's folders (default: a temp dir)")
    return parser


def _load(args: argparse.Namespace) -> Settings:
    return load_config(getattr(args, "config", None), require_file=True)


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = _load(args)
    print(json.dumps(settings.redacted(), indent=2, sort_keys=True))
    print(f"# config: {resolve_config_path(args.config)}: valid", file=sys.stderr)
    if settings.api_key() is None:
        print(
            "# warning: no vast.ai API key found (vastd run will refuse to start)", file=sys.stderr
        )
    return EXIT_OK


def cmd_submit(args: argparse.Namespace) -> int:
    from vastd.core.files import Layout
    from vastd.core.submit import submit_files

    settings = _load(args)
    layout = Layout(settings.paths.root)
    failures = 0
    for src, result in submit_files(layout, [Path(f) for f in args.files]):
        if isinstance(result, Exception):
            failures += 1
            print(f"vastd submit: {src}: {result}", file=sys.stderr)
        else:
            print(result)
    return EXIT_FATAL if failures else EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from vastd.core.files import Layout
    from vastd.status import build_status, format_status, load_snapshot_readonly, status_json

    settings = _load(args)
    layout = Layout(settings.paths.root)
    status = build_status(
        layout, load_snapshot_readonly(layout), idle_timeout_s=settings.fleet.idle_timeout_s
    )
    print(status_json(status) if args.json else format_status(status))
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from vastd.daemon import run_daemon
    from vastd.utils.logging import setup_logging

    settings = _load(args)
    setup_logging(args.log_level)
    code = run_daemon(settings)
    # The interpreter may still wait for library threads (watchfiles' worker) after the
    # loop ended: a SIGINT then must still force the exit, not print a traceback.
    signal.signal(signal.SIGINT, _forced_exit)
    return code


def _forced_exit(_signum: int, _frame: object) -> None:
    os._exit(130)


def cmd_demo(args: argparse.Namespace) -> int:
    from vastd.demo import run_demo

    return run_demo(
        jobs=args.jobs,
        instances=args.instances,
        rows=args.rows,
        workdir=Path(args.workdir) if args.workdir else None,
    )


COMMANDS = {
    "run": cmd_run,
    "submit": cmd_submit,
    "status": cmd_status,
    "check-config": cmd_check_config,
    "demo": cmd_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command not in ("run", "demo"):
        # Warnings (e.g. a snapshot read from its backup) must not mix into stdout,
        # which carries `status --json` and `check-config` output.
        from vastd.utils.logging import setup_logging

        setup_logging("WARNING", stream=sys.stderr)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"vastd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StateManagementError as exc:
        print(f"vastd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except VastdError as exc:
        print(f"vastd: {exc}", file=sys.stderr)
        return EXIT_FATAL
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
