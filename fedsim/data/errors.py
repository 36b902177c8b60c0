"""The one exception type for user-facing data problems."""


class DataError(RuntimeError):
    """A dataset cannot be loaded; the message names the file, what was expected and how to get it."""
