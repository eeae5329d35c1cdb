"""The config schema: every key of ``conf/`` with its type and range, checked before a stage does any work.

``validate_config(cfg)`` refuses the first bad value, and any key the schema does not know (a typo
in ``params.yaml`` or an override), with one line ``<key>=<value>: <what is allowed>``. Each group is
a pydantic model that forbids unknown keys; adding a config key is adding one field line here.
Values are checked strictly (``1.5`` is not an integer, ``"abc"`` is not a number, ``1`` is not a
boolean); names that come from a registry (models, datasets, criteria) are checked against it.
"""

from __future__ import annotations

import importlib
import inspect
import types
from collections.abc import Sequence
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from napkit.errors import NapkitError

# --- value types: each says what it allows, for the error message -------------------------------

Count = Annotated[int, Field(ge=1)]  # an integer >= 1
NonNegInt = Annotated[int, Field(ge=0)]
Fraction = Annotated[float, Field(gt=0, lt=1)]  # open (0, 1)
HalfOpen = Annotated[float, Field(ge=0, lt=1)]  # [0, 1)
UpToOne = Annotated[float, Field(gt=0, le=1)]  # (0, 1]
Positive = Annotated[float, Field(gt=0)]
NonNeg = Annotated[float, Field(ge=0)]
Ratio = Annotated[float, Field(gt=1)]  # a reduction / compression factor, > 1
Epochs = Annotated[int, Field(ge=1)]


class Group(BaseModel):
    """A config group: unknown keys refused, values strict (no "1" for 1, no 1 for true)."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


class Refused(ValueError):
    """A value a validator refuses: ``key`` (below the validated field, or ""), the value, what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        super().__init__(allowed)
        self.key, self.value, self.allowed = key, value, allowed


def _registry(value: str, names: Sequence[str]) -> str:
    if value not in names:
        raise Refused("", value, f"one of {', '.join(names)}")
    return value


class Optimizer(BaseModel):
    """A Hydra ``_partial_`` target (optimizer or scheduler): its other keys must be the class's arguments."""

    model_config = ConfigDict(extra="allow", strict=True, populate_by_name=True)
    target: str = Field(alias="_target_")
    partial: bool = Field(True, alias="_partial_")
    lr: Positive | None = None
    momentum: HalfOpen | None = None
    weight_decay: NonNeg | None = None
    nesterov: bool | None = None

    @model_validator(mode="after")
    def _known_arguments(self) -> Optimizer:
        module, _, name = self.target.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError):
            raise Refused("_target_", self.target, "an importable class such as torch.optim.SGD") from None
        params = inspect.signature(cls).parameters
        given = [k for k in ("lr", "momentum", "weight_decay", "nesterov") if getattr(self, k) is not None]
        for key in [*given, *(self.model_extra or {})]:
            if key not in params:
                valid = ", ".join(p for p in params if p not in ("self", "params", "optimizer", "T_max"))
                value = getattr(self, key, None) if key in given else (self.model_extra or {})[key]
                raise Refused(key, value, f"unknown key; valid keys: _target_, _partial_, {valid}")
        return self


class Model(Group):
    """A registered model with its options, or any builder (a torchvision name, ``timm.create_model``,
    ``my_package.my_builder``) whose own keyword arguments pass through (checked when it is built)."""

    model_config = ConfigDict(extra="allow", strict=True, populate_by_name=True)
    name: str
    width: Positive | None = None
    dropout: HalfOpen | None = None
    batch_norm: bool | None = None
    pretrained: bool | None = None
    zero_init_residual: bool | None = None
    weights: Annotated[str, Field(min_length=1)] | None = None  # a trained weights file or torchvision's name

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        from napkit.models import list_models
        from napkit.models.builders import is_builder_path, torchvision_name

        if v in list_models() or torchvision_name(v) is not None or is_builder_path(v):
            return v
        return _registry(v, [*list_models(), "<any torchvision classifier>", "<package.module.builder>"])

    @model_validator(mode="after")
    def _own_keys(self) -> Model:
        from napkit.models import list_models

        extra = list(self.model_extra or {})
        if extra and self.name in list_models():
            valid = ", ".join(sorted(type(self).model_fields))
            raise Refused(extra[0], self.model_extra[extra[0]], f"unknown key; valid keys: {valid}")
        return self


class Data(Group):
    name: str
    root: str | None = None
    format: Literal["torchvision", "imagefolder"] | None = None
    download: bool | None = None
    cache_dir: str | None = None
    input_size: Count | None = None
    test_fraction: Fraction | None = None
    val_fraction: Fraction | None = None  # 0 leaves no validation split: training fails at its first epoch
    val_size: Count | None = None
    augment: bool = False
    subset_train: Count | None = None
    subset_test: Count | None = None
    batch_size: Count
    eval_batch_size: Count

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        from napkit.data import list_datasets

        return _registry(v, list_datasets())


class Train(Group):
    epochs: Epochs
    label_smoothing: HalfOpen = 0.0
    amp: bool = False
    optimizer: Optimizer
    scheduler: Optimizer


class Curvature(Group):
    fisher: Literal["true", "empirical"]
    num_samples: Count
    batch_size: Count
    chunk_size: Count
    max_dense_dim: Count
    a_max_positions: Count | None = None
    dtype: Literal["float32", "float64"] = "float32"


class Structured(Group):
    step_fraction: UpToOne
    target_flops_reduction: Ratio | None = None
    target_params_reduction: Ratio | None = None
    max_group_sparsity: Fraction
    round_to: Count = 1
    per_flop: bool = True
    latency_batch: Count | None = None
    remove_blocks: bool = False
    tolerance: NonNeg
    compensate: bool | None = None  # consumer refit; None: on for curvature criteria


class Prune(Group):
    method: str
    mode: Literal["fine_grained", "structured"] = "fine_grained"
    allocation: Literal["global", "uniform"] = "global"
    target_sparsity: HalfOpen | None = None
    target_compression: Ratio | None = None
    step_fraction: UpToOne | None = None
    tolerance: NonNeg | None = None
    max_iterations: Count
    finetune_epochs: NonNeg  # short fine-tune per iteration; fractions are a share of an epoch
    max_layer_sparsity: Fraction | None = None
    compensation: Literal["none", "rowwise", "exact"] = "none"
    max_exact: Count = 2048
    damping: Positive | None = None
    recompute_curvature: bool | None = None
    stop_on_tolerance: bool = True
    one_shot: bool = False
    grid: list[Ratio] | None = None
    bn_recalibration_batches: NonNegInt = 20
    eval_test: bool = False
    ignore: list[str] = []
    structured: Structured | None = None

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        from napkit.pruning.importance import list_importances
        from napkit.structured.importance import list_channel_importances

        return _registry(v, sorted({*list_importances(), *list_channel_importances()}))


class Finetune(Train):
    """The final fine-tune: the same keys as ``train``."""


class Evaluate(Group):
    latency: bool = True
    latency_repeats: Count = 20


class Tracking(Group):
    enabled: bool = True
    uri: str | None = None
    experiment: Annotated[str, Field(min_length=1)] = "napkit"
    http_retries: NonNegInt | None = None
    http_timeout: Positive | None = None


class Chex(Group):
    S: HalfOpen
    d0: Annotated[float, Field(ge=0, le=1)]
    dT: Count
    T_max_fraction: UpToOne
    regrowth: Literal["importance", "random"] = "importance"
    regrowth_temperature: Positive = 1.0
    reinit: Literal["mru", "zero"] = "mru"
    target_flops_reduction: Ratio | None = None
    min_channels: Count = 1
    min_layer_density: HalfOpen = 0.0
    compact_tolerance: Positive = 1e-6
    epochs: Epochs
    label_smoothing: HalfOpen = 0.0
    optimizer: Optimizer
    scheduler: Optimizer


class Paths(Group):
    artifacts: Annotated[str, Field(min_length=1)]
    data: str = "data"
    cache: str = ".cache/napkit"
    content_addressed: bool = False
    code_version: str | None = None  # set by the sweep chain (cache keys)
    data_fingerprint: str | None = None


class Distributed(Group):
    backend: Literal["auto", "gloo", "nccl"] = "auto"


class Config(Group):
    """The composed config (``conf/config.yaml``, or ``params.yaml``)."""

    model: Model
    data: Data
    train: Train
    curvature: Curvature
    prune: Prune
    finetune: Finetune
    evaluate: Evaluate
    tracking: Tracking
    chex: Chex | None = None
    seed: Annotated[int, Field(ge=0, lt=2**32)]
    distributed: Distributed = Distributed()
    device: Annotated[str, Field(pattern=r"^(auto|cpu|cuda|cuda:\d+|mps)$")] = "auto"
    paths: Paths
    pipeline: Literal["nap", "chex"] = "nap"
    dvc_flows: dict[str, list[str]] | None = None  # DVC foreach lists per pipeline (conf/config.yaml)
    chex_flow: list[str] | None = None
    experiment: dict[str, Any] | None = None  # free-form metadata (name, notes): not checked
    hydra: dict[str, Any] | None = None  # Hydra's own settings, when a caller kept them


# --- messages -------------------------------------------------------------------------------------


def _bounds(metadata: Sequence[Any]) -> str:
    """' in (0, 1)', ' >= 1', ... from a field's constraints (annotated_types' Ge, Gt, Le, Lt, MinLen)."""
    lo = hi = ""
    for m in metadata:
        if getattr(m, "ge", None) is not None:
            lo = f"[{m.ge}"
        elif getattr(m, "gt", None) is not None:
            lo = f"({m.gt}"
        elif getattr(m, "le", None) is not None:
            hi = f"{m.le}]"
        elif getattr(m, "lt", None) is not None:
            hi = f"{m.lt})"
        elif getattr(m, "min_length", None) == 1:
            return " (not empty)"
    if lo and hi:
        return f" in {lo}, {hi}"
    if lo:
        return f" {'>=' if lo[0] == '[' else '>'} {lo[1:]}"
    if hi:
        return f" {'<=' if hi[-1] == ']' else '<'} {hi[:-1]}"
    return ""


def describe(annotation: Any, metadata: Sequence[Any] = ()) -> str:
    """What a field allows, in words: 'an integer >= 1, or null'."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return describe(args[0], [*metadata, *args[1:]])
    meta = [m for x in metadata for m in (x.metadata if hasattr(x, "metadata") else [x])]
    if origin in (Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return f"{describe(rest[0], meta)}, or null"
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin is list:
        return f"a list of ({describe(args[0], meta)})"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "a mapping with keys " + ", ".join(_keys(annotation))
    words = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    base = words.get(annotation, getattr(annotation, "__name__", str(annotation)))
    pattern = next((m.pattern for m in meta if hasattr(m, "pattern") and m.pattern), None)
    if pattern:
        return "one of " + pattern.strip("^$()").replace("|", ", ").replace(r"\d+", "N")
    return base + _bounds(meta)


def _keys(model: type[BaseModel]) -> list[str]:
    return sorted(f.alias or name for name, f in model.model_fields.items())


def _walk(loc: Sequence[Any]) -> tuple[type[BaseModel] | None, Any]:
    """The model holding the last key of ``loc``, and that key's field (None when unknown)."""
    model: type[BaseModel] | None = Config
    field = None
    for i, part in enumerate(loc):
        if model is None or not isinstance(part, str):
            return None, None
        by_alias = {f.alias or n: f for n, f in model.model_fields.items()}
        field = by_alias.get(part)
        if i == len(loc) - 1:
            return model, field
        if field is None:
            return None, None
        inner = [a for a in (field.annotation, *get_args(field.annotation))
                 if isinstance(a, type) and issubclass(a, BaseModel)]
        model = inner[0] if inner else None
    return model, field


def _show(value: Any) -> str:
    if value == "":
        return "''"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    return "null" if value is None else str(value)


def _message(error: dict[str, Any]) -> str:
    """One line for pydantic's first error: ``<key>=<value>: <what is allowed>``."""
    loc = [p for p in error["loc"] if not (isinstance(p, str) and p.startswith(("function-", "constrained")))]
    key = ".".join(str(p) for p in loc)
    value = _show(error.get("input"))
    if error["type"] == "extra_forbidden":
        model, _ = _walk(loc)
        valid = ", ".join(_keys(model)) if model is not None else "see conf/"
        return f"{key}={value}: unknown key; valid keys: {valid}"
    if error["type"] == "missing":
        model, field = _walk(loc)
        allowed = describe(field.annotation, field.metadata) if field else "see conf/"
        return f"{key} is missing; allowed: {allowed}"
    refused = error.get("ctx", {}).get("error")
    if isinstance(refused, Refused):
        where = f"{key}.{refused.key}" if refused.key else key
        label = "" if refused.allowed.startswith("unknown key") else "allowed: "
        return f"{where}={_show(refused.value)}: {label}{refused.allowed}"
    _, field = _walk(loc)
    allowed = describe(field.annotation, field.metadata) if field is not None else error["msg"]
    return f"{key}={value}: allowed: {allowed}"


def validate_config(cfg: DictConfig | dict[str, Any]) -> Config:
    """Check every key and value of a composed config; the first problem raises NapkitError in one line."""
    try:
        data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    except OmegaConfBaseException as exc:
        raise NapkitError(f"cannot resolve the config: {str(exc).splitlines()[0]}") from None
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise NapkitError(_message(exc.errors()[0])) from None


def unknown_override(argv: Sequence[str]) -> str | None:
    """One line for the first ``a.b=value`` override whose key the schema does not know, else None.

    Overrides of group options (``model=lenet5``), appends (``+``), deletions (``~``) and Hydra's own
    keys are left alone; keys inside free-form mappings (optimizer arguments, ``experiment``) too.
    """
    for arg in argv:
        if arg.startswith(("-", "+", "~")) or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        parts = key.split(".")
        if parts[0] == "hydra" or "@" in key or "/" in key:
            continue
        model: type[BaseModel] | None = Config
        for i, part in enumerate(parts):
            if model is None or model.model_config.get("extra") != "forbid":
                break
            field = model.model_fields.get(part) or next(
                (f for f in model.model_fields.values() if f.alias == part), None)
            if field is None:
                here = ".".join(parts[: i + 1])
                return f"{here}={value}: unknown key; valid keys: {', '.join(_keys(model))}"
            inner = [a for a in (field.annotation, *get_args(field.annotation))
                     if isinstance(a, type) and issubclass(a, BaseModel)]
            model = inner[0] if inner else None
    return None
