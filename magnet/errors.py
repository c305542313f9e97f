"""The one exception type for mistakes a user can make (wrong file, wrong folder, bad parameter).

Every message names the problem and the fix. Code that catches it (the CLI, the ComfyUI nodes)
shows the message as is, without a traceback.
"""


class MagnetError(ValueError):
    """A user-caused problem: the message says what is wrong and how to fix it."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (at most 300 characters; its type's name when empty), for
    messages that quote what a library said."""
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__
