"""User-facing error types.

Every error a user can cause (a bad config, a broken checkpoint, a wrong CLI argument) is raised as a
``SkymoeError`` whose message says what was wrong, where, and what to do. The CLI prints it on one
line and exits non-zero; library callers can catch it.
"""


class SkymoeError(Exception):
    """Base class for errors caused by user input (files, configs, arguments)."""


class ConfigError(SkymoeError, ValueError):
    """An invalid or unsupported model configuration."""


class CheckpointError(SkymoeError):
    """A checkpoint directory or file that cannot be read or does not match the model."""


class DataError(SkymoeError):
    """A training corpus (file, directory, JSONL, Parquet) that cannot be read or is empty."""


class TrainingError(SkymoeError):
    """A training run that cannot go on (a non-finite loss, a run directory in the way)."""
