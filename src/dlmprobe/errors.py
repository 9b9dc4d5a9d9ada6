"""The one exception type for bad input from a user: arguments, files, models, configs.

Every check at a boundary (a CLI flag, a file the kit reads, a model it loads) raises
:class:`DlmprobeInputError` with one line that says what was expected and what was given. The CLI
turns exactly these into that line on stderr and exit code 2; anything else is a bug and keeps its
traceback. It subclasses :class:`ValueError` so code that catches ``ValueError`` keeps working.
"""


class DlmprobeInputError(ValueError):
    """Bad input from a user: the message is one line, what was expected and what was given."""
