"""The one exception type for problems a user can fix (bad flags, bad files, bad data).

The command line turns a `KDError` into a one-line message and a non-zero exit; anything
else is a bug and keeps its traceback.
"""


class KDError(Exception):
    """A user-facing error whose message is one line that says what is wrong and how to fix it."""
