"""The one exception type for problems a user can fix (bad flags, bad files, bad data).

The command line turns a `KDError` into a one-line message and a non-zero exit; anything
else is a bug and keeps its traceback.
"""


class KDError(Exception):
    """A user-facing error whose message is one line that says what is wrong and how to fix it."""


def one_line(message: "BaseException | str", limit: int | None = None) -> str:
    """`message` on one line (whitespace runs become one space), cut to `limit` characters if given."""
    text = " ".join(str(message).split()) or type(message).__name__
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."


def short_list(names: "list[str] | tuple[str, ...]", limit: int = 5) -> str:
    """The first `limit` names, comma-separated, with a count of the rest."""
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")
