"""All exceptions of daam-pipeline.

Every error derives from :class:`PipelineError`; where a built-in exception has the same meaning the
subclass inherits it too, so callers can catch either. Messages name what is wrong and where it came from
(model name, shard URL, sample key, config field path).
"""

from __future__ import annotations

__all__ = [
    "AmbiguousSampleError",
    "BankError",
    "CheckpointError",
    "ClusterError",
    "ConfigError",
    "DecodeError",
    "DeviceError",
    "EmptyOutputError",
    "InputChangedError",
    "InputError",
    "JobTerminated",
    "LeaseLostError",
    "OutputInUseError",
    "OutputLookupError",
    "OutputMismatchError",
    "PipelineError",
    "SampleNotFoundError",
    "SchemaError",
    "ShardError",
    "ShardNotFoundError",
    "StoreError",
    "TargetError",
    "UnitFailedError",
    "UnsupportedModelError",
    "one_line",
]


class PipelineError(Exception):
    """Base class of every error raised by daam-pipeline."""


class UnsupportedModelError(PipelineError, TypeError):
    """The model cannot be explained by DAAM (no [class] token, no token attention, ...)."""


class InputError(PipelineError, ValueError):
    """Images that do not fit the model (rank, channels, size)."""


class TargetError(PipelineError, ValueError):
    """Explained classes or self-supervised weights that do not fit the batch or the model."""


class CheckpointError(PipelineError, ValueError):
    """A checkpoint that cannot be loaded safely or does not match the model."""


class ConfigError(PipelineError, ValueError):
    """An invalid job file; the message names the field path."""


class ShardError(PipelineError, ValueError):
    """A WebDataset shard that cannot be written or read as a whole."""


class ShardNotFoundError(ShardError, FileNotFoundError):
    """A shard pattern or URL that matches no file."""


class DecodeError(PipelineError, ValueError):
    """One sample that cannot be decoded; names the shard and the key."""

    def __init__(self, message: str, *, shard: str = "", key: str = "") -> None:
        super().__init__(message)
        self.shard = shard
        self.key = key


class SchemaError(PipelineError, ValueError):
    """Data that does not match the Arrow schemas or Zarr layout of :mod:`pipeline.store.schemas`."""


class StoreError(PipelineError, OSError):
    """An output store that cannot be opened, written or committed."""


class EmptyOutputError(StoreError):
    """An output with no committed unit to read (nothing run yet, a run in progress, or a folder that is no output)."""


class BankError(PipelineError, ValueError):
    """A memory bank that does not fit the query (too small, other feature size, missing)."""


class DeviceError(PipelineError, RuntimeError):
    """A device a worker cannot use (no GPU where the job asks for one, a GPU its process cannot open)."""


class UnitFailedError(PipelineError, RuntimeError):
    """A unit of work (one input shard) that failed after all retries."""


class OutputLookupError(PipelineError, LookupError):
    """A table, unit or sample that an output does not hold."""


class SampleNotFoundError(OutputLookupError):
    """Sample keys or a query that select no stored sample of an output."""


class AmbiguousSampleError(SampleNotFoundError):
    """A sample key that several units of an output hold, asked for without naming the unit."""


class OutputInUseError(PipelineError, RuntimeError):
    """Another driver holds the output's lease (a second run of the same job, or a resubmitted cluster job)."""


class LeaseLostError(PipelineError, RuntimeError):
    """This driver's lease on its output was taken by another driver (it was paused or cut off past the lease's
    ttl): its writers stop before writing anything more. Not a user error: the CLI exits 1."""


class InputChangedError(PipelineError, ValueError):
    """Units of an output that were computed from other input than the shards the job names now (same names)."""


class OutputMismatchError(PipelineError, ValueError):
    """An output written by a job whose content-determining fields differ from the job that would resume it."""


class ClusterError(PipelineError, ConnectionError):
    """The Ray cluster cannot be joined (nothing listening, a timeout, an authentication failure)."""


class JobTerminated(BaseException):
    """SIGTERM reached the driver: the job stops, in-flight units are abandoned to be redone by a rerun."""


def one_line(error: BaseException, *, with_type: bool = False) -> str:
    """An exception's message as one line: its first non-empty line (the type's name when it has none).

    Args:
        error: Any exception.
        with_type: Prefix the type's name (``OSError: No space left on device``), for errors of unknown kind.
    """
    line = next((text.strip() for text in str(error).splitlines() if text.strip()), "")
    if not line:
        return type(error).__name__
    return f"{type(error).__name__}: {line}" if with_type else line
