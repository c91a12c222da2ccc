"""The one root of every error a user can fix, and its kinds.

An error that derives from `UserError` is the user's to fix (a config, the data, a damaged or missing input, the
machine); its message is one line naming the file, key or value at fault. The launcher prints it as one `error:` line
and exits with the code of its `kind` (the mapping lives in launch.py alone). Any other exception from the pipeline
is a bug of ours: the launcher prints its traceback and saves a crash log.

Raise the kind where the condition is known: a config check raises `UserConfigError` (configs.py turns a config
dataclass's own ValueError into one), a bad file raises `UserInputError` naming it, a full disk or a refused
permission raises `UserEnvironmentError` naming the path.
"""

import contextlib
import errno
import typing

Kind = typing.Literal["config", "input", "environment"]
"""What the user has to fix: "config" (a config file, key or value), "input" (the data, a dataset, an artifact or
file that is missing, damaged or not what the pipeline writes), "environment" (the machine: a full disk, a refused
permission, a lock held by another process, Slurm unreachable or refusing a job)."""


class UserError(Exception):
    """Something the user can fix; the message (one line) names the file, key or value at fault."""

    kind: typing.ClassVar[Kind] = "input"
    """What the user has to fix (see `Kind`); the launcher maps it to an exit code."""


class UserConfigError(UserError):
    """A config file, key or value is wrong (malformed, out of range, inconsistent with another key)."""

    kind: typing.ClassVar[Kind] = "config"


class UserInputError(UserError):
    """The data or an input file is wrong: a malformed dataset, a missing, damaged or foreign artifact or file."""

    kind: typing.ClassVar[Kind] = "input"


class UserEnvironmentError(UserError):
    """The machine refused: a full disk, a permission, a lock held by another process, Slurm."""

    kind: typing.ClassVar[Kind] = "environment"


ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS})
"""The OSError numbers that are the machine refusing (disk or quota full, permission denied, read-only file system),
not a bug of ours."""


@contextlib.contextmanager
def machine_refusals(what: str) -> typing.Iterator[None]:
    """Within it, an OSError whose errno is in `ENVIRONMENT_ERRNOS` (the machine refused) becomes a
    `UserEnvironmentError` naming `what` (e.g. the stage) and the file; any other OSError passes as it is (a bug)."""
    try:
        yield
    except OSError as err:
        if isinstance(err, UserError) or err.errno not in ENVIRONMENT_ERRNOS:
            raise
        raise UserEnvironmentError(f"{what}: {err}") from err
