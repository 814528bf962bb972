"""What determines an output's content: recorded in ``job.json``, compared before a run resumes into the output.

Fields that change what is stored (the model and its weights, mode, target, dtypes, preprocessing, explainers,
stored arrays, bank, evaluation) must equal those of the job that wrote the output; fields that only change how
fast it is written (batch size, workers, decode threads, prefetching, retries) may differ.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import fsspec

from pipeline.config import JobConfig
from pipeline.errors import CheckpointError, OutputMismatchError
from pipeline.store.output import JOB_FILE, Output

__all__ = ["changed_inputs", "check_resume", "checkpoint_digest", "fingerprint", "read_written_job"]


def checkpoint_digest(url: str | None) -> str | None:
    """SHA-256 of a checkpoint's tensors as loaded (names, dtypes, shapes, values; :func:`~pipeline.models.
    tensors_digest`): the same weights as .safetensors or as a torch file, wrapped or not, have the same digest.
    None without a checkpoint.

    Raises:
        CheckpointError: the checkpoint cannot be read or loaded safely.
    """
    if url is None:
        return None
    from pipeline.models import read_state_dict, tensors_digest

    return tensors_digest(read_state_dict(url))


def _file_digest(url: str) -> str:
    """SHA-256 of a checkpoint's bytes: what outputs of earlier versions recorded."""
    digest = hashlib.sha256()
    try:
        with fsspec.open(url, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    except OSError as e:
        raise CheckpointError(f"checkpoint {url} cannot be read: {e}") from e
    return "sha256:" + digest.hexdigest()


def fingerprint(job: JobConfig, checkpoint_sha256: str | None) -> dict[str, Any]:
    """The content-determining fields of ``job``, by their paths in a job file."""
    from pipeline.store.schemas import ZARR_LAYOUT_VERSION  # pyarrow: imported once the driver holds the lease

    data = job.model_dump(mode="json")
    bank, evaluation = data["bank"], data["evaluate"]
    bank_fields = ("shards", "path", "k", "temperature", "label_free", "exclude_self", "storage_dtype")
    return {
        "model.name": job.model.name,
        "model.kwargs": data["model"]["kwargs"],
        "model.num_classes": job.model.num_classes,
        "model.pretrained": job.model.pretrained,
        "model.checkpoint": checkpoint_sha256,
        "seed": job.seed,  # the weights of a model built without checkpoint or pretrained weights
        "mode": job.mode,
        "target": job.target,
        "dtype": job.dtype,
        "data.preprocess": job.data.preprocess,
        "data.decoder": job.data.decoder,
        "data.max_pixels": job.data.max_pixels,
        "explainers": data["explainers"],
        "output.arrays": data["output"]["arrays"],
        "output.dtype": job.output.dtype,
        "maps.zarr layout version": ZARR_LAYOUT_VERSION,  # absent (null) in outputs of layout 1
        "bank": None if bank is None else {k: bank[k] for k in bank_fields},
        "evaluate": None if evaluation is None else {k: v for k, v in evaluation.items() if k != "batch_size"},
    }


def read_written_job(output: Output) -> dict[str, Any] | None:
    """``OUT/job.json`` as written by the runner, or None."""
    try:
        with output.fs.open(output.path(JOB_FILE), "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None


def check_resume(output: Output, current: dict[str, Any], *, checkpoint: str | None = None) -> None:
    """Refuse to resume into an output written by a job with other content-determining fields.

    Args:
        output: The output.
        current: The fingerprint of the job that would resume it.
        checkpoint: The job's checkpoint: an output of an earlier version recorded the digest of its bytes, which
            still identifies the same file.

    Raises:
        OutputMismatchError: naming every field that differs, old and new values.
    """
    written = read_written_job(output)
    previous = None if written is None else written.get("fingerprint")
    if previous is None:
        return
    recorded = previous.get("model.checkpoint")
    changed = checkpoint is not None and recorded not in (None, current.get("model.checkpoint"))
    if changed and recorded == _file_digest(checkpoint):  # the very file an earlier version hashed
        current = {**current, "model.checkpoint": recorded}
    differing = [
        f"{name}: {_show(previous.get(name))} -> {_show(current.get(name))}"
        for name in dict.fromkeys([*previous, *current])
        if previous.get(name) != current.get(name)
    ]
    if differing:
        raise OutputMismatchError(
            f"output {output.url} was written by a job that differs in what it stores: {'; '.join(differing)}. "
            "Use a new output.path, or --overwrite to replace it"
        )


def changed_inputs(output: Output, done: list[str]) -> list[str]:
    """The shard URLs of done units whose shard is not the one they were computed from (same name, other samples),
    from the identity their markers recorded (:mod:`pipeline.data.identity`: a ``stat`` per shard; the member list
    of a shard of the same size and another stamp, a copy, from its headers)."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.data.identity import same_input
    from pipeline.store.units import read_marker, unit_name

    def changed(url: str) -> bool:
        marker = read_marker(output, unit_name(url)) or {}
        return not same_input(marker.get("input"), url)

    with ThreadPoolExecutor(16) as pool:
        flags = list(pool.map(changed, done))
    return [url for url, flag in zip(done, flags, strict=True) if flag]


def _show(value: Any) -> str:
    return json.dumps(value, sort_keys=True)
