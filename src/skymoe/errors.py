"""User-facing error types.

Every error a user can cause (a bad config, a broken checkpoint, a wrong CLI argument) is raised as a
``SkymoeError`` whose message says what was wrong, where, and what to do. The CLI prints it on one
line and exits non-zero; library callers can catch it.
"""

import errno


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


_OS_ADVICE = {
    errno.ENOENT: "a directory on the path does not exist or cannot hold files; pick a path "
                  "in an existing, writable directory",
    errno.ENOTDIR: "a part of the path is a file, not a directory; pick another path",
    errno.EEXIST: "it exists already; pick another path or remove it",
    errno.EISDIR: "it is a directory; give a file path",
    errno.EACCES: "permission denied; pick a path you may write or change its permissions",
    errno.EPERM: "not permitted; pick a path you may write or change its permissions",
    errno.EROFS: "the file system is read-only; pick a path on a writable one",
    errno.ENOSPC: "the disk is full; free space (or pick another disk) and run again",
    errno.EDQUOT: "the disk quota is exhausted; free space (or pick another disk) and run again",
}


def describe_os_error(exc: OSError) -> str:
    """One line for a file-system failure: the path, the system's reason and what to do."""
    where = exc.filename if exc.filename is not None else "a file"
    if exc.filename2 is not None:
        where = f"{where} -> {exc.filename2}"
    reason = exc.strerror or str(exc)
    advice = _OS_ADVICE.get(exc.errno, "check the path and run again")
    return f"{where}: {reason}; {advice}"
