"""The one base class of errors in what a user asked for (a flag, a file, a row): the CLI maps it to exit code 2."""
from __future__ import annotations


class UserError(ValueError):
    """A request featseq cannot serve as given; the message names the flag, file or row and the fix."""
