"""The one exception type that means "the user's input is wrong".

Every layer raises :class:`UserError` (or ``ValueError`` from the pure-math
layers) for bad input; the CLI turns it into one line on stderr and exit
code 2, never a traceback.
"""


class UserError(ValueError):
    """Bad input that the user can fix; the message names the input and the fix."""
