"""The run configuration: one pydantic model tree, loaded from YAML plus dotted command-line overrides.

Every problem is reported as one line naming the field, the value given and the rule broken
(`ConfigError.problems`); the commands print them and exit with code 2.
"""

from __future__ import annotations

import difflib
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PlainValidator, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from platform.data import DataError, check_omniglot_source, default_omniglot_source
from platform.images import CHANNELS, ImageFormat
from platform.published import BENCHMARKS, NATIVE_SIZE
from platform.splits import TASK_SPLITS, images_per_class, split_sizes

VECTORIZABLE = ("maml", "fomaml", "anil", "metasgd")  # algorithms with a vmap path (resources.vectorize)
# Algorithms that adapt in an embedding (no classifier head of task.ways outputs, no inner steps): any ways.
EMBEDDING_ALGORITHMS = ("protonet", "pretrain")
RAY_RESOURCE_UNIT = 0.0001  # Ray refuses fractions of a CPU or GPU finer than this
MIN_CONV_IMAGE_SIZE = 16  # the conv models pool 2x2 four times
MAX_SEED = 2**32 - 1  # NumPy's RandomState and Optuna's sampler (tune) take no larger seed; torch none above 2**64 - 1
# The password of a URL: scheme://user:<password>@host (up to the last "@" before the path).
_URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s/:@]*:)[^\s/]*@")


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads exponent floats without a dot (`1e-3`, YAML 1.2) as floats, not strings."""


class _Dumper(yaml.SafeDumper):
    """SafeDumper that quotes strings `_Loader` would read as floats, so `to_yaml()` output loads back equal."""


for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver(
        "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
    )


class ConfigError(Exception):
    """Bad configuration: one human-readable line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True, allow_inf_nan=False)


class TaskConfig(_Section):
    kind: Literal[("sinusoid", "omniglot", "folder", *BENCHMARKS)] = Field(
        "sinusoid",
        description="sinusoid regression, Omniglot, your own folder of images, or a published benchmark (platform.published)",
    )
    ways: int = Field(5, gt=0, description="classes per task (classification)")
    shots: int = Field(10, gt=0, description="support examples per class (K)")
    query: int = Field(10, gt=0, description="query examples per class")
    split: Literal["standard", "background"] = Field(
        "standard", description="Omniglot class split: standard (1200/423 characters) or background (alphabets)"
    )
    data: str | None = Field(
        None,
        description=(
            "Omniglot: folder, https URL or s3:// URI ($METAPLATFORM_OMNIGLOT or the official download when null); "
            "folder: root/<class>/<image>; a published benchmark: the folder holding it in its published layout"
        ),
    )
    classes: dict[Literal[TASK_SPLITS], list[str]] | None = Field(
        None,
        description=(
            "folder: the class folders of each split, {train: [...], val: [...], test: [...]} (null: 70/15/15 by a "
            "fixed permutation); train shares no class with val or test, which may share classes"
        ),
    )
    image_size: int = Field(
        28, gt=0, description="images are resized to image_size x image_size pixels (a benchmark's own by default)"
    )
    channels: Literal[CHANNELS] = Field(
        1,
        description="1: grayscale (inverted unless task.invert is false); 3: RGB as it is (a benchmark's default)",
    )
    invert: bool = Field(
        True,
        description="task.channels 1: invert gray levels, so dark ink on light paper is high (Omniglot's way)",
    )
    mean: tuple[float, ...] | None = Field(
        None, description="per-channel mean the model subtracts from pixels in [0, 1] (null: none); with std"
    )
    std: tuple[float, ...] | None = Field(
        None, description="per-channel standard deviation the model divides by after the mean (null: none)"
    )
    crop_padding: int = Field(
        0, ge=0, description="training tasks: a random crop of each image padded by this many black pixels (0: off)"
    )
    flip: bool = Field(False, description="training tasks: flip each image horizontally with probability 1/2")

    @model_validator(mode="before")
    @classmethod
    def _benchmark_format(cls, data: Any) -> Any:
        """A published benchmark's images default to its own size, in RGB (84x84; 32x32 for the CIFAR ones)."""
        if isinstance(data, dict) and data.get("kind") in NATIVE_SIZE:
            return {"image_size": NATIVE_SIZE[data["kind"]], "channels": 3, **data}
        return data

    @property
    def image_format(self) -> ImageFormat:
        return ImageFormat(self.image_size, self.channels, self.invert)


class ModelConfig(_Section):
    kind: Literal["mlp", "conv4", "resnet12"] = "mlp"
    width: int = Field(
        40,
        gt=0,
        description="hidden units (mlp), filters (conv4), or resnet12's first stage (64: 64-160-320-640 channels)",
    )
    bn_stats: Literal["batch", "support"] = Field(
        "batch",
        description=(
            "BatchNorm statistics for query predictions: batch (of the queries, the papers' transductive "
            "protocol) or support (of the task's support set, so each query is predicted on its own)"
        ),
    )
    dropblock: float = Field(
        0.0,
        ge=0,
        lt=1,
        description=(
            "resnet12's training-time regularisation as MetaOptNet's: dropout with this rate after stages 1-2, "
            "DropBlock (5x5 blocks) after stages 3-4; 0: off (MetaOptNet and RFS use 0.1). Masks are drawn per "
            "task from its seed, so a run stays bitwise the same on any number of workers; never at test time"
        ),
    )
    recompute: bool = Field(
        False,
        description=(
            "activation checkpointing: keep only each block's input and recompute the block in the backward "
            "passes (inner and outer, second order included): less memory for deep backbones, more compute; "
            "the same bits"
        ),
    )
    precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description=(
            "the body's arithmetic: fp32, or bf16 mixed precision (autocast: convolutions and matrix products "
            "in bfloat16, parameters, gradients and the head in float32); bf16 is for GPUs with bfloat16 units"
        ),
    )
    init_from: str | None = Field(
        None,
        description=(
            "a pretrain checkpoint (file, folder or s3://) whose body initialises this episodic run's "
            "(Meta-Baseline: protonet from the pre-trained embedding); null: from the seed"
        ),
    )


def _chunk_size(value: Any) -> int | str:
    # One rule in one message, where a union type would report a failure per member.
    if value == "auto" or (type(value) is int and value > 0):
        return value
    raise PydanticCustomError("chunk_size", "a number of tasks (a whole number > 0) or 'auto'")


class OptimConfig(_Section):
    inner_lr: float = Field(0.01, gt=0, description="eta: inner-loop learning rate (initial value for metasgd)")
    outer_lr: float = Field(0.001, gt=0, description="lambda: outer (meta) learning rate")
    inner_steps: int = Field(1, gt=0, description="inner steps in meta-training")
    test_inner_steps: int = Field(10, ge=0, description="inner steps at meta-validation and meta-test")
    meta_batch: int = Field(25, gt=0, description="tasks per meta-iteration")
    iterations: int = Field(1500, gt=0)
    first_order: bool = Field(False, description="drop second-order terms (maml, anil, metasgd)")
    outer_optimizer: Literal["adam", "sgd"] = "adam"
    schedule: Literal["constant", "cosine"] = Field("constant", description="outer learning-rate schedule")
    grad_clip: float | None = Field(None, gt=0, description="clip the meta-gradient's global norm")
    chunk: Annotated[int | Literal["auto"], PlainValidator(_chunk_size)] = Field(
        "auto",
        description=(
            "tasks per gradient chunk; chunks are summed in order, so results do not depend on the number of live "
            "workers; auto: one chunk per configured worker (resources.workers), sizes differing by at most one"
        ),
    )


class ResourcesConfig(_Section):
    workers: int = Field(2, gt=0, description="adaptation actors")
    min_workers: int = Field(
        1,
        gt=0,
        description="carry on with this many actors while lost ones cannot be re-placed (results are unchanged)",
    )
    cpus_per_worker: float = Field(1.0, ge=RAY_RESOURCE_UNIT, description="fractions down to 0.0001 (Ray's unit)")
    gpus_per_worker: float = Field(0.0, ge=0)
    vectorize: Literal["auto", "loop", "vmap"] = Field(
        "auto",
        description=(
            "how a worker computes a chunk of tasks: loop (one task after another, fastest for conv4 on CPU), "
            "vmap (one batched computation); auto: vmap on a GPU and for the MLP, loop for conv4 on CPU"
        ),
    )
    execution: Literal["auto", "ray", "local"] = Field(
        "auto",
        description=(
            "where the meta-gradient is computed: ray (actors), local (in the driver process, on its CPU, "
            "no Ray); auto: local for the MLP on one machine when no cluster is asked for (RAY_ADDRESS, "
            "a Ray job or Tune trial), else ray"
        ),
    )
    placement: Literal["SPREAD", "PACK"] = "SPREAD"
    worker_timeout_s: float = Field(600.0, gt=0, description="a worker silent this long on one call is treated as dead")
    start_timeout_s: float = Field(120.0, gt=0, description="how long to wait for workers to be placed and started")
    data_timeout_s: float = Field(
        1800.0,
        gt=0,
        description=(
            "how long a started worker may take to load the task data: on a new node the first one "
            "downloads it and builds the node's image cache; past it, a data error (not restarted)"
        ),
    )
    max_worker_failures: int = Field(20, ge=0, description="stop the run after this many worker failures")


class CheckpointConfig(_Section):
    dir: str = Field("checkpoints/run", description="local folder or s3://bucket/prefix")
    every: int = Field(500, gt=0)
    keep: int = Field(3, gt=0)
    resume: bool = False
    write_timeout_s: float = Field(
        600.0,
        gt=0,
        description="how long a final checkpoint keeps retrying unreachable storage before the run gives up on it",
    )


class EvalConfig(_Section):
    every: int = Field(500, ge=0, description="meta-validate every N iterations (0: never)")
    tasks: int = Field(100, gt=0, description="meta-validation tasks")


class TrackingConfig(_Section):
    mlflow: bool = Field(True, description="log the run to MLflow")
    uri: str | None = Field(
        None,
        description=(
            "MLflow tracking URI; null: $MLFLOW_TRACKING_URI, else the embedded store "
            "sqlite:///<working dir>/mlruns.db with artifacts in <working dir>/mlartifacts"
        ),
    )
    experiment: str = Field("metaplatform", min_length=1, description="MLflow experiment name")
    run_name: str | None = Field(None, description="MLflow run name (null: MLflow picks one)")
    tags: dict[str, str] = Field({}, description="extra MLflow run tags")
    register_as: str | None = Field(
        None, min_length=1, description="register the final model as a new version of this registered model"
    )
    log_every: int = Field(20, gt=0, description="send training metrics to MLflow every N iterations")
    flush_timeout_s: float = Field(
        30.0,
        ge=0,
        description="at the end, how long to wait for an unreachable server before leaving the records in the spool",
    )
    prometheus_port: int = Field(
        0, ge=0, le=65535, description="serve Prometheus metrics on this port of the driver (0: off)"
    )


class PretrainConfig(_Section):
    """algorithm pretrain (RFS): a classifier over all meta-training classes, trained with mini-batches on
    Ray Train (platform/pretrain.py) for optim.iterations SGD steps; tasks are then solved in its embedding."""

    batch_size: int = Field(64, gt=0, description="images per SGD step, split equally over resources.workers")
    lr: float = Field(0.05, gt=0, description="SGD learning rate (at step 0 with schedule cosine)")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(5e-4, ge=0, description="L2 weight decay")
    schedule: Literal["constant", "cosine"] = Field("cosine", description="learning rate over optim.iterations")
    probe: Literal["logistic", "centroid"] = Field(
        "logistic",
        description="test-time classifier on the frozen, L2-normalised embedding: logistic regression fitted "
        "on the support set (RFS) or the nearest class centroid",
    )


class RunConfig(_Section):
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seeds the model's initialisation and every task")
    task: TaskConfig = TaskConfig()
    model: ModelConfig = ModelConfig()
    algorithm: Literal["maml", "fomaml", "reptile", "protonet", "anil", "metasgd", "pretrain"] = "maml"
    optim: OptimConfig = OptimConfig()
    pretrain: PretrainConfig = PretrainConfig()
    resources: ResourcesConfig = ResourcesConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    eval: EvalConfig = EvalConfig()
    log_every: int = Field(50, gt=0, description="print a progress line every N iterations")
    tracking: TrackingConfig = TrackingConfig()

    @property
    def classification(self) -> bool:
        return self.task.kind != "sinusoid"

    @property
    def first_order(self) -> bool:
        """Whether the outer gradient drops second-order terms: asked for, or the algorithm's own (decided here only)."""
        return self.optim.first_order or self.algorithm in ("fomaml", "reptile")

    def to_yaml(self, redact: bool = True) -> str:
        """The config as YAML that loads back equal; URL passwords replaced by *** unless `redact` is False."""
        return yaml.dump(self.redacted() if redact else self.model_dump(mode="json"), Dumper=_Dumper, sort_keys=False)

    def redacted(self) -> dict[str, Any]:
        """The config as plain data (`model_dump(mode="json")`) with every string passed through `redact`:
        what may be shown or stored where others read it (logs, MLflow parameters)."""
        return _redact_strings(self.model_dump(mode="json"))


def redact(text: str) -> str:
    """`text` with the password of every URL in it replaced by ***: "postgresql://u:***@db/mlflow"."""
    return _URL_PASSWORD.sub(r"\g<head>***@", text)


def _redact_strings(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _redact_strings(v) for k, v in value.items()}
    return value


def _dotted_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += _dotted_keys(annotation, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def field_annotation(key: str) -> Any:
    """The type annotation of the dotted key's field, e.g. float for 'optim.inner_lr'."""
    model: type[BaseModel] = RunConfig
    *sections, name = key.split(".")
    for section in sections:
        model = model.model_fields[section].annotation
    return model.model_fields[name].annotation


def is_key(key: str) -> bool:
    return key in _dotted_keys(RunConfig)


def with_values(config: RunConfig, values: dict[str, Any], source: str = "config") -> RunConfig:
    """`config` with dotted keys set to `values`, validated and checked like a loaded config."""
    data = config.model_dump(mode="json")
    for key, value in values.items():
        _set(data, key, value)
    return _validated(data, source)


def _unknown_key(key: str, where: str) -> str:
    close = difflib.get_close_matches(key, _dotted_keys(RunConfig), n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"{where}: unknown key '{key}'{hint}"


def _validation_problems(error: ValidationError, source: str) -> list[str]:
    problems = []
    for e in error.errors():
        field = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            problems.append(_unknown_key(field, source))
        else:
            problems.append(f"{source}: {field} = {e['input']!r}: {e['msg']}")
    return problems


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError([f"{path}: cannot read config file: {e.strerror}"]) from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError([f"{path}: YAML syntax error{where}: {getattr(e, 'problem', None) or e}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: top level must be a mapping of sections, got {type(data).__name__}"])
    return data


def _apply_override(data: dict[str, Any], override: str) -> str | None:
    """Set `a.b.c=value` in `data` (value parsed as YAML); returns a problem line or None."""
    key, sep, raw = override.partition("=")
    if not sep or not key:
        return f"override '{override}': expected key=value, e.g. optim.inner_lr=0.4"
    mapping, _, entry = key.rpartition(".")
    if entry and mapping in _dotted_keys(RunConfig) and typing.get_origin(field_annotation(mapping)) is dict:
        _set(data, key, raw)  # one entry of a mapping of strings: `tracking.tags.team=vision`
        return None
    if key not in _dotted_keys(RunConfig):
        fields = [k for k in _dotted_keys(RunConfig) if k.startswith(key + ".")]
        if fields:  # a whole section: `optim=...`
            return f"override '{override}': '{key}' is a section, not a key; set one of its keys, e.g. {fields[0]}=..."
        return _unknown_key(key, f"override '{override}'")
    try:
        value = yaml.load(raw, Loader=_Loader) if raw else None
    except yaml.YAMLError:
        value = raw
    _set(data, key, value)
    return None


def _set(data: dict[str, Any], key: str, value: Any) -> None:
    """data[a][b][c] = value for key 'a.b.c', making the sections that are missing."""
    node = data
    *parents, leaf = key.split(".")
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[leaf] = value


def _validated(data: dict[str, Any], source: str, problems: list[str] = ()) -> RunConfig:
    """`data` as a RunConfig, checked across fields; ConfigError with `problems` and every new one."""
    problems = list(problems)
    try:
        config = RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(problems + _validation_problems(e, source)) from None
    problems += [f"{source}: {p}" for p in check(config)]
    if problems:
        raise ConfigError(problems)
    return config


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """YAML file (or the embedded defaults) plus `key=value` overrides, validated and checked."""
    source = str(path) if path else "config"
    data = _read_yaml(Path(path)) if path else {}
    # Every problem is reported at once: bad overrides, then bad fields, then cross-field rules.
    problems = [p for p in (_apply_override(data, o) for o in overrides) if p]
    return _validated(data, source, problems)


def check(config: RunConfig) -> list[str]:
    """Rules that span fields (pydantic checks each field on its own), and the data set as far as it
    can be checked cheaply here (no image is read), so that bad input never gets as far as Ray."""
    problems = _task_problems(config) if config.classification else _regression_problems(config)
    o, r = config.optim, config.resources
    if r.vectorize == "vmap" and config.algorithm not in VECTORIZABLE:
        problems.append(
            f"resources.vectorize = 'vmap': not available for algorithm {config.algorithm!r} "
            f"(only {', '.join(VECTORIZABLE)}); use 'auto' or 'loop'"
        )
    if config.model.kind == "mlp" and (config.model.recompute or config.model.precision != "fp32"):
        field = "model.recompute = True" if config.model.recompute else f"model.precision = {config.model.precision!r}"
        problems.append(f"{field}: for the convolutional bodies (conv4, resnet12); the MLP has no blocks")
    if config.model.dropblock and config.model.kind != "resnet12":
        problems.append(f"model.dropblock = {config.model.dropblock}: only for model.kind 'resnet12'")
    if r.vectorize == "vmap" and config.model.dropblock:
        problems.append("resources.vectorize = 'vmap': not with model.dropblock (masks per task); use 'auto' or 'loop'")
    if r.vectorize == "vmap" and config.model.recompute:
        problems.append(
            "resources.vectorize = 'vmap': not with model.recompute (torch.func's vmap does not take "
            "activation checkpointing); use 'auto' or 'loop'"
        )
    if 0 < r.gpus_per_worker < RAY_RESOURCE_UNIT:
        problems.append(
            f"resources.gpus_per_worker = {r.gpus_per_worker}: 0 or at least {RAY_RESOURCE_UNIT} (Ray's unit)"
        )
    if r.min_workers > r.workers:
        problems.append(f"resources.min_workers = {r.min_workers}: more than resources.workers = {r.workers}")
    if config.algorithm == "pretrain":
        return problems + _pretrain_problems(config)  # no meta-batches, so no gradient chunks
    return problems + _chunk_problems(o, r)


def _chunk_problems(o: OptimConfig, r: ResourcesConfig) -> list[str]:
    """The meta-batch's gradient chunks against the workers that compute them."""
    if o.chunk == "auto":
        too_many = r.workers > o.meta_batch
        rule = (
            f"more workers than the {o.meta_batch} tasks of a meta-batch "
            "(optim.chunk auto gives each configured worker one chunk)"
        )
        return [f"resources.workers = {r.workers}: {rule}; lower resources.workers"] if too_many else []
    problems = []
    if o.chunk > o.meta_batch:
        problems.append(
            f"optim.chunk = {o.chunk}: more than optim.meta_batch = {o.meta_batch} (a chunk is part of a meta-batch)"
        )
    chunks = -(-o.meta_batch // o.chunk)
    if r.workers > chunks:
        problems.append(
            f"resources.workers = {r.workers}: more workers than the {chunks} gradient chunks of a "
            f"meta-batch (optim.meta_batch {o.meta_batch} / optim.chunk {o.chunk}); "
            "lower resources.workers or optim.chunk"
        )
    return problems


def _pretrain_problems(config: RunConfig) -> list[str]:
    p, r = config.pretrain, config.resources
    if not config.classification:
        return ["algorithm = 'pretrain': pre-training a classifier needs a classification task, not sinusoid"]
    if config.model.init_from is not None:
        return ["model.init_from: for the episodic algorithms (a pretrain run starts from its seed); set it to null"]
    if p.batch_size % r.workers:
        rule = "each Ray Train worker takes batch_size / workers images a step"
        return [
            f"pretrain.batch_size = {p.batch_size}: must split equally over resources.workers = {r.workers} ({rule})"
        ]
    return []


def _regression_problems(config: RunConfig) -> list[str]:
    problems = []
    if config.model.kind != "mlp":
        problems.append(f"model.kind = {config.model.kind!r}: sinusoid regression needs model.kind 'mlp'")
    if config.algorithm == "protonet":
        problems.append("algorithm = 'protonet': prototypical networks need a classification task, not sinusoid")
    return problems


def _image_problems(config: RunConfig) -> list[str]:
    """The image format against the data, the normalisation and the model."""
    t, problems = config.task, []
    if t.kind == "omniglot" and t.channels != 1:
        problems.append(f"task.channels = {t.channels}: Omniglot is grayscale; use task.channels 1")
    if (t.mean is None) != (t.std is None):
        given, missing = ("task.mean", "task.std") if t.std is None else ("task.std", "task.mean")
        problems.append(f"{given} = {list(getattr(t, given[5:]))}: needs {missing} too (or neither)")
    for name in ("mean", "std"):
        values = getattr(t, name)
        if values is not None and len(values) != t.channels:
            problems.append(f"task.{name} = {list(values)}: one value per channel (task.channels = {t.channels})")
    if t.std is not None and min(t.std) <= 0:
        problems.append(f"task.std = {list(t.std)}: every value must be > 0")
    if config.model.kind != "mlp" and t.image_size < MIN_CONV_IMAGE_SIZE:
        problems.append(
            f"task.image_size = {t.image_size}: model.kind {config.model.kind!r} halves the image 4 times; "
            f"give at least {MIN_CONV_IMAGE_SIZE}"
        )
    return problems


def _class_list_problems(t: TaskConfig) -> list[str]:
    """task.classes as lists go; the folder itself is checked against them with the data (platform.splits)."""
    if t.kind != "folder":
        return [f"task.classes: only for task.kind 'folder' ({t.kind} has its published split); remove it"]
    problems = [
        f"task.classes.{s}: missing or empty; give the class folders of every split"
        for s in TASK_SPLITS
        if not t.classes.get(s)
    ]
    for split, names in t.classes.items():
        doubled = sorted({n for n in names if names.count(n) > 1})
        if doubled:
            problems.append(f"task.classes.{split}: {doubled} listed more than once")
    for split in ("val", "test"):
        shared = sorted(set(t.classes.get("train", [])) & set(t.classes.get(split, [])))
        if shared:
            problems.append(f"task.classes.{split}: {shared} also in task.classes.train; train shares no class")
    return problems


def _task_problems(config: RunConfig) -> list[str]:
    """The classification task against its data: the source is there, the splits have enough classes and images."""
    t, problems = config.task, _image_problems(config)
    listed = _class_list_problems(t) if t.classes is not None else []
    if listed:  # the data is checked against valid class lists only
        return problems + listed
    if config.model.kind == "mlp" and t.kind == "omniglot":
        problems.append("model.kind = 'mlp': Omniglot tasks need model.kind 'conv4' or 'resnet12'")
    try:
        if t.kind == "omniglot":
            check_omniglot_source(t.data or default_omniglot_source())
        sizes, per_class = split_sizes(t), images_per_class(t)
    except DataError as e:
        default = t.kind == "omniglot" and not t.data
        source = f" (so {default_omniglot_source()!r}: $METAPLATFORM_OMNIGLOT or the official URL)" if default else ""
        return [*problems, f"task.data = {t.data!r}{source}: {e}"]
    for split in TASK_SPLITS:
        if t.ways > sizes[split]:
            problems.append(f"task.ways = {t.ways}: more than the {sizes[split]} classes of the {t.kind} {split} split")
            break
    if per_class is not None and t.shots + t.query > per_class:  # None: counted once downloaded
        problems.append(
            f"task.shots + task.query = {t.shots} + {t.query}: more than the {per_class} images per {t.kind} class"
        )
    return problems
