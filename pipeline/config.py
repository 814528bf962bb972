"""The job file as validated, frozen models: every rule of a job lives here.

A job is YAML. Unknown keys are errors, and every error names its field path (``data.batch_size: ...``) and the
file. Relative paths in a job are resolved against the job file's folder, so jobs can ship beside their data. The
store and the evaluation read their options from these models (:class:`StoreOptions`, :class:`EvaluationConfig`),
so each name and each rule exists once. Importing this module imports neither torch nor pandas.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import ConfigError
from pipeline.names import (
    COMPARISON_EXPLAINERS,
    COMPRESSORS,
    COMPUTE_DTYPES,
    ENGINE_ARRAYS,
    EXPLAINER_ARRAYS,
    EXPLAINERS,
    MAP_ARRAYS,
    METRIC_GROUPS,
    PERTURBATION_BASELINES,
    PERTURBATION_PROTOCOLS,
    REFERENCE_MAPS,
    SANITY_CHECKS,
    STORE_DTYPES,
)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "BankConfig",
    "DataConfig",
    "ErrorPolicy",
    "EvaluationConfig",
    "JobConfig",
    "ModelConfig",
    "OutputConfig",
    "StoreOptions",
    "WorkersConfig",
    "expand_shards",
    "is_url",
    "load_job",
    "package_path",
    "parse_job",
]


def is_url(path: str) -> bool:
    """Whether a shard or output location is a URL (fsspec's ``proto://`` or WebDataset's ``pipe:``)."""
    return "://" in path or path.startswith("pipe:")


DEFAULT_MAX_PIXELS = 89_478_485
"""PIL's ``Image.MAX_IMAGE_PIXELS``: larger images are refused as decompression bombs (``data.max_pixels``)."""

PACKAGE_PREFIX = "package:"
"""Input paths of shipped jobs start with it: ``package:demo/assets/...`` is a file of the installed package."""


def package_path(relative: str) -> str:
    """A file of the installed ``pipeline`` package (a wheel or a source checkout alike)."""
    from importlib.resources import files

    return str(files("pipeline").joinpath(relative))


def _resolve(path: str, base: Path | None) -> str:
    """``package:`` paths become files of the package; a local path relative to the job file becomes absolute;
    URLs stay as they are."""
    if path.startswith(PACKAGE_PREFIX):
        return package_path(path.removeprefix(PACKAGE_PREFIX))
    if is_url(path) or base is None:
        return path
    expanded = Path(os.path.expandvars(os.path.expanduser(path)))
    return str(expanded if expanded.is_absolute() else (base / expanded).resolve())


class _Section(BaseModel):
    """A frozen part of the job. Built on its own (``EvaluationConfig(steps=0)``) it raises ConfigError, naming
    the field under the section's place in a job file (``evaluate.steps``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    section: ClassVar[str] = ""

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise ConfigError(_format_errors(e, self.section or type(self).__name__, prefix=self.section)) from None

    # Validation (model_validate, nested sections) keeps pydantic's own init and errors: only a direct call wraps.
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]


class ModelConfig(_Section):
    """Which timm model to explain and where its weights come from."""

    section: ClassVar[str] = "model"
    name: str = Field(
        min_length=1, description="timm model name, optionally with a pretrained tag (vit_small_patch16_224.dino)"
    )
    checkpoint: str | None = Field(None, description="local path or fsspec URL of .safetensors / torch weights")
    pretrained: bool = Field(False, description="download hub weights (machines with network access only)")
    num_classes: int | None = Field(None, ge=0, description="classifier size; 0 removes the head")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="more timm.create_model keyword arguments")


def _check_braces(pattern: str) -> str:
    import braceexpand

    try:
        braceexpand.braceexpand(pattern)  # parses the whole pattern at once, expands lazily
    except braceexpand.UnbalancedBracesError as e:
        raise ValueError(f"malformed brace pattern {pattern!r}: {e}") from None
    return pattern


def _distinct(value: Any) -> Any:
    if len(set(value)) != len(value):
        raise ValueError(f"names an array twice: {list(value)}")
    return value


ShardSpec = Annotated[str, Field(min_length=1)]


class DataConfig(_Section):
    """The input shards: units of work, one shard each."""

    section: ClassVar[str] = "data"
    shards: ShardSpec | list[ShardSpec] = Field(
        description="brace pattern (shard-{000000..000099}.tar), glob, list file (.txt, one URL per line) or list"
    )
    preprocess: Literal["resize", "crop"] = Field("resize", description="resize: the paper; crop: timm eval")
    decode_threads: int = Field(2, ge=1, description="decoder threads per worker")
    decoder: Literal["pil", "torchvision"] = Field(
        "pil",
        description="pil: PIL in decode_threads threads; torchvision: JPEGs decoded in batches on the worker's "
        "device (nvjpeg on a GPU), other files through PIL",
    )
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="images with more pixels are refused as bombs")
    prefetch_batches: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        "auto",
        description="batches read and decoded ahead in a background thread; auto: 2 on a GPU, 0 on the CPU (where "
        "decoding and the model share the cores)",
    )

    @field_validator("shards")
    @classmethod
    def _braces_balance(cls, value: str | list[str]) -> str | list[str]:
        for item in [value] if isinstance(value, str) else value:
            _check_braces(item)
        return value


class BankConfig(_Section):
    """The k-NN memory bank of self-supervised DAAM (docs/method.md, dimension-wise importance weights)."""

    section: ClassVar[str] = "bank"
    shards: ShardSpec | list[ShardSpec] | None = Field(None, description="reference shards the bank stage encodes")
    path: str | None = Field(
        None,
        description="bank location: written by the bank stage (default OUTPUT/bank.zarr), or an existing bank "
        "(pipeline.store.bank.write_bank, `daam-pipeline bank import`) when bank.shards is not given",
    )
    k: int = Field(20, ge=1)
    temperature: float = Field(0.07, gt=0)
    label_free: bool = Field(False, description="ignore labels: keep all k neighbours, no vote")
    exclude_self: bool = Field(False, description="a sample is never its own neighbour (explaining the bank's set)")
    chunk_size: int = Field(65536, ge=1, description="bank rows per device chunk")
    storage_dtype: Literal["float32", "float16"] = "float32"

    @field_validator("shards")
    @classmethod
    def _braces_balance(cls, value: str | list[str] | None) -> str | list[str] | None:
        for item in [] if value is None else [value] if isinstance(value, str) else value:
            _check_braces(item)
        return value


class _Storage(_Section):
    dtype: Literal[STORE_DTYPES] = Field(
        "float16",
        description="precision of the stored maps, always float32 arrays: float16 rounds each value to float16's 11 "
        "significant bits (within 2^-11 = 4.9e-4 of itself, with float32's range; compresses to about float16's "
        "size), float32 stores exact values",
    )
    compressor: Literal[COMPRESSORS] = Field(
        "blosc",
        description="compressor of each chunk: blosc (zstd after a bit shuffle, byte shuffle for float32; the "
        "smallest for rounded float16-precision values), zstd or none",
    )
    compression_level: int = Field(3, ge=0, le=22)
    chunk_rows: int = Field(
        16,
        ge=1,
        description="samples per compressed chunk inside a unit's shard: reading one sample decompresses one chunk "
        "of each array (16 vit_small samples: ~0.4 MB of float32 daam), while scans read whole shards and "
        "chunks this size already compress as well as larger ones",
    )


class StoreOptions(_Storage):
    """How a unit's maps are stored: the job's ``output`` storage fields and every array it stores."""

    section: ClassVar[str] = "output"
    arrays: tuple[Literal[MAP_ARRAYS], ...] = Field(ENGINE_ARRAYS, description="arrays stored per sample")

    _distinct_arrays = field_validator("arrays")(_distinct)


class OutputConfig(_Storage):
    """Where and how the results are written."""

    section: ClassVar[str] = "output"
    path: str = Field(description="output location: a local folder or an fsspec URL")
    arrays: list[Literal[ENGINE_ARRAYS]] = Field(
        default_factory=lambda: list(ENGINE_ARRAYS), description="DAAM arrays to store (explainers' maps always are)"
    )

    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec options for output.path (and the bank), passed to every worker, e.g. {endpoint_url: "
        "'http://minio:9000', profile: 'lab'}; job.json records them with secret values hidden",
    )
    compact: bool = Field(
        True,
        description="at the end of a run that committed units, merge the per-unit tables into a few files under "
        "tables/ (what readers open first); 'daam-pipeline compact OUT' does it on demand",
    )

    _distinct_arrays = field_validator("arrays")(_distinct)


class WorkersConfig(_Section):
    section: ClassVar[str] = "workers"
    num_gpus: int | Literal["auto"] = Field("auto", description="GPU actors (one per GPU); 0 runs on CPU actors")
    cpu_actors: int = Field(2, ge=1, description="actors when no GPU is available or num_gpus is 0")
    cpus_per_actor: float = Field(1, gt=0)
    max_retries: int = Field(2, ge=0, description="extra attempts for a unit whose actor died or that failed")
    retry_backoff_s: float = Field(
        1.0, ge=0, description="a unit's first retry waits this long, each next one twice as long as the one before"
    )
    actor_start_timeout_s: float = Field(300, gt=0, description="give up on an actor that does not start")
    unit_timeout_s: float | None = Field(
        600,
        gt=0,
        description="a unit with no progress (no batch read or computed) for this long is cancelled, its worker "
        "replaced and the unit retried (null: never)",
    )
    connect_timeout_s: float = Field(60, gt=0, description="give up joining a Ray cluster (--address) after this")
    lease_ttl_s: float = Field(
        60,
        gt=0,
        description="the driver's lease on its output is renewed every ttl/3 s; a killed driver's lease expires "
        "after this, and a second driver is refused while it is valid",
    )
    units_in_flight: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto",
        description="units a worker reads and computes at once, taking turns on its device while the others "
        "prefetch; auto: 2 on a GPU, 1 on the CPU",
    )
    commits_in_flight: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        "auto",
        description="units a worker commits at once while it computes the next ones, each held in memory until its "
        "data is written (at most this many: a worker waits on storage only when they all are); 0 commits before "
        "the next unit starts. auto: 2 on an object store, 1 on a file system",
    )


class ErrorPolicy(_Section):
    section: ClassVar[str] = "errors"
    max_failed_fraction: float = Field(
        1.0, ge=0, le=1, description="a unit whose failed-sample fraction exceeds this fails as a whole"
    )


DEFAULT_METRIC_GROUPS = ("localisation", "segmentation", "faithfulness")
"""The metric groups of an ``evaluate:`` section that names none: every group but ``perturbation``, whose forward
passes make an evaluating job about 1.55 times as long (README, "Evaluation cost")."""


class EvaluationConfig(_Section):
    """What the evaluation computes per batch (:func:`pipeline.evaluate.evaluate_batch`) and which sanity check the
    job runs (:mod:`pipeline.sanity`)."""

    section: ClassVar[str] = "evaluate"
    steps: int = Field(16, ge=1, strict=True, description="deletion/insertion steps; the curves have steps + 1 points")
    baseline: Literal[PERTURBATION_BASELINES] = Field(
        "blur",
        description="what removed patches become in deletion/insertion and patch-level perturbation "
        "(pipeline.evaluate.baseline_images): blur, zero (the normalised image's zero: the dataset mean colour), "
        "mean (the image's mean colour) or black (zero of the unnormalised [0, 1] image)",
    )
    protocol: Literal[PERTURBATION_PROTOCOLS] = Field(
        "patch",
        description="positive/negative perturbation: patch (whole patches of the map's grid replaced by `baseline`, "
        "the explained class followed) or chefer (Chefer et al.'s published code: pixels of the bilinearly "
        "upsampled map set to black, top-1 scored against the shard's label)",
    )
    batch_size: int = Field(64, ge=1, strict=True, description="perturbed images per forward pass")
    metrics: tuple[Literal[tuple(METRIC_GROUPS)], ...] = Field(
        DEFAULT_METRIC_GROUPS,
        description="localisation (pointing game, box energy), segmentation (pixel accuracy, mIoU and mAP against "
        "the shards' masks), faithfulness (deletion/insertion), perturbation (positive/negative perturbation AUC, "
        "Chefer et al. 2021; opt-in: it adds 1 + 18 M forward passes per image for M maps to deletion/insertion's "
        "2 + 30 M, about 1.55 times an evaluating job's time, benchmarks/evaluation.py)",
    )
    references: tuple[Literal[REFERENCE_MAPS], ...] = Field(
        REFERENCE_MAPS, description="reference maps evaluated beside the explainers"
    )
    seed: int = Field(
        0, strict=True, description="seed of the random reference maps (one stream per unit) and the randomised weights"
    )
    sanity: Literal[SANITY_CHECKS] | None = Field(
        None,
        description="cascading: re-explain `sanity_samples` samples with the model's blocks randomised from the top "
        "down, one more block at a time, and store how similar each map stays (Adebayo et al. 2018)",
    )
    sanity_samples: int = Field(
        32, ge=1, strict=True, description="samples the sanity check re-explains, the first ok ones of each unit"
    )

    @field_validator("metrics", "references")
    @classmethod
    def _canonical(cls, value: tuple[str, ...], info: Any) -> tuple[str, ...]:
        order = tuple(METRIC_GROUPS) if info.field_name == "metrics" else REFERENCE_MAPS
        return tuple(name for name in order if name in value)  # canonical order, no repeats

    @property
    def faithfulness(self) -> bool:
        return "faithfulness" in self.metrics

    @property
    def perturbation(self) -> bool:
        return "perturbation" in self.metrics

    @property
    def segmentation(self) -> bool:
        return "segmentation" in self.metrics

    @property
    def columns(self) -> tuple[str, ...]:
        """The metric columns filled for every evaluated method."""
        return tuple(column for group in self.metrics for column in METRIC_GROUPS[group])


class JobConfig(_Section):
    """A whole job; ``load_job`` builds it from YAML."""

    name: str = Field(min_length=1, description="job name, written to every output row")
    model: ModelConfig
    mode: Literal["supervised", "self-supervised"] = "supervised"
    target: Literal["predicted", "label"] = Field("predicted", description="supervised: class to explain")
    data: DataConfig
    bank: BankConfig | None = None
    batch_size: int = Field(64, ge=1)
    dtype: Literal[COMPUTE_DTYPES] = Field("float32", description="autocast dtype of the model")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: a GPU where the worker sees one, else the CPU; cuda: a GPU or an error"
    )
    output: OutputConfig
    workers: WorkersConfig = Field(default_factory=WorkersConfig)
    errors: ErrorPolicy = Field(default_factory=ErrorPolicy)
    evaluate: EvaluationConfig | None = Field(
        None, description="localisation, segmentation, deletion/insertion and perturbation scores; sanity checks"
    )
    explainers: list[Literal[EXPLAINERS]] = Field(
        default_factory=lambda: ["daam"],
        description="daam, plus comparison explainers (rollout, attention, gradcam and gae in DAAM's pass, attnlrp and "
        "cplrp in one of their own): " + ", ".join(COMPARISON_EXPLAINERS),
    )
    seed: int = 0

    @field_validator("explainers")
    @classmethod
    def _daam_once(cls, value: list[str]) -> list[str]:
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
                raise ValueError("target: 'label' is for supervised mode; self-supervised explains <f, w>")
            if self.evaluate is not None and (self.evaluate.faithfulness or self.evaluate.perturbation):
                raise ValueError(
                    "evaluate.metrics: deletion/insertion ('faithfulness') and positive/negative perturbation "
                    "('perturbation') follow the probability of an explained class, and a self-supervised job "
                    "explains <f, w>; use metrics: [localisation, segmentation]"
                )
            if self.evaluate is not None and self.evaluate.sanity is not None:
                raise ValueError(
                    "evaluate.sanity: the sanity check explains the trained model's class with randomised blocks; a "
                    "self-supervised job's <f, w> comes from a memory bank of the trained model's features"
                )
        elif self.bank is not None:
            raise ValueError("bank: a `bank:` section is only used in mode 'self-supervised'")
        return self

    @property
    def comparison_explainers(self) -> tuple[str, ...]:
        """The explainers beside DAAM, in the job's order."""
        return tuple(name for name in self.explainers if name != "daam")

    @property
    def store_options(self) -> StoreOptions:
        """How the maps are stored: the output's storage fields, DAAM's arrays and every comparison explainer's."""
        storage = self.output.model_dump(exclude={"path", "arrays", "compact", "storage_options"})
        explainers = (array for name in self.comparison_explainers for array in EXPLAINER_ARRAYS[name])
        return StoreOptions(**storage, arrays=(*self.output.arrays, *explainers))

    def shard_urls(self) -> list[str]:
        """The input shards in order; each one is a unit of work."""
        return expand_shards(self.data.shards, "data.shards")

    def bank_path(self) -> str:
        return self.bank.path if self.bank and self.bank.path else self.output.path.rstrip("/") + "/bank.zarr"


def expand_shards(spec: str | list[str], field: str) -> list[str]:
    """Expand a brace pattern, glob, list file or list into shard URLs (sorted where globbed).

    Raises:
        ConfigError: a malformed pattern, an unreadable list file, no match, or a shard listed twice.
    """
    import braceexpand

    items = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for item in items:
        if item.endswith(".txt") and not is_url(item):
            try:
                lines = Path(item).read_text().splitlines()
            except OSError as e:
                raise ConfigError(f"{field}: cannot read list file {item}: {e.strerror}") from None
            base = Path(item).parent
            urls += [_resolve(line.strip(), base) for line in lines if line.strip() and not line.startswith("#")]
            continue
        try:
            patterns = list(braceexpand.braceexpand(item))
        except braceexpand.UnbalancedBracesError as e:
            raise ConfigError(f"{field}: malformed brace pattern {item!r}: {e}") from None
        for pattern in patterns:
            if pattern.startswith("pipe:"):
                urls.append(pattern)
            elif is_url(pattern):
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


def _resolve_paths(raw: dict[str, Any], base: Path | None) -> dict[str, Any]:
    """Resolve ``package:`` paths, local input paths against the job file's folder (``base``; None: left
    relative) and output paths against the working directory."""

    def fix(section: str, key: str, base: Path | None) -> None:
        value = raw.get(section, {}).get(key) if isinstance(raw.get(section), dict) else None
        if isinstance(value, str):
            raw[section][key] = _resolve(value, base)
        elif isinstance(value, list):
            raw[section][key] = [_resolve(v, base) if isinstance(v, str) else v for v in value]

    for section, key in [("model", "checkpoint"), ("data", "shards"), ("bank", "shards")]:
        fix(section, key, base)
    # outputs are relative to where the job is started, like any command's output
    fix("output", "path", None if base is None else Path.cwd())
    fix("bank", "path", None if base is None else Path.cwd())
    return raw


def _format_errors(error: ValidationError, source: str, *, prefix: str = "") -> str:
    lines = [f"invalid job {source}:" if not prefix else f"invalid {source}:"]
    for item in error.errors():
        path = ".".join(str(p) for p in (prefix, *item["loc"]) if p != "") or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        head, _, rest = message.partition(": ")
        if rest and " " not in head and (path == "(top level)" or head.startswith(path)):
            path, message = head, rest  # the message names the field itself
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        elif item["type"] == "missing":
            message = "required key is missing"
        value = item.get("input")
        shown = (
            f" (got {value!r})"
            if item["type"] not in ("missing", "extra_forbidden") and value is not None and not isinstance(value, dict)
            else ""
        )
        lines.append(f"  {path}: {message}{shown}")
    return "\n".join(lines)


def parse_job(raw: dict[str, Any], *, source: str = "<job>", base: Path | None = None) -> JobConfig:
    """Validate a job given as a dict; paths are resolved against ``base`` when given."""
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid job {source}: the top level must be a mapping, got {type(raw).__name__}")
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
    if raw is None:
        raise ConfigError(f"job file {path} is empty: a job is a mapping with at least model, data and output")
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid job {path}: the top level must be a mapping, got {type(raw).__name__}")
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[leaf] = value
    return parse_job(raw, source=str(path), base=Path(os.path.abspath(path.parent)))  # symlinks kept: ../ as typed
