"""The one kind of error a user can fix, and the one way every command reports it.

A `UserError` says what is wrong (the key, file, flag or source) and how to fix it. Every command catches it at its
top (`@command`), prints it as one line, `error: <message>`, and exits with status 2: never a traceback. The
subclasses name the part that raised it, so a caller can handle one kind and let the others through (generate.py's
--compare goes on past an unreadable checkpoint).
"""

import functools
import sys
from typing import Callable

EXIT_USER_ERROR = 2


class UserError(ValueError):
    """A problem the user can fix; the message names it and the fix."""


class ConfigError(UserError):
    """A config problem: the message names the key path and what is expected."""


class DataError(UserError):
    """A data problem (a source, a shard, a tokenizer): the message names the file, source or key, and the fix."""


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt or does not fit its config: the message names the file."""


class ChatError(UserError):
    """A conversation or tokenizer that cannot be used for chat: the message says what is wrong and where."""


class RemoteError(UserError):
    """A bucket or object that cannot be used (missing, unreachable, refused): the message names it and the fix."""


class InputError(UserError):
    """A problem with a command's flags or input (a device, a prompt, a file)."""


def say_error(e: UserError) -> int:
    """Print a UserError as the one line a user reads; -> the exit status for it."""
    print(f"error: {e}", file=sys.stderr, flush=True)
    return EXIT_USER_ERROR


def command(main: Callable[..., int]) -> Callable[..., int]:
    """Decorate a command's main(): a UserError raised anywhere below it becomes one line and exit status 2."""
    @functools.wraps(main)
    def guarded(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except UserError as e:
            return say_error(e)
    return guarded


class TrainingError(RuntimeError):
    """The run cannot go on (too many non-finite steps, weights that hold NaN, uploads that failed): not a bad
    input but a failed run, so its exit status is 1. The message says why and what to try."""


class StoppedAtOnce(KeyboardInterrupt):
    """A second Ctrl-C: the run stops where it is, without saving; the message names the newest checkpoint."""
