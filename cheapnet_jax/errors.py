"""What the user must fix: the errors the command-line tools print as one ``error:`` line.

Every class here derives from `UserError`; anything else that escapes a tool is a bug and
keeps its traceback (`cheapnet_jax.cli.run`). The ``ValueError``/``RuntimeError`` bases keep
``except ValueError`` in callers' code working.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with what the user gave (data, checkpoint, settings, folder); the message
    names the file or the flag and says what was wrong."""


class DataError(UserError, ValueError):
    """Input data that cannot be used; the message names the file and the problem."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read or does not fit CheapNet."""


class SettingsError(UserError, ValueError):
    """Settings that cannot work together, or that differ from the run being resumed."""


class TrainingDivergedError(UserError, RuntimeError):
    """The loss or the parameters became NaN or infinite; the last good checkpoint is kept."""


class FolderInUseError(UserError, RuntimeError):
    """Another process holds the folder's lock: a second run would mix its files with ours."""


class MissingExtraError(UserError, ImportError):
    """A feature needs an optional dependency that is not installed; the message names the
    extra that installs it."""


class UnknownModelError(UserError, LookupError):
    """A model named that the inspector, the service or the population does not have; the
    message names those it has."""
