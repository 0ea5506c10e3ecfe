"""The two kinds of failure every command reports, and the exit codes the CLI gives them.

Every error the project raises for a user derives from one of these two, so `cli.py` catches exactly two bases and
prints one line: the message says which record, file or setting and why.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input or settings: a missing file, a malformed record file, an option out of range, a folder that does
    not fit the command (exit 2). Nothing was done."""


class DataError(RuntimeError):
    """The inputs were read but the run could not do its job: nothing usable in them, non-finite values (exit 1)."""


EXIT_CODES = ((InputError, 2), (DataError, 1))
