"""Errors kood raises on bad input. Both are ValueErrors, so callers can catch either."""


class DataError(ValueError):
    """A data file, record or dataset directory is missing, corrupt or inconsistent."""


class ConfigError(ValueError):
    """A flag or argument is invalid, or flags do not fit together."""
