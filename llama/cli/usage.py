"""What every command line does with bad input: one `error: ...` line on stderr and exit code 2.

argparse's own reaction to a bad flag is a usage block and `prog: error: ...`; `ArgumentParser` here
raises `UsageError` instead, which the commands print as the same single line as any other bad input.
This module imports nothing heavy, so that a command can reject its flags before torch is imported.
"""
from __future__ import annotations

import argparse
import sys


class UsageError(ValueError):
    """A command line that argparse or our checks reject."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of argparse's usage block
        raise UsageError(f"{message} (see --help)")


def one_line(error: BaseException) -> str:
    """The error as one line. An OSError from the system is said as 'FILE: reason' (not '[Errno 13] ...')."""
    if isinstance(error, OSError) and error.strerror:
        text = f"{error.filename}: {error.strerror}" if error.filename else error.strerror
        if error.filename2:
            text += f" (and {error.filename2})"
    else:
        text = str(error) or type(error).__name__
    return " ".join(text.split("\n"))


def report(error: BaseException) -> int:
    """Print `error: ...` on one line to stderr; returns 2, the exit code of bad input."""
    print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
    return 2
