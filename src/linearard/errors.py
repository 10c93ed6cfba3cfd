"""The exceptions the command line turns into a one-line message and a non-zero exit."""


class UserError(Exception):
    """Bad input from the user: a missing file, an unknown name, a value out of range.

    The message must say what was wrong and, where it helps, what to do instead.
    """


class Interrupted(Exception):
    """A run stopped on SIGINT/SIGTERM after writing a checkpoint; `exit_code` is 128 + the signal."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
