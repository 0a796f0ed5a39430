"""The `vastd` command: run, submit, status, jobs, report, check-config, demo, cancel, retry, drain, undrain.

Exit codes: 0 clean stop, 2 bad config or arguments (a message naming the key,
never a traceback), 1 any other fatal error.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vastd.utils.config import (
    Settings,
    check_files,
    file_problems_of_valid_sections,
    load_config,
    normalise_log_level,
    read_config,
    resolve_config_path,
)
from vastd.utils.exceptions import ConfigError, StateManagementError, VastdError

EXIT_OK = 0
EXIT_FATAL = 1
EXIT_USAGE = 2


def _log_level(value: str) -> str:
    try:
        return normalise_log_level(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _at_least_one(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {number})")
    return number


def _positive_seconds(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not number > 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds (got {value})")
    return number


_STATES = ("queued", "running", "collecting", "done", "failed")


def _job_state(value: str) -> str:
    if value not in _STATES:
        raise argparse.ArgumentTypeError(f"unknown state {value!r} (one of: {', '.join(_STATES)})")
    return value


class _VersionAction(argparse.Action):
    """`--version`, reading the installed version only when asked."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str | None = None):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *_args: Any) -> None:
        import vastd

        print(f"vastd {vastd.__version__}")
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vastd",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=_VersionAction, help="print the version")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument(
            "--config", help="config file (default: $VASTD_CONFIG or /etc/vastd/config.toml)"
        )
        return p

    run = with_config(sub.add_parser("run", help="the daemon, in the foreground"))
    run.add_argument(
        "--log-level",
        type=_log_level,
        default=os.environ.get("VASTD_LOG_LEVEL") or None,
        help="debug, info, warning, error or critical "
        "(default: $VASTD_LOG_LEVEL, else [log] level; overrides the config, also on SIGHUP)",
    )
    submit = with_config(sub.add_parser("submit", help="put job files into the inbox atomically"))
    submit.add_argument("files", nargs="+", metavar="FILE", help="CSV job files to submit")
    status = with_config(sub.add_parser("status", help="jobs, instances, progress"))
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument(
        "--all", action="store_true", help="also list destroyed instances (they bill nothing)"
    )
    status.add_argument(
        "--watch", action="store_true", help="refresh until Ctrl-C (in place on a terminal)"
    )
    status.add_argument(
        "--interval",
        type=_positive_seconds,
        default=2.0,
        help="seconds between refreshes with --watch (default: 2)",
    )
    jobs = with_config(sub.add_parser("jobs", help="one row per job"))
    jobs.add_argument(
        "--state", metavar="S", help=f"only jobs in this state ({', '.join(_STATES)})"
    )
    jobs.add_argument("--json", action="store_true", help="a JSON list of objects")
    report = with_config(
        sub.add_parser("report", help="the campaign: rows in and out, cost, what is not done")
    )
    report.add_argument("--json", action="store_true", help="machine-readable output")
    check = with_config(
        sub.add_parser("check-config", help="validate and print the effective config")
    )
    check.add_argument(
        "--online",
        action="store_true",
        help="also try the API key (GET /users/current) and SSH to one labelled instance",
    )
    for name, what in (
        ("cancel", "cancel jobs: queued ones leave the queue, running ones are killed"),
        ("retry", "queue failed (or cancelled) jobs again, their attempts reset"),
    ):
        p = with_config(sub.add_parser(name, help=f"{what} (a running daemon)"))
        p.add_argument("jobs", nargs="+", metavar="JOB", help="job names (the CSV's name, no .csv)")
    for name, what in (
        ("drain", "give the instance no new jobs (its running jobs finish)"),
        ("undrain", "let a drained instance take new jobs again"),
    ):
        p = with_config(sub.add_parser(name, help=f"{what} (a running daemon)"))
        p.add_argument("instance", metavar="INSTANCE", help="the instance id")
    demo = sub.add_parser("demo", help="the whole system against the built-in simulator")
    demo.add_argument(
        "--jobs", type=_at_least_one, default=12, help="job files to run (default: 12)"
    )
    demo.add_argument(
        "--instances", type=_at_least_one, default=3, help="simulated instances (default: 3)"
    )
    demo.add_argument(
        "--rows", type=_at_least_one, default=5, help="rows per job file (default: 5)"
    )
    demo.add_argument("--workdir", help="where to keep the demo's folders (default: a temp dir)")
    return parser


def _load(args: argparse.Namespace) -> Settings:
    return load_config(getattr(args, "config", None), require_file=True)


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        settings, notes = read_config(args.config, require_file=True)
    except ConfigError as exc:
        # Every problem at once: also those of the files the valid sections name.
        raise ConfigError(exc.problems + file_problems_of_valid_sections(args.config)) from None
    problems = check_files(settings)
    if problems:
        raise ConfigError(problems)
    print(json.dumps(settings.redacted(), indent=2, sort_keys=True))
    for note in notes:
        print(f"# {note}", file=sys.stderr)
    if settings.metrics.listen:
        where = settings.metrics.listen
        print(f"# metrics: http://{where}/metrics and http://{where}/healthz", file=sys.stderr)
    print(
        f"# config: {Path(os.path.abspath(resolve_config_path(args.config)))}: valid",
        file=sys.stderr,
    )
    if settings.api_key() is None:
        print(
            "# warning: no vast.ai API key found (vastd run will refuse to start)", file=sys.stderr
        )
    if args.online:
        import asyncio

        from vastd.orchestration.preflight import online_checks

        checks = asyncio.run(online_checks(settings))
        for ok, text in checks:
            print(f"# online: {'ok' if ok else 'FAILED'}: {text}", file=sys.stderr)
        if not all(ok for ok, _text in checks):
            return EXIT_FATAL
    return EXIT_OK


def cmd_submit(args: argparse.Namespace) -> int:
    from vastd.core.files import Layout, shown_name
    from vastd.core.submit import submit_files

    settings = _load(args)
    layout = Layout(settings.paths.root)
    failures = 0
    for src, result in submit_files(layout, [Path(f) for f in args.files]):
        if isinstance(result, Exception):
            failures += 1
            print(f"vastd submit: {shown_name(str(src))}: {result}", file=sys.stderr)
        else:
            print(result)
    return EXIT_FATAL if failures else EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from vastd.core.files import Layout
    from vastd.status import build_status, format_status, load_snapshot_readonly, status_json

    settings = _load(args)
    layout = Layout(settings.paths.root)

    def current() -> dict[str, object]:
        return build_status(
            layout,
            load_snapshot_readonly(layout),
            idle_timeout_s=settings.fleet.idle_timeout_s,
            all_instances=args.all,
        )

    if args.watch:
        return _watch(current, args.interval, as_json=args.json)
    status = current()
    print(status_json(status) if args.json else format_status(status))
    return EXIT_OK


def cmd_control(args: argparse.Namespace) -> int:
    """cancel, retry, drain, undrain: a request over the running daemon's control socket."""
    from vastd.control import ControlError, run_command

    settings = _load(args)
    if args.command in ("cancel", "retry"):
        payload: dict[str, object] = {"command": args.command, "jobs": args.jobs}
    else:
        payload = {"command": args.command, "instance": args.instance}
    try:
        code, lines = run_command(settings.paths.root, payload, f"vastd {args.command}")
    except ControlError as exc:
        print(f"vastd {args.command}: {exc}", file=sys.stderr)
        return EXIT_FATAL
    for ok, line in lines:
        print(line, file=sys.stdout if ok else sys.stderr)
    return code


def _watch(current: Callable[[], dict[str, Any]], interval_s: float, *, as_json: bool) -> int:
    """`status --watch`: redrawn in place on a terminal (ANSI), else a line per refresh."""
    import time

    from vastd.status import format_status, progress_bar, watch_line

    tty = sys.stdout.isatty() and not as_json
    try:
        while True:
            status = current()
            if as_json:
                print(json.dumps(status, sort_keys=True), flush=True)
            elif tty:
                screen = f"{progress_bar(status['progress'])}\n{format_status(status)}"
                stamp = time.strftime("%H:%M:%S")
                sys.stdout.write(
                    f"\x1b[H\x1b[2J{screen}\n(every {interval_s:g}s, {stamp}; Ctrl-C to stop)\n"
                )
                sys.stdout.flush()
            else:
                print(watch_line(status), flush=True)
            time.sleep(interval_s)
    except KeyboardInterrupt:
        if tty:
            sys.stdout.write("\n")
        return EXIT_OK


def cmd_jobs(args: argparse.Namespace) -> int:
    from vastd.core.files import Layout
    from vastd.views import format_jobs, job_rows, json_text, read_campaign

    if args.state is not None and args.state not in _STATES:
        print(
            f"vastd jobs: unknown state {args.state!r} (one of: {', '.join(_STATES)})",
            file=sys.stderr,
        )
        return EXIT_USAGE
    settings = _load(args)
    # Finished jobs are in history.jsonl alone: a state in flight needs only state.json.
    finished = args.state is None or args.state in ("done", "failed")
    campaign = read_campaign(Layout(settings.paths.root), history=finished)
    rows = job_rows(campaign, args.state)
    if args.json:
        print(json_text(rows))
    else:
        print(format_jobs(rows, campaign.daemon_running, campaign.snapshot.saved_at))
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from vastd.core.files import Layout
    from vastd.views import build_report, format_report, json_text, read_campaign

    settings = _load(args)
    layout = Layout(settings.paths.root)
    report = build_report(layout, read_campaign(layout))
    print(json_text(report) if args.json else format_report(report))
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from vastd.daemon import run_daemon
    from vastd.utils.logging import close_background_logging, setup_logging

    config_path = Path(os.path.abspath(resolve_config_path(args.config)))
    settings = _load(args)
    # Without a readable SSH key every instance's preparation would fail, for ever.
    problems = [
        p for p in check_files(settings) if p.startswith("ssh.key_file") and "mode" not in p
    ]
    if problems:
        raise ConfigError(problems)
    # A stdout slow to drain must not stop the loop: a thread writes the lines.
    setup_logging(args.log_level or settings.log.level, background=True)
    try:
        code = run_daemon(settings, config_path=config_path, log_level_override=args.log_level)
    finally:
        close_background_logging()
    # The interpreter may still wait for library threads (watchfiles' worker) after the
    # loop ended: a SIGINT then must still force the exit, not print a traceback.
    signal.signal(signal.SIGINT, _forced_exit)
    return code


def _forced_exit(_signum: int, _frame: object) -> None:
    from vastd.utils.logging import wait_background_logging

    wait_background_logging(timeout_s=1.0)
    os._exit(130)


def cmd_demo(args: argparse.Namespace) -> int:
    from vastd.demo import run_demo

    return run_demo(
        jobs=args.jobs,
        instances=args.instances,
        rows=args.rows,
        workdir=Path(args.workdir) if args.workdir else None,
    )


def format_config_error(exc: ConfigError) -> str:
    """One line for one problem; a list (every problem, one a line) for several."""
    if len(exc.problems) == 1:
        return f"vastd: invalid configuration: {exc.problems[0]}"
    return "vastd: invalid configuration:\n" + "\n".join(f"  {p}" for p in exc.problems)


COMMANDS = {
    "run": cmd_run,
    "submit": cmd_submit,
    "status": cmd_status,
    "jobs": cmd_jobs,
    "report": cmd_report,
    "check-config": cmd_check_config,
    "demo": cmd_demo,
    "cancel": cmd_control,
    "retry": cmd_control,
    "drain": cmd_control,
    "undrain": cmd_control,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command not in ("run", "demo"):
        # Warnings (e.g. a snapshot read from its backup) must not mix into stdout,
        # which carries `status --json` and `check-config` output.
        from vastd.utils.logging import setup_logging

        # Deferred: structlog is imported only if something logs (status stays quick).
        setup_logging("WARNING", stream=sys.stderr, deferred=True)
    try:
        code = COMMANDS[args.command](args)
        sys.stdout.flush()  # a reader gone is seen here, not in the interpreter's exit
        return code
    except ConfigError as exc:
        print(format_config_error(exc), file=sys.stderr)
        return EXIT_USAGE
    except StateManagementError as exc:
        # Not a config or argument mistake (exit 2): any other fatal error is exit 1.
        print(f"vastd: {exc}", file=sys.stderr)
        return EXIT_FATAL
    except VastdError as exc:
        print(f"vastd: {exc}", file=sys.stderr)
        return EXIT_FATAL
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`vastd status | head -1`): no traceback, and nothing more
        # written (the interpreter's own flush at exit would raise again).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_FATAL


if __name__ == "__main__":
    sys.exit(main())
