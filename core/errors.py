"""The one exception type for mistakes in the user's input (paths, flags, files)."""


class WSSSError(Exception):
    """An error the user can fix: a missing folder, an undecodable image, a mismatching checkpoint.

    The message is a single line that names the file or flag at fault and says what to do.
    Scripts print it as ``error: <message>`` and exit with status 2, without a traceback.
    """
