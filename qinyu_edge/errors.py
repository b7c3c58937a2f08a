"""Errors a user can act on. Each message names the problem and the fix."""


class QinyuError(Exception):
    """Base class: the CLI prints these without a traceback."""


class ConfigError(QinyuError):
    """A config or preset is unknown or inconsistent."""


class CheckpointError(QinyuError):
    """A checkpoint folder or file is missing, partial or does not match the architecture."""


class TokenizerError(QinyuError):
    """The tokenizer lacks tokens the model needs."""


class BundleError(QinyuError):
    """A model bundle is missing, tampered with, or from another format version."""


class AudioInputError(QinyuError):
    """An audio file or stream cannot be used as input."""


class ContextFullError(QinyuError):
    """The prompt does not fit the context window."""
