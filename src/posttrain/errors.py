"""The error contract: what a person at the terminal sees when an input is wrong.

Every error the project raises about something the user gave it (a data file, a flag or config
field, a model spec, a reward spec, a run directory to resume, a judge endpoint, an environment)
derives from :class:`UserError`. ``posttrain.cli.main`` catches exactly these: it prints one line,
``error: <message>``, to stderr and exits with status 2, without a traceback (``--debug`` or
``POSTTRAIN_DEBUG=1`` shows it). The message names the file, line and field, or the flag, and
says what to do. Any other exception is a bug or a fault outside the user's input: its traceback
is shown as Python shows it.

The project's error classes keep their historical built-in bases as well (``DataError`` is a
``ValueError``, ``ModelError`` a ``RuntimeError``), so code that caught those still does.
This module imports nothing from posttrain; every package may import it.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2
"""Exit status for a user error (as argparse uses for a bad flag)."""


class UserError(Exception):
    """Something the user gave is wrong or missing; the message says where and what to do."""


class ResumeError(UserError, RuntimeError):
    """A run cannot be resumed as asked: not a run, no complete checkpoint, or flags that
    cannot change mid-run; the message lists what differs."""


class RunLockedError(UserError, RuntimeError):
    """Another live process owns the run directory (its PID is in the message)."""
