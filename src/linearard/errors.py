"""The one exception type the command line turns into a one-line message and a non-zero exit."""


class UserError(Exception):
    """Bad input from the user: a missing file, an unknown name, a value out of range.

    The message must say what was wrong and, where it helps, what to do instead.
    """
