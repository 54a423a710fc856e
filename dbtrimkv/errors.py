"""Errors a user can act on.

Why: bad input (a missing image, an unreadable video, an unknown model, a budget that cannot
hold the protected tokens, a wrong checkpoint) must reach the user as one clear sentence, not as
a traceback from deep inside torch. Everything the library raises for such cases derives from
`DBTrimKVError`; the CLI prints its message on one line and exits with status 2.
"""


class DBTrimKVError(Exception):
    """Base class: the message names the problem and, where possible, the fix."""


class MediaError(DBTrimKVError, ValueError):
    """An image or video that is missing, unreadable or corrupt."""


class PromptError(DBTrimKVError, ValueError):
    """Chat messages in the wrong shape (not a string or a list of role/content messages)."""


class ModelLoadError(DBTrimKVError, OSError):
    """A model name or directory that cannot be resolved or is not supported."""


class CheckpointError(DBTrimKVError, ValueError):
    """A gate checkpoint in the wrong format (keys, shapes, pickled objects)."""


class ConfigError(DBTrimKVError, ValueError):
    """An invalid eviction or training configuration."""


class IntegrationError(DBTrimKVError, RuntimeError):
    """The installed transformers no longer calls the hooks the way dbtrimkv expects (version mismatch)."""


class CacheFileError(DBTrimKVError, ValueError):
    """A saved compressed cache that cannot be read: missing, corrupt, or of another format version."""


class CacheMismatchError(CacheFileError):
    """A saved compressed cache made for another model (layers, KV heads, head size, dtype or weights)."""
