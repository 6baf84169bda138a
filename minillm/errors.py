"""The one error type for faults a user can fix.

Raised where the fault is known (a flag, a config, a file, a line of data, a checkpoint), with a
message that says what was wrong, where (file, line, field or flag) and what to do. The stage
scripts' `main_guard` prints it as one line and exits with status 2, never a traceback; anything
else that escapes is a bug in minillm and keeps its traceback.
"""


class UserError(ValueError):
    """A problem in the user's input: the message names what, where, and what to do.

    A ValueError, so code that caught ValueError from the library keeps working."""


class RunStopped(Exception):
    """A run that ended early on purpose: divergence, or an interrupt after its checkpoint was saved.
    `main_guard` prints the message (no traceback) and exits with `exit_code`."""
    exit_code = 1


class TrainingDiverged(RunStopped):
    """The loss or gradient norm stayed non-finite (--nan_policy stop), or the weights became so;
    nothing was saved, the previous checkpoint is intact."""
    exit_code = 3


class Interrupted(RunStopped):
    """SIGINT / SIGTERM: the current step finished and was saved; resume with --from_resume 1."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class NotFound(UserError, FileNotFoundError):
    """A file or folder the user named does not exist. Also a FileNotFoundError, so code that
    catches that (e.g. "no checkpoint yet: start fresh") keeps working."""


def require_file(path, what: str, todo: str = ""):
    """`path` as a Path when it is an existing file; else a UserError naming `what` (the flag or
    role, e.g. "--data_path"), the path, and `todo` (what to do, appended after "; ")."""
    from pathlib import Path
    path = Path(path)
    todo = f"; {todo}" if todo else ""
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder, not a file{todo}")
    if not path.is_file():
        raise NotFound(f"{what} {path} does not exist{todo}")
    return path
