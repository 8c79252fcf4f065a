"""The one exception type for mistakes in the user's input (paths, flags, files), and how its messages list ids."""

from collections.abc import Sequence

SHOWN_IDS = 3


class WSSSError(Exception):
    """An error the user can fix: a missing folder, an undecodable image, a mismatching checkpoint.

    The message is a single line that names the file or flag at fault and says what to do.
    Scripts print it as ``error: <message>`` and exit with status 2, without a traceback.
    """


def first_ids(ids: Sequence[str], count: int = SHOWN_IDS) -> str:
    """The first ``count`` ids of a list for a one-line message: ``"a, b, c, ..."`` (no ``...`` when that is all)."""
    return ", ".join(ids[:count]) + (", ..." if len(ids) > count else "")
