"""The one exception type for mistakes a user can make (wrong file, wrong folder, bad parameter).

Every message names the problem and the fix. Code that catches it (the CLI, the ComfyUI nodes)
shows the message as is, without a traceback.
"""


class MagnetError(ValueError):
    """A user-caused problem: the message says what is wrong and how to fix it."""
