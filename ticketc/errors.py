"""The one exception type the CLI turns into a one-line message and exit code 2, and the one
way an underlying error is quoted inside such a line."""

import re


class UserError(ValueError):
    """Bad input from the user: a missing file, a wrong flag, a model we cannot handle.

    The message is one line that names the offending value; the CLI prints it without a
    traceback and exits with code 2. Everything else that escapes is an internal error (exit 1).
    """


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (terminal colour codes removed), at most
    `limit` characters; a longer line (a whole paragraph, as torch's zip reader writes) is cut
    to its first sentence first. The exception's type name when the message is empty."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines()
    if not text:
        return type(e).__name__
    line = text[0]
    if len(line) > limit:
        line = line.split(". ")[0]
    return line[:limit]
