"""Exception types raised by sensorium.

Every error a user can cause with bad input derives from :class:`SensoriumError`, so the CLI can print
one clear line for it and Python callers can catch precisely what they expect.
"""


class SensoriumError(Exception):
    """Base class of every error sensorium raises for bad input or configuration."""


class CheckpointError(SensoriumError, ValueError):
    """A checkpoint exists but cannot be read: truncated, malformed or inconsistent."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The given checkpoint path does not exist or holds no recognised checkpoint."""


class UnsupportedCheckpointError(CheckpointError):
    """The checkpoint is readable but describes a model sensorium does not implement."""


class TokenizerError(SensoriumError, ValueError):
    """A tokenizer file is missing, malformed or of an unknown kind."""


class MediaError(SensoriumError, ValueError):
    """A media file or array cannot be decoded or has an unusable shape."""
