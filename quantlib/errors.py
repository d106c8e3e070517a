"""Errors that name what is wrong and what to do. Scripts print these without a traceback."""


class QuantlibError(Exception):
    """Base class: a user-facing problem (bad input, missing data), not a bug."""


class ConfigError(QuantlibError):
    """The configuration or a short name is invalid."""


class UnsupportedArchitecture(QuantlibError):
    """The model's architecture has no adapter."""


class DataError(QuantlibError):
    """A dataset is missing, unreadable or too small for what was asked."""


class NumericalError(QuantlibError):
    """A Hessian could not be made positive definite, or a result is not finite."""
