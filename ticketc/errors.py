"""The one exception type the CLI turns into a one-line message and exit code 2."""


class UserError(ValueError):
    """Bad input from the user: a missing file, a wrong flag, a model we cannot handle.

    The message is one line that names the offending value; the CLI prints it without a
    traceback and exits with code 2. Everything else that escapes is an internal error (exit 1).
    """
