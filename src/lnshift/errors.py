"""Errors a user can act on: each names the file, option or value at fault."""


class LNShiftError(Exception):
    """Base class: the CLI prints these as one clear line instead of a traceback."""


class ConfigError(LNShiftError):
    """An option or config value is invalid."""


class DataError(LNShiftError):
    """A data source, split or image is unusable."""


class ModelError(LNShiftError):
    """A model name, weights file or architecture is unusable."""


class RunDirError(LNShiftError):
    """A run directory is missing, incomplete or would be overwritten."""
