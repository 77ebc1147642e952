"""The words of `aqueue run ...`, read into `RunArgs`.

Not argparse: importing it (with gettext) costs a worker about 0.4 MB that it keeps for its whole
life, measured in a drain's peak RSS, for a command line of one command and seven options.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

USAGE = ("usage: aqueue run module:queue [--concurrency N] [--prefetch N] [--shutdown-timeout S]\n"
         "                               [--no-scheduler] [-v | -q] [--logfile F]")

HELP = f"""{USAGE}

Run a worker for a queue: up to N jobs at once in one process, until SIGTERM or SIGINT.

arguments:
  module:queue          the Queue, as module:attribute (e.g. app:queue), imported with the
                        current directory on sys.path

options:
  --concurrency N       jobs at once (default 100)
  --prefetch N          jobs received ahead of free slots, leased to this worker while
                        they wait (default 0)
  --shutdown-timeout S  seconds running jobs get to finish on SIGTERM (default 30)
  --no-scheduler        do not promote delayed jobs or enqueue periodic ones
  -v, --verbose         log debug lines (every run of a job, as it ends)
  -q, --quiet           log warnings and errors only
  --logfile F           write aqueue's log to this file (not to stderr, nor to the
                        handlers of an app that sets up logging)
  -h, --help            show this help and exit

`aqueue --version` shows aqueue's version.
"""

VERSION = "version"  # what `parse` gives for `aqueue --version`


class UsageError(Exception):
    """The command line cannot be read; the message says why."""


@dataclass(frozen=True)
class RunArgs:
    target: str
    concurrency: int = 100
    prefetch: int = 0
    shutdown_timeout: float = 30.0
    no_scheduler: bool = False
    verbose: bool = False
    quiet: bool = False
    logfile: str | None = None


def _whole(option: str, least: int) -> Callable[[str], int]:
    def read(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise UsageError(f"{option}: expected a whole number, got {text!r}") from None
        if value < least:
            raise UsageError(f"{option} must be at least {least}, got {value}")
        return value
    return read


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"--shutdown-timeout: expected a number of seconds, got {text!r}") from None
    if math.isnan(value) or value < 0:
        raise UsageError(f"--shutdown-timeout must be 0 or more seconds, got {text!r}")
    return value


def _logfile(text: str) -> str:
    if not text:  # `--logfile=`: it logged to stderr, as if the option were not given
        raise UsageError("--logfile needs a file name")
    return text


# Options that take a value: the RunArgs field each sets, and how its text is read.
VALUED: dict[str, tuple[str, Callable[[str], object]]] = {
    "--concurrency": ("concurrency", _whole("--concurrency", 1)),
    "--prefetch": ("prefetch", _whole("--prefetch", 0)),
    "--shutdown-timeout": ("shutdown_timeout", _seconds),
    "--logfile": ("logfile", _logfile),
}
FLAGS = {"--no-scheduler": "no_scheduler", "--verbose": "verbose", "--quiet": "quiet", "--help": "help"}
SHORT = {"-v": "--verbose", "-q": "--quiet", "-h": "--help"}


def _long_name(word: str) -> str:
    """The option a word names: exactly, or by a prefix that fits one option only (as argparse)."""
    names = [*VALUED, *FLAGS]
    matches = [word] if word in names else [name for name in names if name.startswith(word)]
    if len(matches) != 1:
        raise UsageError(f"unknown option {word}")
    return matches[0]


def parse(argv: Sequence[str]) -> RunArgs | str | None:
    """The command line's settings; None when help was asked for, VERSION when the version was.
    Raises UsageError."""
    words = list(argv)
    if not words:
        raise UsageError("a command is required: run")
    if words[0] in ("-h", "--help"):
        return None
    if words == ["--version"]:
        return VERSION
    if words[0] != "run":
        raise UsageError(f"unknown command {words[0]!r} (the command is: run)")
    settings: dict[str, Any] = {}
    targets: list[str] = []
    rest = iter(words[1:])
    for word in rest:
        if word == "--":
            targets.extend(rest)
            break
        if not word.startswith("-") or word == "-":
            targets.append(word)
            continue
        word, equals, value = word.partition("=") if word.startswith("--") else (word, "", "")
        if word in SHORT:
            name = SHORT[word]
        elif word.startswith("--"):
            name = _long_name(word)
        else:
            raise UsageError(f"unknown option {word}")
        if name in FLAGS:
            if equals:
                raise UsageError(f"{name} takes no value")
            settings[FLAGS[name]] = True
            continue
        if not equals:
            following = next(rest, None)
            # An option in its place (`--logfile -v`) is an option forgotten its value, as in
            # argparse, not a file named "-v" (a negative number still reads as a value).
            if following is None or following.startswith("--") or following in SHORT:
                raise UsageError(f"{name} needs a value")
            value = following
        field, read = VALUED[name]
        settings[field] = read(value)
    if settings.pop("help", False):
        return None
    if not targets:
        raise UsageError("the queue to run is required, as module:attribute (e.g. app:queue)")
    if len(targets) > 1:
        raise UsageError(f"one queue at a time: got {', '.join(targets)}")
    if settings.get("verbose") and settings.get("quiet"):
        raise UsageError("-v/--verbose and -q/--quiet cannot be used together")
    return RunArgs(targets[0], **settings)
