"""The one error type for faults a user can fix.

Raised where the fault is known (a flag, a config, a file, a line of data, a checkpoint), with a
message that says what was wrong, where (file, line, field or flag) and what to do. The stage
scripts' `main_guard` prints it as one line and exits with status 2, never a traceback; anything
else that escapes is a bug in minillm and keeps its traceback.
"""


class UserError(ValueError):
    """A problem in the user's input: the message names what, where, and what to do.

    A ValueError, so code that caught ValueError from the library keeps working."""
