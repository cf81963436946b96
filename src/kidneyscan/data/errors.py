"""The one error type of the data layer, below every reader so that all of them can raise it."""


class DataError(ValueError):
    """A data file or folder is unusable; the message names the path and the reason."""
