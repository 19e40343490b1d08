"""How a ``kvpass`` subcommand ends: a user's mistake is one line on stderr and exit status 2, a bug a traceback.

A mistake is an error kvpass raises about its input (:class:`kvpass.KVPassError`, ``ValueError``), a file or folder
that cannot be read or written (``OSError``), or a package that is not installed. Anything else is a bug in kvpass
and keeps its traceback. ``KVPASS_DEBUG=1`` keeps the traceback of every error.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import NoReturn

from kvpass.errors import KVPassError

USAGE_ERROR = 2  # argparse's status for a bad command line: the same for bad input found later
INTERRUPTED = 130

__all__ = ["INTERRUPTED", "USAGE_ERROR", "Parser", "debug", "is_user_error", "one_line", "run_handler"]


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line too (no usage block; ``--help`` shows it), exit 2.

    Its subcommands' parsers are of this class as well (``add_subparsers`` copies the parser's class)."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def debug() -> bool:
    """``KVPASS_DEBUG`` is set (to anything but 0): show tracebacks."""
    return os.environ.get("KVPASS_DEBUG", "0") not in ("", "0")


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` is about the user's input or environment rather than a bug in kvpass."""
    if isinstance(err, ModuleNotFoundError):  # an optional package; kvpass's own modules missing is a broken install
        return not (err.name or "").startswith("kvpass")
    return isinstance(err, KVPassError | ValueError | OSError)


def one_line(err: BaseException, prog: str) -> str:
    """``err``'s message on one line, without a leading ``kvpass:``/``<prog>:`` (``prog`` prints it)."""
    text = str(err).split("\n\n")[0] or type(err).__name__  # Dynamo appends "from user code: ..." paragraphs
    text = " ".join(line.strip() for line in text.splitlines() if line.strip())
    for prefix in (f"{prog}: error: ", f"{prog}: ", "kvpass: "):
        if text.startswith(prefix):
            return text[len(prefix):]
    return text


def run_handler(handler: Callable[[argparse.Namespace], int | None], args: argparse.Namespace, prog: str) -> int:
    """Run a subcommand's handler; returns its exit status (2 after printing ``<prog>: error: <message>``)."""
    try:
        return int(handler(args) or 0)
    except KeyboardInterrupt:
        if debug():
            raise
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except Exception as err:
        if debug() or not is_user_error(err):
            raise
        sys.stdout.flush()
        print(f"{prog}: error: {one_line(err, prog)}", file=sys.stderr, flush=True)
        return USAGE_ERROR
