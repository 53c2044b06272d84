"""Errors that are the user's to fix: the CLI prints them as one line and exits non-zero."""


class YodaError(Exception):
    """Base class of every error caused by input, options, or files (not by a bug)."""


class InputError(YodaError):
    """An input image, mask or manifest cannot be used as given."""


class GridMismatchError(InputError):
    """Images that must share one voxel grid do not."""


class ModelError(YodaError):
    """A model directory is missing, damaged, foreign, or does not fit the request."""


class ConfigError(YodaError):
    """An option or configuration value is invalid."""
