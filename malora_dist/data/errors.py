"""The data's own error, raised by every reader and mapping below the pipeline."""


class DataError(ValueError):
    """A problem with the data itself (a bad line or record, an empty task); names where it is."""
