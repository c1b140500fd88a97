"""Typed exceptions: every error a user can cause is one of these, with a one-line message."""


class KVServeError(Exception):
    """Base class: the CLI prints str(err) on one line and exits non-zero."""


class ConfigError(KVServeError, ValueError):
    """An engine or model setting is invalid."""


class ModelLoadError(KVServeError):
    """A model file or folder is missing, truncated or of an unsupported kind."""


class InvalidRequestError(KVServeError, ValueError):
    """A prompt or sampling parameter is invalid (empty prompt, too long, out-of-range value)."""


class EngineStepError(KVServeError):
    """A step failed for one request (the engine ran the others on without it)."""
