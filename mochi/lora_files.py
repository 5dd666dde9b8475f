"""What a Mochi LoRA file holds, read from its header (driver side: queue-time checks, the CLI, the
resolver): the formats people train, their names mapped onto our DiT's layers, their scales, and a
typed `LoraError` for a file that cannot work. The rank side (`lora.py`) loads the tensors and
applies them; the bytes on disk are read by `checkpoint.read_safetensors_header`, the one reader
that decides what a file is, and other models' LoRAs are told by `file_kind.LORA_FAMILIES`.

Formats, recognised from the keys and the metadata:
- genmo trainer (`LoraFormat.GENMO`): `blocks.{i}.attn.{qkv_x,qkv_y,proj_x,proj_y}.lora_A` / `.lora_B`
  (no `.weight`), A [r, in], B [out, r]; rank and alpha in the safetensors metadata `kwargs` (a JSON
  string): `qkv_proj_lora_rank` / `_alpha` for qkv_x and qkv_y, `out_proj_lora_rank` / `_alpha` for
  proj_x and proj_y. scale = alpha / rank; without metadata genmo's config default alpha 16 applies
  (rank is always read from the tensors; a metadata rank that disagrees is an error).
- ComfyUI / kohya (`LoraFormat.COMFY`): our module names under `diffusion_model.` (or none), or
  underscored under `lora_unet_`; `.lora_down` / `.lora_up` or `.lora_A` / `.lora_B`, with or without
  `.weight`; `.alpha` tensors give scale = alpha / rank (no alpha: scale 1, as ComfyUI does).
- diffusers / PEFT (`LoraFormat.DIFFUSERS`): `transformer.transformer_blocks.{i}.attn1.to_q` etc.
  Split q / k / v LoRAs land in their thirds of our fused `qkv_x` / `qkv_y`; the SwiGLU input and
  the final modulation have their halves in the other order in diffusers, so B's rows are swapped.
  scale = lora_alpha / r from the `lora_adapter_metadata` PEFT config (alpha / rank patterns and
  rsLoRA honoured); without it scale 1 (diffusers' convention).

Entry points: `LoraSpec` (what a user asked for), `inspect_lora` (header only: what a file is, a
typed `LoraError` if it is no usable Mochi LoRA) and `fit_lora` (the same, checked against one
model's layer shapes).
"""

import enum
import json
import math
import os
import re
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .checkpoint import CheckpointError, FileProblem, TensorInfo, inspect_checkpoint, read_safetensors_header
from .dit import DiTConfig, MochiDiT
from .file_kind import LORA_FAMILIES
from .layers import Linear

GENMO_METADATA_KEY = "kwargs"
GENMO_DEFAULT_ALPHA = 16  # genmo demos/fine_tuner/configs/lora.yaml (rank 16 / alpha 16)
GENMO_SCALE_GROUPS = {  # our attention module -> genmo kwargs prefix
    "attn.qkv_x": "qkv_proj_lora", "attn.qkv_y": "qkv_proj_lora",
    "attn.proj_x": "out_proj_lora", "attn.proj_y": "out_proj_lora",
}
PEFT_METADATA_KEY = "lora_adapter_metadata"  # diffusers' key for the PEFT LoraConfig (JSON)
PEFT_DEFAULT_RANK = 8  # peft.LoraConfig defaults
PEFT_DEFAULT_ALPHA = 8

# Our DiT's Linear layers (genmo / checkpoint names); a test checks these against MochiDiT.
GLOBAL_LINEARS = (
    "t_embedder.mlp.0", "t_embedder.mlp.2", "t5_y_embedder.to_kv", "t5_y_embedder.to_q",
    "t5_y_embedder.to_out", "t5_yproj", "final_layer.mod", "final_layer.linear",
)
BLOCK_LINEARS = (  # under blocks.{i}.
    "mod_x", "mod_y", "attn.qkv_x", "attn.qkv_y", "attn.proj_x", "attn.proj_y",
    "mlp_x.w1", "mlp_x.w2", "mlp_y.w1", "mlp_y.w2",
)
# Modules of Mochi's DiT that are not Linears (a LoRA naming them cannot be applied).
_OTHER_MOCHI_ROOTS = re.compile(
    r"^(x_embedder|patch_embed|pos_frequencies|blocks[._]\d+|transformer_blocks[._]\d+|t_embedder|"
    r"time_embed|t5_y_embedder|t5_yproj|final_layer|norm_out|proj_out)([._]|$)"
)


class _Naming(enum.Enum):
    """Which names a file uses for our layers."""

    GENMO = enum.auto()  # blocks.N.attn.qkv_x (also ComfyUI / kohya, with prefixes)
    DIFFUSERS = enum.auto()  # transformer_blocks.N.attn1.to_q


class _Role(enum.Enum):
    """What a LoRA tensor is."""

    DOWN = enum.auto()  # A [rank, in]
    UP = enum.auto()  # B [out, rank]
    ALPHA = enum.auto()


@dataclass(frozen=True)
class _Target:
    """Where a diffusers-named LoRA lands in our model."""

    module: str  # our name (block-relative for block tables)
    part: int | None = None  # 0 / 1 / 2: q / k / v third of a fused qkv projection; None: all rows
    swap_halves: bool = False  # diffusers orders the two halves of this output the other way round


DIFFUSERS_GLOBAL = {
    "time_embed.timestep_embedder.linear_1": _Target("t_embedder.mlp.0"),
    "time_embed.timestep_embedder.linear_2": _Target("t_embedder.mlp.2"),
    "time_embed.pooler.to_kv": _Target("t5_y_embedder.to_kv"),
    "time_embed.pooler.to_q": _Target("t5_y_embedder.to_q"),
    "time_embed.pooler.to_out": _Target("t5_y_embedder.to_out"),
    "time_embed.caption_proj": _Target("t5_yproj"),
    "norm_out.linear": _Target("final_layer.mod", swap_halves=True),  # (scale, shift) vs genmo (shift, scale)
    "proj_out": _Target("final_layer.linear"),
}
DIFFUSERS_BLOCK = {  # under transformer_blocks.{i}.
    "norm1.linear": _Target("mod_x"),
    "norm1_context.linear": _Target("mod_y"),
    "norm1_context.linear_1": _Target("mod_y"),  # the last block's (text scale only)
    "attn1.to_q": _Target("attn.qkv_x", 0),
    "attn1.to_k": _Target("attn.qkv_x", 1),
    "attn1.to_v": _Target("attn.qkv_x", 2),
    "attn1.add_q_proj": _Target("attn.qkv_y", 0),
    "attn1.add_k_proj": _Target("attn.qkv_y", 1),
    "attn1.add_v_proj": _Target("attn.qkv_y", 2),
    "attn1.to_out.0": _Target("attn.proj_x"),
    "attn1.to_add_out": _Target("attn.proj_y"),
    "ff.net.0.proj": _Target("mlp_x.w1", swap_halves=True),  # diffusers x * silu(gate), genmo silu(x) * gate
    "ff.net.2": _Target("mlp_x.w2"),
    "ff_context.net.0.proj": _Target("mlp_y.w1", swap_halves=True),
    "ff_context.net.2": _Target("mlp_y.w2"),
}

_DOWN_SUFFIXES = (".lora_A.weight", ".lora_down.weight", ".lora.down.weight", ".lora_linear_layer.down.weight",
                  ".lora_A", ".lora_down")
_UP_SUFFIXES = (".lora_B.weight", ".lora_up.weight", ".lora.up.weight", ".lora_linear_layer.up.weight",
                ".lora_B", ".lora_up")
_ALPHA_SUFFIX = ".alpha"
_GENMO_SUFFIXES = (".lora_A", ".lora_B")
_DOTTED_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.")
_UNDERSCORED_PREFIXES = ("lora_unet_", "lora_transformer_")
_UNSUPPORTED = (  # (what, key pattern): the file changes the math in a way a plain LoRA cannot express
    ("DoRA (weight-decomposed LoRA)", re.compile(r"(\.dora_scale|\.lora_magnitude_vector)")),
    ("a LoRA bias (lora_B.bias)", re.compile(r"\.lora_B\.bias$|\.lora_up\.bias$")),
)
_LISTED = 8  # names listed in messages before "... (N in all)"


class LoraFormat(enum.Enum):
    """How the file names its layers (and where its scale comes from)."""

    GENMO = "genmo trainer"
    COMFY = "ComfyUI / kohya"
    DIFFUSERS = "diffusers / PEFT"


class LoraProblem(enum.Enum):
    """Why a LoRA file was refused (the kind of a `LoraError`)."""

    NOT_FOUND = "not found"
    PICKLE = "pickle file"
    BAD_FILE = "not a readable safetensors file (truncated or corrupt)"
    NOT_A_LORA = "not a LoRA"
    NOT_MOCHI = "not a Mochi LoRA"
    UNSUPPORTED = "unsupported adapter type"
    INCONSISTENT = "inconsistent LoRA"
    SHAPE_MISMATCH = "does not fit this model"


class LoraError(ValueError):
    """A LoRA file that cannot be used; `kind` says why (never parse the message), the message says
    what to do."""

    def __init__(self, kind: LoraProblem, message: str):
        self.kind = kind
        super().__init__(message)


class LoraModulesIgnored(UserWarning):
    """A LoRA names layers this model does not have (or cannot patch); they are not applied."""


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA a user asked for: a safetensors file and a strength (any finite number; negative
    subtracts the LoRA, 0 leaves the base model).

    Args:
        path: the LoRA file; made absolute.
        strength: multiplies the LoRA's delta (1.0 = as trained).
    """

    path: str
    strength: float = 1.0

    def __post_init__(self):
        if not isinstance(self.path, (str, os.PathLike)) or not os.fspath(self.path):
            raise ValueError(f"LoRA path must be a non-empty path, got {self.path!r}")
        object.__setattr__(self, "path", os.path.abspath(os.fspath(self.path)))
        if isinstance(self.strength, bool) or not isinstance(self.strength, (int, float)) \
                or not math.isfinite(self.strength):
            raise ValueError(f"LoRA strength must be a finite number (e.g. 0.8 or -0.5), got {self.strength!r}")
        object.__setattr__(self, "strength", float(self.strength))


@dataclass(frozen=True)
class LoraPair:
    """One low-rank pair of a file, mapped onto one of our Linears.

    Args:
        source: the module name as the file writes it.
        module: our Linear, e.g. "blocks.0.attn.qkv_x".
        down_key, up_key: the A [rank, in] and B [rows, rank] tensors' keys in the file.
        rank: r.
        in_features: A's width.
        rows: B's height (the module's out_features, or a third of it for a split q / k / v).
        part: 0 / 1 / 2 for a q / k / v third of a fused qkv projection, None for all rows.
        swap_halves: B's two row halves are in diffusers' order; swapped when loading.
        scale: alpha / rank (from the metadata, an `.alpha` tensor or the format's default).
    """

    source: str
    module: str
    down_key: str
    up_key: str
    rank: int
    in_features: int
    rows: int
    part: int | None
    swap_halves: bool
    scale: float

    @property
    def row_start(self) -> int:
        return 0 if self.part is None else self.part * self.rows


@dataclass(frozen=True)
class IgnoredModule:
    """A module a LoRA names that is not applied, and why."""

    source: str
    reason: str


@dataclass(frozen=True)
class LoraInfo:
    """What a LoRA file holds, read from its header (no tensor data).

    Args:
        path: the file.
        format: how it names layers (see LoraFormat).
        pairs: the low-rank pairs that map onto our model (fitted to a model when one was given).
        ignored: modules named by the file that are not applied (listed in a LoraModulesIgnored warning).
    """

    path: str
    format: LoraFormat
    pairs: tuple[LoraPair, ...]
    ignored: tuple[IgnoredModule, ...]

    def describe(self) -> str:
        """One phrase, e.g. 'a genmo trainer Mochi LoRA (192 layers in 48 blocks, rank 16)'."""
        blocks = {m.group(1) for p in self.pairs if (m := re.match(r"blocks\.(\d+)\.", p.module))}
        ranks = "/".join(str(r) for r, _ in Counter(p.rank for p in self.pairs).most_common(3))
        return (f"a {self.format.value} Mochi LoRA ({len(self.pairs)} layers in {len(blocks)} blocks, "
                f"rank {ranks or '-'})")


def _listing(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_LISTED])
    return shown + (f", ... ({len(names)} in all)" if len(names) > _LISTED else "")


# -- reading the header ------------------------------------------------------------------------

def _read_header(path: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The file's tensors and metadata through the one safetensors reader, its problems as LoraErrors."""
    try:
        return read_safetensors_header(path)
    except CheckpointError as error:
        if error.problem is FileProblem.MISSING:
            raise LoraError(LoraProblem.NOT_FOUND, f"LoRA file {path} does not exist; check the path (ComfyUI keeps "
                            "LoRAs in models/loras)") from None
        if error.problem is FileProblem.PICKLE:
            raise LoraError(LoraProblem.PICKLE, (
                f"{path} is a pickle file (e.g. genmo's trainer saving .pt); pickles can run arbitrary code when "
                "loaded and are not read here. Convert it once, in a Python you trust, with "
                "`safetensors.torch.save_file(torch.load(PT, weights_only=True), OUT, metadata={'kwargs': "
                "json.dumps({'qkv_proj_lora_rank': R, 'qkv_proj_lora_alpha': A, 'out_proj_lora_rank': R, "
                "'out_proj_lora_alpha': A})})` with R and A from your training config (lora.yaml), and use OUT "
                "(a .safetensors file).")) from None
        raise LoraError(LoraProblem.BAD_FILE, f"LoRA file: {error}") from None


def _role(key: str) -> tuple[str, _Role] | None:
    """(module, role) for a LoRA key, None for anything else."""
    for suffixes, role in ((_DOWN_SUFFIXES, _Role.DOWN), (_UP_SUFFIXES, _Role.UP), ((_ALPHA_SUFFIX,), _Role.ALPHA)):
        for suffix in suffixes:
            if key.endswith(suffix) and len(key) > len(suffix):
                return key[: -len(suffix)], role
    return None


def _underscored(table: Sequence[str]) -> dict[str, str]:
    return {name.replace(".", "_"): name for name in table}


_BLOCK_LINEARS_US = _underscored(BLOCK_LINEARS)
_GLOBAL_LINEARS_US = _underscored(GLOBAL_LINEARS)
_DIFFUSERS_BLOCK_US = _underscored(tuple(DIFFUSERS_BLOCK))
_DIFFUSERS_GLOBAL_US = _underscored(tuple(DIFFUSERS_GLOBAL))


def _resolve(source: str) -> tuple[_Naming, _Target, str] | str:
    """Map a file's module name onto ours: (its naming, the target with our full module name, the
    name without its prefix), or the reason it maps nowhere."""
    name, underscored = source, False
    for prefix in _DOTTED_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    else:
        for prefix in _UNDERSCORED_PREFIXES:
            if name.startswith(prefix):
                name, underscored = name[len(prefix):], True
                break
    sep = "_" if underscored else r"\."
    block = re.fullmatch(rf"(transformer_blocks|blocks){sep}(\d+){sep}(.+)", name)
    if block:
        kind, index, rest = block.groups()
        if kind == "blocks":
            ours = _BLOCK_LINEARS_US.get(rest) if underscored else (rest if rest in BLOCK_LINEARS else None)
            if ours is not None:
                return _Naming.GENMO, _Target(f"blocks.{index}.{ours}"), name
        else:
            theirs = _DIFFUSERS_BLOCK_US.get(rest) if underscored else rest
            target = DIFFUSERS_BLOCK.get(theirs) if theirs is not None else None
            if target is not None:
                return _Naming.DIFFUSERS, _Target(f"blocks.{index}.{target.module}", target.part, target.swap_halves), \
                    f"transformer_blocks.{index}.{theirs}"
    else:
        ours = _GLOBAL_LINEARS_US.get(name) if underscored else (name if name in GLOBAL_LINEARS else None)
        if ours is not None:
            return _Naming.GENMO, _Target(ours), name
        theirs = _DIFFUSERS_GLOBAL_US.get(name) if underscored else name
        if theirs in DIFFUSERS_GLOBAL:
            return _Naming.DIFFUSERS, DIFFUSERS_GLOBAL[theirs], theirs
    if _OTHER_MOCHI_ROOTS.match(name):
        return "not a linear layer of Mochi's DiT (only Linear layers take a LoRA here)"
    return "not a module of Mochi's DiT"


def _peft_config(metadata: dict[str, str], path: str) -> dict | None:
    """diffusers' saved PEFT LoraConfig (keys under `transformer.` when a pipeline saved it), or None."""
    config = _json_metadata(metadata, PEFT_METADATA_KEY, path, "re-save the LoRA with diffusers")
    if config is None:
        return None
    if any(k.startswith("transformer.") for k in config):
        config = {k[len("transformer."):]: v for k, v in config.items() if k.startswith("transformer.")}
    if not any(k in config for k in ("r", "lora_alpha", "rank_pattern", "alpha_pattern")):
        return None  # nothing about the transformer's scale: diffusers' default, scale 1
    if config.get("use_dora"):
        raise LoraError(LoraProblem.UNSUPPORTED, f"{path} is a DoRA adapter (use_dora in its PEFT config); only "
                        "plain LoRAs are applied here; train or export a plain LoRA")
    if config.get("lora_bias"):
        raise LoraError(LoraProblem.UNSUPPORTED, f"{path} has LoRA biases (lora_bias in its PEFT config); only "
                        "plain LoRAs are applied here")
    return config


def _pattern_value(patterns: dict, name: str):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key matching the end of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return None


def _genmo_kwargs(metadata: dict[str, str], path: str) -> dict | None:
    return _json_metadata(metadata, GENMO_METADATA_KEY, path,
                          "it should hold genmo's LoRA kwargs (qkv_proj_lora_rank, ...)")


def _json_metadata(metadata: dict[str, str], key: str, path: str, fix: str) -> dict | None:
    """A safetensors metadata entry holding a JSON object, or None when absent (or not an object);
    a LoraError saying `fix` when it is not JSON."""
    raw = metadata.get(key)
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as error:
        raise LoraError(LoraProblem.INCONSISTENT, f"{path}: metadata '{key}' is not JSON ({error}); {fix}") from None
    return value if isinstance(value, dict) else None


def inspect_lora(path: str | os.PathLike, config: DiTConfig | None = None) -> LoraInfo:
    """What a LoRA file is, from its header only (cheap: use it at queue time).

    Args:
        path: the .safetensors file.
        config: the DiT it will run on, if known: then layers that model lacks are ignored (warned)
            and shapes are checked against it. Without it only the file itself is checked.

    Returns:
        LoraInfo. Modules not applied are in `ignored` and in one LoraModulesIgnored warning.

    Raises:
        LoraError (see `kind`): missing file, pickle, truncated / corrupt file, no LoRA, another
        model's LoRA (Flux, SD, ...), DoRA / LoRA biases, unpaired or mismatched A / B, or (with
        config) shapes that do not fit.
    """
    info = read_lora_header(path)
    if config is not None:
        info = fit_lora(info, linear_shapes_for(config))
    if info.ignored:
        warn_ignored(info)
    return info


def read_lora_header(path: str | os.PathLike) -> LoraInfo:
    """inspect_lora without a model and without the warning."""
    path = os.path.abspath(os.fspath(path))
    tensors, metadata = _read_header(path)
    for what, pattern in _UNSUPPORTED:
        hits = [k for k in tensors if pattern.search(k)]
        if hits:
            raise LoraError(LoraProblem.UNSUPPORTED, f"{path} uses {what} (e.g. {hits[0]}); only plain LoRAs (A, B "
                            "and optional alpha) are applied here")
    for kind, pattern in LORA_FAMILIES:
        hits = [k for k in tensors if pattern.search(k)]
        if hits:
            raise LoraError(LoraProblem.NOT_MOCHI, f"{path} looks like a LoRA for {kind.description} (e.g. {hits[0]}), "
                            "not a Mochi LoRA; use a LoRA trained for Mochi-1 (genmo's trainer, diffusers / PEFT, "
                            "or ComfyUI format)")

    modules: dict[str, dict[_Role, str]] = {}
    other_keys = []
    for key in tensors:
        role = _role(key)
        if role is None:
            other_keys.append(key)
        else:
            modules.setdefault(role[0], {})[role[1]] = key
    if not modules:
        raise LoraError(LoraProblem.NOT_A_LORA, f"{path} has no LoRA tensors (no lora_A / lora_B / lora_down / "
                        f"lora_up keys): it looks like {inspect_checkpoint(path).describe()}; give a LoRA file "
                        "(models/loras), and load models with the model loader")

    ignored = []
    resolved: dict[str, tuple[_Naming, _Target, str]] = {}
    for source in sorted(modules):
        result = _resolve(source)
        if isinstance(result, str):
            ignored.append(IgnoredModule(source, result))
        else:
            resolved[source] = result
    for key in other_keys:
        ignored.append(IgnoredModule(key, "not a LoRA A / B / alpha tensor (LoHa, LoKr, full-weight diffs and "
                                          "the like are not applied)"))
    if not resolved:
        names = [m.source for m in ignored]
        raise LoraError(LoraProblem.NOT_MOCHI, f"{path} names no layer of Mochi's DiT (modules: {_listing(names)}); "
                        "it is a LoRA for another model; use a LoRA trained for Mochi-1")
    namings = {naming for naming, _, _ in resolved.values()}
    if len(namings) > 1:
        raise LoraError(LoraProblem.INCONSISTENT, f"{path} mixes genmo names (blocks.N.attn.qkv_x) and diffusers names "
                        "(transformer_blocks.N.attn1.to_q); re-export it in one format")
    diffusers = namings == {_Naming.DIFFUSERS}
    genmo_shaped = not diffusers and all(  # bare names, bare .lora_A / .lora_B, no alpha tensors
        source == bare and _Role.ALPHA not in modules[source]
        and all(key.endswith(_GENMO_SUFFIXES) for key in modules[source].values())
        for source, (_, _, bare) in resolved.items())
    fmt = LoraFormat.DIFFUSERS if diffusers else LoraFormat.GENMO if genmo_shaped else LoraFormat.COMFY
    peft = _peft_config(metadata, path) if diffusers else None
    genmo = _genmo_kwargs(metadata, path) if not diffusers else None
    alphas = _read_alphas(path, [keys[_Role.ALPHA] for source, keys in modules.items()
                                 if source in resolved and _Role.ALPHA in keys], tensors)

    pairs = []
    for source, (_, target, bare) in resolved.items():
        keys = modules[source]
        if _Role.DOWN not in keys or _Role.UP not in keys:
            have = "A (down)" if _Role.DOWN in keys else "B (up)" if _Role.UP in keys else "only an alpha"
            raise LoraError(LoraProblem.INCONSISTENT, f"{path}: module {source} has {have} but not its partner; "
                            "the file is incomplete or not a LoRA")
        down, up = tensors[keys[_Role.DOWN]], tensors[keys[_Role.UP]]
        if len(down.shape) != 2 or len(up.shape) != 2:
            raise LoraError(LoraProblem.INCONSISTENT, f"{path}: {source} has A {list(down.shape)} and B "
                            f"{list(up.shape)}, but a LoRA on a linear layer has 2-D A [rank, in] and B [out, rank]")
        rank = down.shape[0]
        if up.shape[1] != rank:
            raise LoraError(LoraProblem.INCONSISTENT, f"{path}: {source} has A {list(down.shape)} (rank {rank}) but "
                            f"B {list(up.shape)} (rank {up.shape[1]}); the pair does not multiply; the file is "
                            "corrupt or mixes two LoRAs")
        if target.swap_halves and up.shape[0] % 2:
            raise LoraError(LoraProblem.INCONSISTENT, f"{path}: {source} has B {list(up.shape)} with an odd row "
                            "count, but this layer's output is two equal halves")
        scale = _scale(path, fmt, target, bare, keys, alphas, rank, peft, genmo)
        pairs.append(LoraPair(source, target.module, keys[_Role.DOWN], keys[_Role.UP], rank, down.shape[1], up.shape[0],
                              target.part, target.swap_halves, scale))
    return LoraInfo(path, fmt, tuple(pairs), tuple(ignored))


def _scale(path, fmt, target, bare, keys, alphas, rank, peft, genmo) -> float:
    """alpha / rank for one pair (see the module docstring for each format's source of alpha)."""
    if _Role.ALPHA in keys:
        return alphas[keys[_Role.ALPHA]] / rank
    if fmt is LoraFormat.DIFFUSERS:
        if peft is None:
            return 1.0
        config_rank = _pattern_value(peft.get("rank_pattern"), bare) or peft.get("r", PEFT_DEFAULT_RANK)
        alpha = _pattern_value(peft.get("alpha_pattern"), bare) or peft.get("lora_alpha", PEFT_DEFAULT_ALPHA)
        if config_rank != rank:
            raise LoraError(LoraProblem.INCONSISTENT, f"{path}: {bare} has rank {rank} but its PEFT config says "
                            f"r={config_rank}; the metadata does not belong to these tensors")
        return alpha / (math.sqrt(rank) if peft.get("use_rslora") else rank)
    group = GENMO_SCALE_GROUPS.get(target.module.split(".", 2)[-1]) if target.module.startswith("blocks.") else None
    if group is not None and genmo is not None and f"{group}_alpha" in genmo:
        config_rank = genmo.get(f"{group}_rank", rank)
        if config_rank != rank:
            raise LoraError(LoraProblem.INCONSISTENT, f"{path}: {bare} has rank {rank} but the metadata kwargs say "
                            f"{group}_rank={config_rank}; the metadata does not belong to these tensors")
        return genmo[f"{group}_alpha"] / rank
    if fmt is LoraFormat.GENMO:
        return GENMO_DEFAULT_ALPHA / rank
    return 1.0  # ComfyUI: no alpha, no scaling


def _read_alphas(path: str, keys: list[str], tensors: dict[str, TensorInfo]) -> dict[str, float]:
    """The `.alpha` tensors (one number each), read in one pass."""
    from safetensors import safe_open

    if not keys:
        return {}
    for key in keys:
        if tensors[key].shape not in ((), (1,)):
            raise LoraError(LoraProblem.INCONSISTENT, f"{path}: {key} has shape {list(tensors[key].shape)}; an "
                            "alpha is one number")
    with safe_open(path, framework="pt", device="cpu") as f:
        return {key: float(f.get_tensor(key).float().reshape(())) for key in keys}


def warn_ignored(info: LoraInfo) -> None:
    names = [f"{m.source} ({m.reason})" for m in info.ignored]
    warnings.warn(LoraModulesIgnored(
        f"LoRA {info.path}: {len(info.ignored)} module(s) NOT applied: {_listing(names)}. The rest "
        f"({len(info.pairs)} layers) is applied; check that the LoRA was trained for this Mochi model."),
        stacklevel=3)


# -- fitting to a model ------------------------------------------------------------------------

def linear_shapes(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """Our Linear layers' (out_features, in_features) by module name."""
    return {name: (m.out_features, m.in_features) for name, m in model.named_modules() if isinstance(m, Linear)}


def linear_shapes_for(config: DiTConfig) -> dict[str, tuple[int, int]]:
    """linear_shapes of a DiT of this size (built on the meta device: no memory)."""
    with torch.device("meta"):
        return linear_shapes(MochiDiT(config))


def fit_lora(info: LoraInfo, shapes: dict[str, tuple[int, int]]) -> LoraInfo:
    """Check a LoRA against one model's Linear shapes: pairs on layers the model lacks move to
    `ignored`; a pair whose shape does not fit raises LoraError(SHAPE_MISMATCH)."""
    pairs, ignored = [], list(info.ignored)
    for pair in info.pairs:
        if pair.module not in shapes:
            ignored.append(IgnoredModule(pair.source, f"this model has no {pair.module} (the LoRA was made for a "
                                         "deeper model, or names the last block's absent text output)"))
            continue
        out_features, in_features = shapes[pair.module]
        rows = out_features if pair.part is None else out_features // 3
        if pair.in_features != in_features or pair.rows != rows:
            raise LoraError(LoraProblem.SHAPE_MISMATCH, (
                f"{info.path}: {pair.source} is A [{pair.rank}, {pair.in_features}] / B [{pair.rows}, {pair.rank}], "
                f"but this model's {pair.module} needs A [r, {in_features}] / B [{rows}, r]: the LoRA was trained "
                "for a different model (another width); use a LoRA made for this Mochi model"))
        pairs.append(pair)
    if not pairs:
        raise LoraError(LoraProblem.SHAPE_MISMATCH, f"{info.path}: none of its {len(info.pairs)} layers exists in "
                        "this model; use a LoRA made for this Mochi model")
    return LoraInfo(info.path, info.format, tuple(pairs), tuple(ignored))


