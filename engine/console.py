"""What the command lines share: one-line errors with exit code 2, never a traceback, and text
that cannot drive the terminal.

Both ``msif`` halves (the explorer's and the pipeline's) use it, so that a wrong flag, a bad file
or a damaged study reads the same everywhere.
"""

from __future__ import annotations

import argparse
import sys
import traceback
import unicodedata
from collections.abc import Callable

USER_ERRORS = (ValueError, RuntimeError, OSError)  # StudyError is a RuntimeError, FactorMismatchError a ValueError


def terminal_safe(text: object) -> str:
    """Control and other invisible characters (ANSI escapes, carriage returns, bidi overrides) as
    visible escapes, so that printed text cannot move the cursor or recolour the terminal."""
    return "".join(c if c == " " or unicodedata.category(c)[0] not in "CZ" else
                   c.encode("unicode_escape").decode("ascii") for c in str(text))


def with_option(command: list[str], option: str, value: str) -> list[str]:
    """``command`` with ``option``'s value (``--out X`` or ``--out=X``) replaced by ``value``."""
    out = []
    for i, arg in enumerate(command):
        if i and command[i - 1] == option:
            arg = value
        elif arg.startswith(option + "="):
            arg = f"{option}={value}"
        out.append(arg)
    return out


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (``PROG: error: ... (see PROG --help)``), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {terminal_safe(message)} (see {self.prog} --help)\n")


def error_line(err: BaseException) -> str | None:
    """A user's error (bad input, a damaged study) as the one line a user sees; None for an
    unforeseen error, which is reported as an internal error instead."""
    if not isinstance(err, USER_ERRORS):
        return None
    return terminal_safe(str(err).splitlines()[0] if str(err) else type(err).__name__)


def run_command(name: str, run: Callable[[], int], verbose: bool = False) -> int:
    """Run a command; a user's error becomes one line on stderr and exit code 2, an unforeseen one
    a line that says so (the traceback only with --verbose)."""
    try:
        return run()
    except KeyboardInterrupt:
        raise
    except Exception as err:  # noqa: BLE001 - the one place a command's errors are turned into messages
        line = error_line(err)
        if line is not None:
            print(f"msif {name}: error: {line}", file=sys.stderr)
            return 2
        if verbose:
            traceback.print_exc()
        print(f"msif {name}: internal error ({type(err).__name__}: {terminal_safe(err)}); please report it"
              f"{'' if verbose else ' (run with -v for the traceback)'}", file=sys.stderr)
        return 1
