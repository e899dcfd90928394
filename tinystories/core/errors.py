"""One error type for everything a user can get wrong.

The CLI prints a UserError as a single line and exits with status 2; anything else is a bug and keeps its
traceback.
"""


class UserError(Exception):
    """Bad input: a missing file, a wrong value, a file that is not what it claims to be."""
