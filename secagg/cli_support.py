"""What both command-line tools share: exit statuses, one-line argument errors, help
that shows every default, and logging to stderr.

The exit statuses are defined here, once, and documented in the README
("Command line") and in the ``--help`` epilog of ``secagg-server`` and
``secagg-peer`` (both generated from :data:`EXIT_STATUS_MEANINGS`).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import textwrap
from collections.abc import Iterable, Mapping
from enum import IntEnum
from typing import NoReturn


class ExitStatus(IntEnum):
    """The exit statuses of ``secagg-server`` and ``secagg-peer``."""

    OK = 0
    FAILED = 1
    BAD_ARGUMENTS = 2  # argparse's own status for usage errors
    ROUND_ABORTED = 3
    LOST_SERVER = 4
    REJECTED = 5
    EXCLUDED = 6
    INTERRUPTED = 130  # 128 + SIGINT, as shells report it


EXIT_STATUS_MEANINGS: Mapping[ExitStatus, str] = {
    ExitStatus.OK: "every round ended ok (for a peer: with its input in the aggregate)",
    ExitStatus.FAILED: "an error that is none of the below (e.g. the port is taken, the "
                       "input does not match the round's --dim)",
    ExitStatus.BAD_ARGUMENTS: "bad arguments or configuration (one line on stderr)",
    ExitStatus.ROUND_ABORTED: "a round aborted (e.g. fewer than --threshold peers "
                              "survived); the later rounds still ran",
    ExitStatus.LOST_SERVER: "the coordinator could not be reached, stopped answering, or "
                            "the connection to it was lost (it died, or stopped before this "
                            "peer's last round)",
    ExitStatus.REJECTED: "the coordinator rejected this peer (e.g. its id is taken)",
    ExitStatus.EXCLUDED: "a round ended ok without this peer's input (it was dropped, e.g. "
                         "its shares or masked input came too late)",
    ExitStatus.INTERRUPTED: "interrupted (SIGINT or SIGTERM)",
}

SERVER_EXIT_STATUSES = (ExitStatus.OK, ExitStatus.FAILED, ExitStatus.BAD_ARGUMENTS,
                        ExitStatus.ROUND_ABORTED, ExitStatus.INTERRUPTED)
PEER_EXIT_STATUSES = tuple(ExitStatus)
PEER_EXIT_NOTE = ("Over several rounds a peer exits with the most severe status of its "
                  "rounds (3 over 6 over 0); 4 and 5 stop it at once.")

# Order in which a peer reports the rounds of a session: its exit status is the most
# severe status of any round (the ones that stop it, LOST_SERVER and REJECTED, end it).
SEVERITY = (ExitStatus.OK, ExitStatus.EXCLUDED, ExitStatus.ROUND_ABORTED,
            ExitStatus.REJECTED, ExitStatus.LOST_SERVER, ExitStatus.FAILED,
            ExitStatus.BAD_ARGUMENTS, ExitStatus.INTERRUPTED)


def worse(a: ExitStatus, b: ExitStatus) -> ExitStatus:
    """The more severe of two statuses (see :data:`SEVERITY`)."""
    return a if SEVERITY.index(a) >= SEVERITY.index(b) else b


EPILOG_WIDTH = 78


def exit_status_epilog(statuses: Iterable[ExitStatus],
                       overrides: Mapping[ExitStatus, str] | None = None,
                       note: str = "") -> str:
    """The ``exit status:`` section of a tool's ``--help``, wrapped to 78 columns."""
    meanings = {**EXIT_STATUS_MEANINGS, **(overrides or {})}
    lines = ["exit status:"]
    for status in statuses:
        lines += textwrap.wrap(meanings[status], width=EPILOG_WIDTH,
                               initial_indent=f"  {int(status):>3}  ",
                               subsequent_indent=" " * 7)
    if note:
        lines.append("")
        lines += textwrap.wrap(note, width=EPILOG_WIDTH, initial_indent="  ",
                               subsequent_indent="  ")
    return "\n".join(lines)


class HelpFormatter(argparse.HelpFormatter):
    """Help with every option's default; a description or epilog with line breaks is
    kept as written (one without is wrapped).

    An option taking a value gets ``(default: X)`` unless its help already says what
    happens by default; a required option gets ``(required)``. Flags need neither.
    """

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if not action.option_strings or action.nargs == 0 or "(default" in text:
            return text
        if action.required:
            return f"{text} (required)"
        if action.default is None or action.default is argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)"


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, not a usage dump, with status 2."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def error(self, message: str) -> NoReturn:
        self.exit(int(ExitStatus.BAD_ARGUMENTS), f"{self.prog}: error: {message}\n")


def os_error_text(exc: OSError) -> str:
    """An OSError as one readable line: which file or address, and what went wrong."""
    if exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or exc}"
    return re.sub(r"^\[Errno \d+\] ", "", str(exc)) or type(exc).__name__


VERBOSE_HELP = ("-v: log each phase; -vv: also debug details and websocket connections "
                "(never vectors, frames or secrets)")


class _AlreadyPrinted(logging.Filter):
    """Drops log records that repeat a line the command-line tool prints itself."""

    def __init__(self, patterns: Iterable[tuple[str, str]]) -> None:
        super().__init__()
        self._patterns = [(name, re.compile(regex)) for name, regex in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(record.name == name and pattern.search(record.getMessage())
                       for name, pattern in self._patterns)


def configure_logging(verbosity: int, already_printed: Iterable[tuple[str, str]] = ()) -> None:
    """Log to stderr: warnings; INFO with ``-v``; DEBUG with ``-vv``.

    The ``websockets`` loggers (a line per connection opened or closed) stay at
    WARNING unless ``-vv``, and then go to INFO only: their DEBUG level logs frames.
    ``already_printed`` lists (logger name, message regex) pairs of library log lines
    that the tool reports itself, so that each event is printed once.
    """
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 \
        else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    logging.getLogger("websockets").setLevel(logging.INFO if verbosity >= 2
                                             else logging.WARNING)
    duplicates = _AlreadyPrinted(already_printed)
    for handler in logging.getLogger().handlers:
        handler.addFilter(duplicates)


def raise_open_file_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit; return the new soft
    limit. Every peer link and every coordinator client is one descriptor, and the usual
    soft limit (1,024) is far below the usual hard one; a process may raise it unaided."""
    import resource  # POSIX only; imported here so the rest of the module stays portable

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            logging.getLogger("secagg").warning(
                "cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
    return soft
