"""The one exception type for mistakes a user can fix; the CLI prints it without a traceback."""


class CharLMError(Exception):
    """A user-facing error: the message says what is wrong and how to fix it."""
