"""The one error of the data layer."""


class DataError(ValueError):
    """A dataset that cannot be used as given (missing folders, no classes, empty classes, labels that do not fit)."""
