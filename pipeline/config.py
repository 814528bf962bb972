"""The job file as validated, frozen models.

A job is YAML. Unknown keys are errors, and every error names its field path (``data.batch_size: ...``) and the
file. Relative paths in a job are resolved against the job file's folder, so jobs can ship beside their data.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    field_validator,
    model_validator,
)

from pipeline.errors import ConfigError

__all__ = [
    "BankConfig",
    "DataConfig",
    "ErrorPolicy",
    "JobConfig",
    "ModelConfig",
    "OutputConfig",
    "WorkersConfig",
    "load_job",
]


def _is_url(path: str) -> bool:
    return "://" in path


def _resolve(path: str, base: Path | None) -> str:
    """A local path relative to the job file becomes absolute; URLs stay as they are."""
    if _is_url(path) or base is None:
        return path
    expanded = Path(os.path.expandvars(os.path.expanduser(path)))
    return str(expanded if expanded.is_absolute() else (base / expanded).resolve())


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Section):
    """Which timm model to explain and where its weights come from."""

    name: str = Field(description="timm model name, optionally with a pretrained tag (vit_small_patch16_224.dino)")
    checkpoint: str | None = Field(None, description="local path or fsspec URL of .safetensors / torch weights")
    pretrained: bool = Field(False, description="download hub weights (machines with network access only)")
    num_classes: int | None = Field(None, ge=0, description="classifier size; 0 removes the head")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="more timm.create_model keyword arguments")


class DataConfig(_Section):
    """The input shards: units of work, one shard each."""

    shards: str | list[str] = Field(
        description="brace pattern (shard-{000000..000099}.tar), glob, list file (.txt, one URL per line) or list"
    )
    preprocess: Literal["resize", "crop"] = Field("resize", description="resize: the paper; crop: timm eval")
    decode_threads: int = Field(2, ge=1, description="decoder threads per worker")
    decoder: Literal["pil", "torchvision"] = Field(
        "pil",
        description="pil: PIL in decode_threads threads; torchvision: JPEGs decoded in batches on the worker's "
        "device (nvjpeg on a GPU), other files through PIL",
    )
    max_pixels: int = Field(89_478_485, ge=1, description="images with more pixels are refused as bombs")
    prefetch_batches: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        "auto",
        description="batches read and decoded ahead in a background thread; auto: 2 on a GPU, 0 on the CPU (where "
        "decoding and the model share the cores)",
    )


class BankConfig(_Section):
    """The k-NN memory bank of self-supervised DAAM (METHOD.md, dimension-wise importance weights)."""

    shards: str | list[str] | None = Field(None, description="reference shards the bank stage encodes")
    path: str | None = Field(None, description="bank location; default OUTPUT/bank.zarr")
    k: int = Field(20, ge=1)
    temperature: float = Field(0.07, gt=0)
    label_free: bool = Field(False, description="ignore labels: keep all k neighbours, no vote")
    exclude_self: bool = Field(False, description="a sample is never its own neighbour (explaining the bank's set)")
    chunk_size: int = Field(65536, ge=1, description="bank rows per device chunk")
    storage_dtype: Literal["float32", "float16"] = "float32"


class OutputConfig(_Section):
    path: str = Field(description="output location: a local folder or an fsspec URL")
    arrays: list[Literal["block_maps", "daam", "coefficients"]] = Field(
        default_factory=lambda: ["block_maps", "daam", "coefficients"], description="Zarr arrays to store"
    )
    dtype: Literal["float16", "float32", "bfloat16"] = "float16"
    compressor: Literal["zstd", "blosc", "none"] = "zstd"
    compression_level: int = Field(3, ge=0, le=22)


class WorkersConfig(_Section):
    num_gpus: int | Literal["auto"] = Field("auto", description="GPU actors (one per GPU); 0 runs on CPU actors")
    cpu_actors: int = Field(2, ge=1, description="actors when no GPU is available or num_gpus is 0")
    cpus_per_actor: float = Field(1, gt=0)
    max_retries: int = Field(2, ge=0, description="extra attempts for a unit whose actor died or that failed")
    actor_start_timeout_s: float = Field(300, gt=0, description="give up on an actor that does not start")
    units_in_flight: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto",
        description="units a worker holds at once, taking turns on its device while the others commit or prefetch; "
        "auto: 2 on a GPU, 1 on the CPU",
    )


class ErrorPolicy(_Section):
    max_failed_fraction: float = Field(
        1.0, ge=0, le=1, description="a unit whose failed-sample fraction exceeds this fails as a whole"
    )


def _evaluation(value: Any) -> Any:
    """The ``evaluate:`` section becomes pipeline.evaluate's EvaluationConfig (its own validation, one definition)."""
    from pipeline.evaluate import EvaluationConfig

    if value is None or isinstance(value, EvaluationConfig):
        return value
    try:
        return EvaluationConfig.from_dict(value)
    except ConfigError as e:
        raise ValueError(str(e)) from None


EvaluationSection = Annotated[
    Any, BeforeValidator(_evaluation), PlainSerializer(lambda v: v.to_dict() if v is not None else None)
]


class JobConfig(_Section):
    """A whole job; ``load_job`` builds it from YAML."""

    name: str = Field(description="job name, written to every output row")
    model: ModelConfig
    mode: Literal["supervised", "self-supervised"] = "supervised"
    target: Literal["predicted", "label"] = Field("predicted", description="supervised: class to explain")
    data: DataConfig
    bank: BankConfig | None = None
    batch_size: int = Field(64, ge=1)
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="autocast dtype of the model")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    output: OutputConfig
    workers: WorkersConfig = Field(default_factory=WorkersConfig)
    errors: ErrorPolicy = Field(default_factory=ErrorPolicy)
    evaluate: EvaluationSection = Field(
        None, description="localisation and deletion/insertion (pipeline.evaluate.EvaluationConfig fields)"
    )
    explainers: list[Literal["daam", "rollout", "attention", "gradcam"]] = Field(
        default_factory=lambda: ["daam"],
        description="daam, plus comparison explainers computed in the same pass: rollout, attention, gradcam",
    )
    seed: int = 0

    @field_validator("explainers")
    @classmethod
    def _daam_first(cls, value: list[str]) -> list[str]:
        if "daam" not in value:
            raise ValueError("must include 'daam'")
        if len(set(value)) != len(value):
            raise ValueError(f"names an explainer twice: {value}")
        return value

    @model_validator(mode="after")
    def _mode_fits(self) -> JobConfig:
        if self.mode == "self-supervised":
            if self.bank is None:
                raise ValueError("mode 'self-supervised' needs a `bank:` section")
            if self.target == "label":
                raise ValueError("target 'label' is for supervised mode; self-supervised explains <f, w>")
        elif self.bank is not None:
            raise ValueError("a `bank:` section is only used in mode 'self-supervised'")
        return self

    def shard_urls(self) -> list[str]:
        """The input shards in order; each one is a unit of work."""
        return expand_shards(self.data.shards, "data.shards")

    def bank_path(self) -> str:
        return self.bank.path if self.bank and self.bank.path else self.output.path.rstrip("/") + "/bank.zarr"


def expand_shards(spec: str | list[str], field: str) -> list[str]:
    """Expand a brace pattern, glob, list file or list into shard URLs (sorted where globbed)."""
    import braceexpand

    items = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for item in items:
        if item.endswith(".txt") and not _is_url(item):
            try:
                lines = Path(item).read_text().splitlines()
            except OSError as e:
                raise ConfigError(f"{field}: cannot read list file {item}: {e}") from e
            base = Path(item).parent
            urls += [_resolve(line.strip(), base) for line in lines if line.strip() and not line.startswith("#")]
            continue
        for pattern in braceexpand.braceexpand(item):
            if _is_url(pattern):
                import fsspec

                fs, _, paths = fsspec.get_fs_token_paths(pattern)
                matched = sorted(paths) if glob.has_magic(pattern) else [pattern]
                urls += [fs.unstrip_protocol(p) if glob.has_magic(pattern) else p for p in matched]
            elif glob.has_magic(pattern):
                urls += sorted(glob.glob(pattern))
            else:
                urls.append(pattern)
    if not urls:
        raise ConfigError(f"{field}: {spec!r} matches no shard")
    seen: set[str] = set()
    duplicates = [u for u in urls if u in seen or seen.add(u)]
    if duplicates:
        raise ConfigError(f"{field}: shard listed twice: {duplicates[0]}")
    return urls


def _resolve_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """Resolve local input paths against the job file's folder, output paths against the working directory."""

    def fix(section: str, key: str, base: Path) -> None:
        value = raw.get(section, {}).get(key) if isinstance(raw.get(section), dict) else None
        if isinstance(value, str):
            raw[section][key] = _resolve(value, base)
        elif isinstance(value, list):
            raw[section][key] = [_resolve(v, base) if isinstance(v, str) else v for v in value]

    for section, key in [("model", "checkpoint"), ("data", "shards"), ("bank", "shards")]:
        fix(section, key, base)
    # outputs are relative to where the job is started, like any command's output
    fix("output", "path", Path.cwd())
    fix("bank", "path", Path.cwd())
    return raw


def _format_errors(error: ValidationError, source: str) -> str:
    lines = [f"invalid job {source}:"]
    for item in error.errors():
        path = ".".join(str(p) for p in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if message.startswith(f"{path}.") or message.startswith(f"{path}:"):  # the message names a deeper field
            path, _, message = message.partition(" ")
            path = path.rstrip(":")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        elif item["type"] == "missing":
            message = "required key is missing"
        value = item.get("input")
        shown = f" (got {value!r})" if item["type"] not in ("missing", "extra_forbidden") and value is not None else ""
        lines.append(f"  {path}: {message}{shown}")
    return "\n".join(lines)


def parse_job(raw: dict[str, Any], *, source: str = "<job>", base: Path | None = None) -> JobConfig:
    """Validate a job given as a dict; paths are resolved against ``base`` when given."""
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid job {source}: the top level must be a mapping, got {type(raw).__name__}")
    if base is not None:
        raw = _resolve_paths({k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}, base)
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def load_job(path: str | Path, overrides: dict[str, Any] | None = None) -> JobConfig:
    """Read and validate a YAML job file.

    Args:
        path: The job file.
        overrides: Dotted keys replacing values of the file (``{"output.path": "/tmp/x"}``), as the CLI's --set.

    Raises:
        ConfigError: unreadable YAML, unknown keys, wrong types or values; the message names each field path.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read job file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"job file {path} is not valid YAML: {e}") from None
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return parse_job(raw, source=str(path), base=path.parent.resolve())
