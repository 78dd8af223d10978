"""Typed, frozen run configuration: plain dataclasses loaded from YAML, overridable with ``--set key=value``.

A recipe file overrides only what differs from the defaults below. Unknown keys and wrong types are errors that
name the key (and suggest the closest valid one), so a typo never trains with a default by accident.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from iedp.errors import InputError
from iedp.methods import METHODS

TASKS = ("seg", "depth")
DATASETS = ("synthetic", "ade20k", "nyu", "custom_seg", "custom_depth", "kitti", "cityscapes")
OPTIMIZERS = ("adamw", "adamw8bit")


@dataclass(frozen=True)
class ModelConfig:
    task: str = "seg"  # seg | depth
    method: str = "iedp"  # vpd | implicit | explicit | iedp (DESIGN §1 table)
    weights: str = (
        "tiny"  # folder with SD v1.5 (unet/, vae/) and clip/; or "tiny" / "tiny-pretrained" (tiny presets)
    )
    sd: str | None = None  # overrides the SD part: diffusers folder, .safetensors/.ckpt file or hub id
    clip: str | None = None  # overrides the CLIP part: transformers folder or hub id
    classes: str = "ade20k"  # class (seg) or scene (depth) names: ade20k | nyu_scenes | synthetic | synthetic_scenes | cityscapes | kitti_categories | generic_scene | dataset (the data folder's list) | a .txt path
    class_template: str = (
        "a photo of a {}."  # prompt of one class token; clip80: VPD's 80 templates averaged (NYUv2 scenes)
    )
    class_max_length: int | None = (
        None  # tokens per class prompt (VPD's scene tokens: 20); None: the tokenizer's 77
    )
    class_embedding: str = (
        "pooled"  # pooled (VPD: CLIP's un-projected pooled text output) | projected (text_embeds)
    )
    implicit: str = "queries"  # queries (the paper: learnable queries over CLIP image tokens) | pooled (1 frozen image_embeds token) | patches (all projected image tokens, frozen)
    implicit_queries: int = (
        77  # N implicit tokens; 77 = the explicit sequence's length, so both branches share one 2B UNet call
    )
    implicit_layers: int = 1  # query-decoder layers (the paper describes one)
    implicit_heads: int = 8  # attention heads of the query decoder
    explicit_tokens: str = "sequence"  # sequence (CLIP text last hidden states, 77 tokens, SD's conditioning) | projected (1 text_embeds token)
    latent_scale: float = 1.0  # VPD feeds unscaled VAE latents; SD's own factor is 0.18215
    explicit_weight: float = 1.0  # λ in L = L(implicit) + λ·L(explicit)
    adapter_gamma_init: float = 1e-4
    attention_maps: bool = (
        True  # segmentation: concatenate class cross-attention maps onto the 1/16 and 1/32 features
    )
    neck_channels: int = 256  # FPN width
    head_channels: int = 128  # Semantic-FPN head width
    dropout: float = 0.1
    head_norm: str = "bn"  # bn (SyncBN across GPUs, as VPD) | gn (independent of how the batch is split)
    max_depth: float = 10.0  # metres; the depth head outputs sigmoid × max_depth
    depth_fuse_channels: int = 1536
    depth_deconv_channels: int = 32
    depth_head_channels: int = 192
    gradient_checkpointing: bool = False
    compile_vae: bool = False  # torch.compile the frozen VAE encoder (GPU; the first call compiles for ~20 s)
    compile_unet: bool = (
        False  # torch.compile the UNet with its read-out hooks, one graph (first call compiles)
    )
    # The VAE encodes a batch in slices (one image on a CPU, four 512² on a GPU): its full-resolution activations
    # were most of an inference's peak (real size, 512², batch 4, CPU: 0.64 instead of 2.51 GiB above the weights,
    # the same time and latents).
    vae_slicing: bool = True
    cache_dir: str | None = None  # where class-token banks are cached; default $IEDP_CACHE or ~/.cache/iedp


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "synthetic"  # synthetic | ade20k | nyu
    root: str | None = (
        None  # dataset root (ADEChallengeData2016/ or the NYUv2 root holding sync/ and official_splits/)
    )
    train_list: str | None = None  # NYUv2: list file of training pairs (relative to root or absolute)
    test_list: str | None = None  # NYUv2: list file of test pairs
    crop_size: int = 512  # training crop (ADE20K 512; NYUv2 480, padded up to a multiple of pad_multiple)
    pad_multiple: int = 64  # depth: crops are padded up to a multiple of this (480 -> 512); the UNet needs 64
    resolution: int = 128  # synthetic scenes: rendered size
    num_train: int = 1000  # synthetic scenes: training-set size
    num_val: int = 100  # synthetic scenes: validation-set size
    max_val: int | None = None  # evaluate on at most this many validation samples (None: all)
    seed: int = 0  # synthetic scenes and augmentation streams
    num_workers: int = 2
    augment: bool = True  # training augmentation; false (synthetic scenes only) uses samples as rendered
    cache_latents: bool = False  # with augment false: render the training scenes and encode them with the frozen VAE once, reuse
    cutdepth: bool = (
        False  # depth training: CutDepth on one sample in four, as VPD (the NYUv2 recipes turn it on)
    )
    skip_bad: bool = (
        False  # skip unreadable training files (counted and named at the end) instead of stopping
    )
    # KITTI: the annotated-depth root (<drive>/proj_depth/groundtruth/image_02/*.png)
    depth_root: str | None = None
    depth_scale: float = 1000.0  # custom_depth: uint16 PNG value of one metre (1000: mm; 256: KITTI style)
    # per-image scene for the prompts: custom_depth "folder" or a CSV "image,scene"; kitti a CSV "drive,category"
    scenes: str | None = None
    reduce_zero_label: bool = False  # custom_seg: label 0 is "unlabelled", 1..N the classes (as ADE20K)
    ignore_index: int = 255  # custom_seg: stored label value of unlabelled pixels
    crop_width: int | None = None  # training crop width if not square (KITTI: 704); None: crop_size


@dataclass(frozen=True)
class TrainConfig:
    out: str = "runs/default"  # run folder: checkpoints, logs, metrics
    max_steps: int = 80000
    batch_size: int = 2  # per device
    grad_accum: int = 1
    lr: float = 8e-5
    min_lr: float = 0.0  # poly: final lr; rise_fall: the lr it falls to
    weight_decay: float = 1e-3
    unet_lr_mult: float = 0.1  # 0.1 segmentation, 0.01 depth
    schedule: str = "poly"  # poly: linear warm-up then polynomial decay | rise_fall: VPD depth's rise from min_lr to lr and fall back, power rise_fall_power
    warmup_steps: int = (
        1500  # poly: warm-up length; rise_fall: steps of the rise, and of the fall (VPD: epochs // 2 epochs)
    )
    warmup_ratio: float = 1e-6  # poly: lr at step 0 is lr × warmup_ratio
    poly_power: float = 1.0
    rise_fall_power: float = 0.9  # rise_fall: exponent of both halves (VPD 0.9; 1 is linear)
    mixed_precision: str = "no"  # no | bf16 | fp16
    optimizer: str = "adamw"  # adamw | adamw8bit (bitsandbytes' 8-bit AdamW: moments in 8 bits, pip install "iedp[optim8bit]")
    grad_clip: float | None = None
    checkpoint_every: int = 2000
    checkpoints_total_limit: int | None = 2
    eval_every: int = 8000
    log_every: int = 50
    seed: int = 0
    max_bad_steps: int = 20  # consecutive non-finite losses before training stops


@dataclass(frozen=True)
class EvalConfig:
    window: int = 512  # segmentation sliding window
    stride: int = 341
    short_side: int = 512  # segmentation: images are resized so their short side is this
    multi_scale: bool = False  # segmentation: ratios below and flips, softmax averaged
    scales: tuple[float, ...] = (1.0, 1.125, 1.25, 1.375, 1.5)
    flip: bool = True  # depth: average with the flipped prediction
    depth_window: int = 480  # depth: square windows (NYUv2: x = 0 and x = 160 on 640-wide frames)
    depth_stride: int = 160
    depth_crop: str = "eigen"  # eigen (NYUv2's 480x640 crop) | garg (Garg's fractions: KITTI) | none
    batch_size: int = 4  # windows per forward pass


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        _check_choice("model.task", self.model.task, TASKS)
        _check_choice("model.method", self.model.method, tuple(METHODS))
        _check_choice("data.dataset", self.data.dataset, DATASETS)
        _check_choice("model.class_embedding", self.model.class_embedding, ("projected", "pooled"))
        _check_choice("model.implicit", self.model.implicit, ("queries", "pooled", "patches"))
        _check_choice("model.explicit_tokens", self.model.explicit_tokens, ("sequence", "projected"))
        _check_choice("model.head_norm", self.model.head_norm, ("bn", "gn"))
        _check_choice("train.schedule", self.train.schedule, ("poly", "rise_fall"))
        _check_choice("train.mixed_precision", self.train.mixed_precision, ("no", "bf16", "fp16"))
        _check_choice("train.optimizer", self.train.optimizer, OPTIMIZERS)
        _check_choice("eval.depth_crop", self.eval.depth_crop, ("eigen", "garg", "none"))
        for key in ("implicit_queries", "implicit_layers", "implicit_heads"):
            if getattr(self.model, key) < 1:
                raise InputError(f"model.{key}: {getattr(self.model, key)} must be at least 1")
        if self.data.depth_scale != DataConfig.depth_scale and self.data.dataset in ("nyu", "kitti"):
            raise InputError(
                f"data.depth_scale: data.dataset={self.data.dataset} does not read it (NYUv2 stores millimetres, "
                "KITTI 1/256 m); it is for custom_depth folders"
            )
        if self.data.pad_multiple % 64:
            raise InputError(
                f"data.pad_multiple: {self.data.pad_multiple} is not a multiple of 64 (the UNet needs 1/64 maps)"
            )
        _check_ranges(self)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts and lists (YAML/JSON-safe)."""
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


INPUT_MULTIPLE = 64
"""Image sides the SD v1.5 layout (and the tiny preset) takes: the VAE's 8 times the UNet's three halvings."""

# key -> (lowest, highest); None: unbounded. Every number of the config is here,
# checked at load (finite, in range), so a typo such as train.max_steps=-5 or train.lr=.inf never trains.
_RANGES: dict[str, tuple[float | None, float | None]] = {
    "model.class_max_length": (1, None),
    "model.latent_scale": (0, None),
    "model.explicit_weight": (0, None),
    "model.adapter_gamma_init": (None, None),
    "model.neck_channels": (1, None),
    "model.head_channels": (1, None),
    "model.dropout": (0, 1),
    "model.max_depth": (0, None),
    "model.depth_fuse_channels": (1, None),
    "model.depth_deconv_channels": (1, None),
    "model.depth_head_channels": (1, None),
    "data.crop_size": (1, None),
    "data.pad_multiple": (1, None),
    "data.resolution": (INPUT_MULTIPLE, None),
    "data.num_train": (1, None),
    "data.num_val": (1, None),
    "data.max_val": (1, None),
    "data.seed": (0, None),
    "data.num_workers": (0, None),
    "data.depth_scale": (0, None),
    "data.ignore_index": (0, 65535),
    "data.crop_width": (1, None),
    "train.max_steps": (1, None),
    "train.batch_size": (1, None),
    "train.grad_accum": (1, None),
    "train.lr": (0, None),
    "train.min_lr": (0, None),
    "train.weight_decay": (0, None),
    "train.unet_lr_mult": (0, None),
    "train.warmup_steps": (0, None),
    "train.warmup_ratio": (0, 1),
    "train.poly_power": (0, None),
    "train.rise_fall_power": (0, None),
    "train.grad_clip": (0, None),
    "train.checkpoint_every": (1, None),
    "train.checkpoints_total_limit": (1, None),
    "train.eval_every": (0, None),
    "train.log_every": (1, None),
    "train.seed": (0, None),
    "train.max_bad_steps": (1, None),
    "eval.window": (1, None),
    "eval.stride": (1, None),
    "eval.short_side": (1, None),
    "eval.scales": (0, None),
    "eval.depth_window": (1, None),
    "eval.depth_stride": (1, None),
    "eval.batch_size": (1, None),
}
# Keys that must be above their lowest value, not equal to it (a learning rate, a scale or a size of 0).
_STRICT = {"model.latent_scale", "model.max_depth", "train.lr", "train.grad_clip", "eval.scales"}
_STRICT.add("data.depth_scale")
_MEANING = {
    "train.checkpoints_total_limit": " (checkpoints kept; null keeps all)",
    "train.eval_every": " (0: no evaluation)",
    "data.num_workers": " (0: load in the main process)",
}


def _check_ranges(config: Config) -> None:
    """Every number finite and in its range, windows no smaller than their strides: one line naming the key."""
    for dotted, (low, high) in _RANGES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(config, section), key)
        for item in value if isinstance(value, tuple) else (value,):
            if item is None:
                continue
            if isinstance(item, float) and not math.isfinite(item):
                raise InputError(f"{dotted}: {item} is not a finite number")
            too_low = low is not None and (item <= low if dotted in _STRICT else item < low)
            if too_low or (high is not None and item > high):
                if dotted in _STRICT:
                    bound = f"above {low}"
                elif high is None:
                    bound = f"at least {low}"
                else:
                    bound = f"in {low}..{high}" if low is not None else f"at most {high}"
                raise InputError(f"{dotted}: {item} must be {bound}{_MEANING.get(dotted, '')}")
    if not config.train.out.strip():
        raise InputError("train.out: empty; expected the run folder, e.g. runs/ade20k_iedp")
    if not config.eval.scales:
        raise InputError("eval.scales: empty; expected at least one scale, e.g. [1.0]")
    for window, stride in (("window", "stride"), ("depth_window", "depth_stride")):
        if getattr(config.eval, stride) > getattr(config.eval, window):
            raise InputError(
                f"eval.{stride}: {getattr(config.eval, stride)} is larger than eval.{window}="
                f"{getattr(config.eval, window)}; windows would leave bands of the image unpredicted"
            )
    if config.data.dataset == "synthetic" and config.data.resolution % INPUT_MULTIPLE:
        raise InputError(
            f"data.resolution: {config.data.resolution} is not a multiple of {INPUT_MULTIPLE} (the UNet's input "
            f"multiple), e.g. {max(INPUT_MULTIPLE, config.data.resolution // INPUT_MULTIPLE * INPUT_MULTIPLE)}"
        )
    if (
        config.model.task == "seg"
        and config.data.dataset == "ade20k"
        and config.data.crop_size % INPUT_MULTIPLE
    ):
        raise InputError(
            f"data.crop_size: {config.data.crop_size} is not a multiple of {INPUT_MULTIPLE} (the UNet's input "
            "multiple), e.g. 512"
        )


def _check_choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise InputError(f"{key}: {value!r} is not one of {', '.join(allowed)}")


MAX_ECHO = 80
"""Longest config value quoted in a message; longer ones are cut (a message stays one readable line)."""


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict = 3, 4, 4, 4
_REPR.maxstring = _REPR.maxother = MAX_ECHO


def short_repr(value: Any, limit: int = MAX_ECHO) -> str:
    """A bounded ``repr(value)``: a few items of each list, at most ``limit`` characters. Never expands a whole
    nested value (a YAML alias bomb would expand to gigabytes)."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else f"{text[:limit]}..."


class SetValue(str):
    """The text of a ``--set key=value``, read by the type of the field it sets: ``train.mixed_precision=no`` is
    the string "no" (YAML would read false), ``train.lr=1e10`` a float, ``eval.scales=[1.0,1.5]`` a list."""


_NULLS = ("null", "none", "~", "")


def _from_set(key: str, value: SetValue, annotation: Any) -> Any:
    text = value.strip()
    if annotation is str:
        return str(text)
    if annotation is type(None):
        if text.lower() in _NULLS:
            return None
        raise InputError(f"{key}: {short_repr(text)} is not null")
    if annotation is bool:
        lowered = text.lower()
        if lowered in ("true", "yes", "on", "1"):
            return True
        if lowered in ("false", "no", "off", "0"):
            return False
        raise InputError(f"{key}: {short_repr(text)} is not a boolean (true or false)")
    if annotation is int:
        try:
            return int(text)
        except ValueError:
            raise InputError(f"{key}: {short_repr(text)} is not an integer") from None
    if annotation is float:
        try:
            return float(text)
        except ValueError:
            parsed = yaml.safe_load(text) if text.lower() in (".inf", "-.inf", "+.inf", ".nan") else None
            if isinstance(parsed, float):
                return parsed
            raise InputError(f"{key}: {short_repr(text)} is not a number") from None
    return _convert(key, safe_load(text, f"--set {key}"), annotation)


def _convert(key: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against a field's type annotation; YAML ints are accepted for float fields."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        if isinstance(value, SetValue):
            if type(None) in options and value.strip().lower() in _NULLS:
                return None
            for option in options:
                if option is not type(None):
                    try:
                        return _from_set(key, value, option)
                    except InputError:
                        pass
            raise InputError(f"{key}: {short_repr(str(value))} does not have type {annotation}")
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(key, value, option)
            except InputError:
                pass
        raise InputError(f"{key}: {short_repr(value)} does not have type {annotation}")
    if isinstance(value, SetValue):
        return _from_set(key, value, annotation)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise InputError(f"{key}: expected a list, got {short_repr(value)}")
        (item_type, _) = typing.get_args(annotation)
        return tuple(_convert(key, v, item_type) for v in value)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if (annotation is int and isinstance(value, bool)) or not isinstance(value, annotation):
        raise InputError(
            f"{key}: {short_repr(value)} is a {type(value).__name__}, expected {annotation.__name__}"
        )
    return value


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys: {', '.join(names)}"
            raise InputError(f"unknown config key {prefix}{key}{hint}")
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            if not isinstance(value, dict):
                raise InputError(f"{prefix}{key}: expected a mapping, got {short_repr(value)}")
            kwargs[key] = _build(annotation, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _convert(f"{prefix}{key}", value, annotation)
    return cls(**kwargs)


def set_dotted(tree: dict[str, Any], assignment: str) -> None:
    if "=" not in assignment:
        raise InputError(f"--set {short_repr(assignment)}: expected dotted.key=value")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise InputError(f"--set {key}: {part} is not a section")
    node[parts[-1]] = SetValue(raw)


Settings = TypeVar("Settings")


def with_overrides(settings: Settings, overrides: list[str]) -> Settings:
    """A copy of the dataclass ``settings`` (e.g. :class:`iedp.pretrain.PretrainConfig`) with ``--set key=value``
    assignments applied, each value read and checked by its field's type."""
    tree = dataclasses.asdict(settings)
    for assignment in overrides:
        set_dotted(tree, assignment)
    return _build(type(settings), tree, "")


def config_from_dict(tree: dict[str, Any]) -> Config:
    return _dataset_classes(_build(Config, tree, ""))


DATASET_CLASSES = "dataset"
"""``model.classes`` value meaning "the names that come with the data": ``<data.root>/classes.txt`` for custom_seg,
``<data.root>/scenes.txt`` for custom_depth (one generic scene when the folder has none)."""


def _dataset_classes(config: Config) -> Config:
    """``model.classes=dataset`` resolved once, to the path of the folder's name list."""
    if config.model.classes != DATASET_CLASSES:
        return config
    root = Path(config.data.root or ".").expanduser()
    # absolute: a checkpoint's config names the file wherever it is read
    root = root.resolve() if root.is_dir() else root
    if config.data.dataset == "custom_seg":
        classes = str(root / "classes.txt")
    elif config.data.dataset == "custom_depth":
        classes = str(root / "scenes.txt") if (root / "scenes.txt").is_file() else "generic_scene"
    else:
        raise InputError(
            f"model.classes: {DATASET_CLASSES!r} is for data.dataset=custom_seg or custom_depth, "
            f"not {config.data.dataset}; name a list (e.g. cityscapes, kitti_categories) or a .txt file"
        )
    return dataclasses.replace(config, model=dataclasses.replace(config.model, classes=classes))


MAX_YAML_CHARS = 1_000_000
"""Largest recipe read (characters); a recipe is a few kilobytes."""
MAX_YAML_ALIASES = 100
"""Most alias uses (``*name``) in one YAML document: enough for any recipe, and no "billion laughs" expansion."""
MAX_YAML_NODES = 100_000
"""Most values in a YAML document once its aliases are expanded (a recipe has about a hundred)."""


def _count_nodes(value: Any, limit: int) -> int:
    """Values in ``value`` with aliases expanded, counting stops past ``limit`` (so a bomb costs little)."""
    count, stack = 0, [value]
    while stack and count <= limit:
        item = stack.pop()
        count += 1
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return count


class _LimitedLoader(yaml.SafeLoader):
    """The safe loader (no Python tags) that also refuses alias bombs: at most MAX_YAML_ALIASES alias uses."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self.alias_count = getattr(self, "alias_count", 0) + 1
            if self.alias_count > MAX_YAML_ALIASES:
                raise yaml.YAMLError(f"more than {MAX_YAML_ALIASES} aliases (*name); refusing to expand them")
        return super().compose_node(parent, index)


def safe_load(text: str, what: str) -> Any:
    """``yaml.safe_load`` with size and alias limits; errors as one line naming ``what``."""
    if len(text) > MAX_YAML_CHARS:
        raise InputError(f"{what}: {len(text)} characters, above the limit of {MAX_YAML_CHARS} for YAML")
    try:
        tree = yaml.load(text, Loader=_LimitedLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise InputError(f"{what}: not valid YAML ({where}{short_repr(problem, 200)[1:-1]})") from None
    if _count_nodes(tree, MAX_YAML_NODES) > MAX_YAML_NODES:
        raise InputError(f"{what}: more than {MAX_YAML_NODES} values once its aliases are expanded; refused")
    return tree


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML recipe (safe loader), resolve its ``base:`` chain and apply ``--set dotted.key=value`` overrides.

    A recipe may name a ``base:`` recipe (a path relative to its own folder, or a shipped recipe such as
    ``ade20k_iedp``) and state only what differs: sections merge key by key, the recipe's values winning. The
    result is the resolved config, which checkpoints save; a chain that comes back to a file is refused.
    """
    tree = _read_recipe(_recipe_path(path, None), ()) if path is not None else {}
    for assignment in overrides:
        set_dotted(tree, assignment)
    return config_from_dict(tree)


def _recipe_path(name: str | Path, folder: Path | None) -> Path:
    """The recipe file ``name``: a path (relative to ``folder`` for a ``base:``, with or without ``.yaml``), else
    the shipped recipe of that name."""
    from iedp.configs import packaged_config, packaged_names

    path = Path(name)
    candidates = [folder / path, folder / f"{path}.yaml"] if folder is not None else [path]
    found = next((candidate for candidate in candidates if candidate.is_file()), None)
    found = found or packaged_config(str(name))
    if found is None:
        what = f"base {name} of a recipe in {folder}" if folder is not None else f"config {path}"
        close = difflib.get_close_matches(str(name).removesuffix(".yaml"), packaged_names(), n=1)
        hint = f"did you mean {close[0]}?" if close else "nor a shipped recipe such as ade20k_iedp"
        raise InputError(f"{what}: no such file ({hint})")
    return found


def _read_recipe(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    """The recipe at ``path`` as a tree, merged over its ``base:`` chain (``chain``: the recipes that led here)."""
    resolved = path.resolve()
    if resolved in chain:
        loop = " -> ".join(str(p) for p in (*chain, resolved))
        raise InputError(f"config {chain[0]}: its base: chain loops ({loop})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"config {path}: not a text file (not UTF-8); expected a YAML recipe") from None
    except OSError as error:
        raise InputError(f"config {path}: cannot read ({error.strerror})") from None
    tree = safe_load(text, f"config {path}") or {}
    if not isinstance(tree, dict):
        raise InputError(f"config {path}: expected a mapping of sections, got {type(tree).__name__}")
    base = tree.pop("base", None)
    if base is None:
        return tree
    if not isinstance(base, str) or not base:
        raise InputError(f"config {path}: base: expected a recipe name or path, got {short_repr(base)}")
    parent = _read_recipe(_recipe_path(base, path.parent), (*chain, resolved))
    return _merge(parent, tree)


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` over ``base``, section by section (a section's keys merge; other values replace)."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# Model keys that may change on a trained checkpoint: where its frozen weights live (the text tower of `explicit`)
# and how it runs (compilation, VAE slicing), not what it computes.
CHECKPOINT_MODEL_KEYS = ("weights", "sd", "clip", "cache_dir", "compile_vae", "compile_unet", "vae_slicing")


def apply_overrides(config: Config, overrides: list[str]) -> Config:
    """A trained checkpoint's config changed by ``--set`` assignments (data, eval, ...); its architecture is fixed,
    so other ``model.*`` keys are refused."""
    tree = config.to_dict()
    for assignment in overrides:
        key = assignment.split("=", 1)[0].strip()
        if key.startswith("model.") and key.removeprefix("model.") not in CHECKPOINT_MODEL_KEYS:
            raise InputError(
                f"--set {key}: a trained checkpoint's model cannot change (only model.{', model.'.join(CHECKPOINT_MODEL_KEYS)})"
            )
        set_dotted(tree, assignment)
    return config_from_dict(tree)


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
