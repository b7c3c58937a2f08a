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


class OutputError(QinyuError):
    """An output path cannot be written (a folder, read-only, full, or an unknown audio format)."""


class PromptError(QinyuError, ValueError):
    """User text or a role that cannot go into a prompt (e.g. it holds reserved control tokens).
    Also a ValueError, which the prompt builder raised before it had its own class."""
