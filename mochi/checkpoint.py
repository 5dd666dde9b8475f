"""Loading Mochi checkpoints: safetensors only, memory-mapped, sized from the tensor shapes.

The module is built on the meta device and the file's tensors are assigned into it
(`load_state_dict(assign=True)`), so a weight kept in its file dtype stays a view of the mapped
file and a converted one exists once: the weights are never held twice. Accepted layouts:
genmo names (`dit.safetensors`, ComfyUI `mochi_preview_bf16.safetensors`), the
`model.diffusion_model.` prefix of full checkpoints, VAE files with a bare or `decoder.`-prefixed
decoder, VAE encoders (bare, or the `encoder.` half of a full VAE), and ComfyUI `fp8_scaled` files (a top-level
`scaled_fp8` marker and a fp32 `<linear>.scale_weight` per Linear: weight = fp8 weight x scale).
Quantised files (`.gguf`, and the GGUF-in-safetensors files made for ComfyUI-MochiWrapper) are
read by `gguf_checkpoint.py`, which shows them here in the model's own names and shapes.
Anything else is refused with a message that says what the file looks like.
"""

import functools
import json
import logging
import os
import re
import struct
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum

import torch

from .constants import WEIGHT_DTYPE_NAMES
from .dit import DiTCompile, DiTConfig, MochiDiT
from .file_kind import MOCHI_ENCODER, FileKind, Slot, recognise, wrong_slot_advice
from .layers import Linear, quantise_fp8

logger = logging.getLogger(__name__)

# Names in constants.WEIGHT_DTYPE_NAMES order; fp8: Linear weights only, with a per-tensor scale.
WEIGHT_DTYPES = dict(zip(WEIGHT_DTYPE_NAMES, (torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn)))
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
FP8_MARKER = "scaled_fp8"
FP32_ONLY = ("pos_frequencies",)  # learned RoPE frequencies: tiny, kept in fp32 whatever the choice
_MAX_HEADER_BYTES = 100 * 2**20
_METADATA_ARCHITECTURE = "modelspec.architecture"  # what a file says it is, shown for unrecognised files


class FileProblem(Enum):
    """What `read_safetensors_header` found wrong with a file (the kind of a CheckpointError)."""

    MISSING = "does not exist"
    NOT_A_FILE = "not a file"
    PICKLE = "a pickle file"
    NOT_SAFETENSORS = "not a safetensors file"
    TRUNCATED = "truncated"
    CORRUPT = "corrupt header"
    WRONG_MODEL = "not the model asked for"


class CheckpointError(ValueError):
    """A file that cannot be loaded as the requested model; `problem` says why (never parse the
    message), the message says why and what to use."""

    def __init__(self, message: str, problem: FileProblem = FileProblem.WRONG_MODEL):
        self.problem = problem
        super().__init__(message)


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors name, e.g. "BF16", "F8_E4M3"
    shape: tuple[int, ...]


@dataclass(frozen=True)
class CheckpointInfo:
    """What a safetensors file contains, read from its header only (no tensor data).

    Args:
        path: the file.
        kind: what the file is (FileKind, a str Enum: FileKind.DIT == "dit", FileKind.VAE == "vae"
            for Mochi's own files; a full checkpoint with a Mochi DiT is "dit").
        tensors: name -> TensorInfo for every tensor in the file.
        dit_prefix: prefix in front of the DiT's genmo names ("" for a bare DiT), None if no DiT.
        vae_decoder_prefix: prefix in front of the VAE decoder's names, None if no decoder.
        has_vae_encoder: the file also holds a VAE encoder (ignored by the decoder loader).
        fp8_scaled: ComfyUI `scaled_fp8` marker present.
        metadata: the header's `__metadata__` strings.
        label: a noun phrase more precise than `kind.description` ("" for that description).
        detail: header evidence for `describe()`, e.g. "12 layers, width 768".
        gguf: a .gguf file (read with the gguf package); `tensors` then has torch-order shapes.
        stored_keys: for GGUF-in-safetensors files, logical key (`<m>.weight`, the quantised type as
            its dtype) -> the key stored in the file (`<m>.Q8_0_qweight`); empty otherwise.
    """

    path: str
    kind: FileKind
    tensors: dict[str, TensorInfo] = field(repr=False)
    dit_prefix: str | None
    vae_decoder_prefix: str | None
    has_vae_encoder: bool
    fp8_scaled: bool
    metadata: dict[str, str] = field(repr=False)
    label: str = ""
    detail: str = ""
    gguf: bool = False
    stored_keys: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def quantised(self) -> bool:
        """GGUF-quantised weights (a .gguf file or GGUF-in-safetensors)."""
        return self.gguf or bool(self.stored_keys)

    def describe(self) -> str:
        """One phrase for error messages, e.g. 'a Mochi VAE (decoder + encoder, 405 tensors, BF16)',
        'a CLIP-L text encoder (12 layers, width 768, 196 tensors, F16)'."""
        counts = Counter(t.dtype for t in self.tensors.values())
        dtypes = "/".join(name for name, _ in counts.most_common(2))
        size = f"{len(self.tensors)} tensors, {dtypes}" if self.tensors else "no tensors"
        if self.kind == "dit":
            pattern = re.compile(rf"{re.escape(self.dit_prefix)}blocks\.(\d+)\.")
            blocks = {m.group(1) for k in self.tensors if (m := pattern.match(k))}
            extra = ", fp8_scaled" if self.fp8_scaled else ", GGUF" if self.gguf else \
                ", GGUF in safetensors" if self.stored_keys else ""
            return f"a Mochi DiT / diffusion model ({len(blocks)} blocks, {size}{extra})"
        if self.kind == "vae":
            parts = " + ".join(p for p, present in (("decoder", self.vae_decoder_prefix is not None),
                                                     ("encoder", self.has_vae_encoder)) if present)
            return f"a Mochi VAE ({parts}, {size})"
        if self.kind == FileKind.UNKNOWN:
            first = ", ".join(sorted(self.tensors)[:3])
            claimed = self.metadata.get(_METADATA_ARCHITECTURE)
            claim = f"; its metadata says {_METADATA_ARCHITECTURE}={claimed!r}" if claimed else ""
            return f"{self.kind.description} ({size}; first keys: {first or 'none'}{claim})"
        evidence = f"{self.detail}, {size}" if self.detail else size
        return f"{self.label or self.kind.description} ({evidence})"

    def dit_names(self) -> dict[str, str]:
        """The DiT's genmo names -> their keys in this file (prefix stripped); {} without a DiT."""
        if self.dit_prefix is None:
            return {}
        return {key[len(self.dit_prefix):]: key for key in self.tensors if key.startswith(self.dit_prefix)}

    def wrong_slot_advice(self, slot: Slot | str, *, dit_input: str = "dit_name", vae_input: str = "vae_name") -> str:
        """Where this file belongs and what the slot needs, for a message that already says what the
        file is (`describe()`); "" when the file is right for the slot.

        Args:
            slot: the input the file was given to: Slot.DIT / "dit" or Slot.VAE / "vae".
            dit_input, vae_input: the inputs' names as the user sees them ("--dit" / "--vae" in the CLI).

        Returns:
            e.g. for a CLIP-L file in the DiT slot: "It belongs in models/text_encoders/; Mochi does not
            use it: Mochi's text encoder is T5-XXL (e.g. t5xxl_fp16.safetensors), loaded with CLIPLoader
            type mochi. Pick the Mochi DiT here: mochi_preview_bf16.safetensors (or genmo's
            dit.safetensors) from models/diffusion_models/."
        """
        return wrong_slot_advice(self.kind, slot, mochi_vae_has_decoder=self.vae_decoder_prefix is not None,
                                 dit_input=dit_input, vae_input=vae_input)


def _refuse_pickle(path: str, reason: str) -> CheckpointError:
    return CheckpointError(
        f"{path} {reason}. Pickle checkpoints can run arbitrary code when loaded and are not "
        "supported: use the .safetensors version of this model (e.g. mochi_preview_bf16.safetensors "
        "for the DiT, mochi_vae.safetensors for the VAE).", FileProblem.PICKLE
    )


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and check a safetensors header without touching tensor data: the one place that decides
    what a file is on disk (the DiT, VAE and LoRA readers all come here).

    Raises CheckpointError (its `problem` a FileProblem) for a missing path, a directory, a pickle
    file, a non-safetensors file, a corrupt header and a truncated file (a tensor's bytes reach past
    the end of the file).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path} does not exist; check the path (models go in ComfyUI's models/ folders)",
                              FileProblem.MISSING)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is not a file (a directory?); give the path of a .safetensors file",
                              FileProblem.NOT_A_FILE)
    if path.lower().endswith(PICKLE_SUFFIXES):
        raise _refuse_pickle(path, f"is a pickle checkpoint ({os.path.splitext(path)[1]})")
    file_size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(9)
        # A safetensors file starts with its header's length (8 bytes, little-endian) and the JSON
        # header, so byte 8 is "{"; zip and pickle files never have that there. A header of 0x0280..
        # 0x05ff bytes starts like a pickle's protocol mark (0x80 0x02..0x05), but its third byte is
        # 0 (headers stay far below 16 MB) where a pickle has an opcode (none is 0).
        json_start = head[8:9] == b"{"
        pickle_mark = len(head) >= 3 and head[0] == 0x80 and head[1] in (2, 3, 4, 5) and head[2] != 0
        if not json_start and (head[:2] == b"PK" or pickle_mark):
            raise _refuse_pickle(path, "is a pickle / torch.save file, not safetensors")
        if len(head) < 9:
            raise CheckpointError(f"{path} is only {file_size} bytes: not a safetensors file (empty or truncated)",
                                  FileProblem.TRUNCATED)
        (header_len,) = struct.unpack("<Q", head[:8])
        if not json_start or header_len > _MAX_HEADER_BYTES:
            raise CheckpointError(f"{path} is not a safetensors file (no JSON header); give a .safetensors file",
                                  FileProblem.NOT_SAFETENSORS)
        if 8 + header_len > file_size:
            raise CheckpointError(
                f"{path} is truncated: its header needs {8 + header_len} bytes but the file has {file_size} "
                "(an incomplete download or copy?); download the file again", FileProblem.TRUNCATED
            )
        f.seek(8)
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(
                f"{path} has a corrupt safetensors header ({error}); download the file again", FileProblem.CORRUPT
            ) from None
    metadata = header.pop("__metadata__", None) or {}
    tensors = {}
    data_end = 0
    for name, entry in header.items():
        tensors[name] = TensorInfo(entry["dtype"], tuple(entry["shape"]))
        data_end = max(data_end, entry["data_offsets"][1])
    if 8 + header_len + data_end > file_size:
        raise CheckpointError(
            f"{path} is truncated: its tensors need {8 + header_len + data_end} bytes but the file has "
            f"{file_size} (an incomplete download or copy?); download the file again", FileProblem.TRUNCATED
        )
    return tensors, metadata


def inspect_checkpoint(path: str | os.PathLike) -> CheckpointInfo:
    """Tell what a safetensors or GGUF file is from its header (see CheckpointInfo and file_kind.recognise)."""
    from .gguf_checkpoint import is_gguf_file, logical_view, read_gguf_header

    gguf, stored_keys = os.path.isfile(path) and is_gguf_file(path), {}
    if gguf:
        try:
            header, metadata = read_gguf_header(os.fspath(path))
        except ValueError as error:
            raise CheckpointError(str(error)) from None
        tensors = {name: TensorInfo(dtype, shape) for name, (dtype, shape) in header.items()}
    else:
        tensors, metadata = read_safetensors_header(path)
        logical, stored_keys = logical_view({name: (t.dtype, t.shape) for name, t in tensors.items()})
        if stored_keys:
            tensors = {name: TensorInfo(dtype, shape) for name, (dtype, shape) in logical.items()}
    found = recognise({name: tensor.shape for name, tensor in tensors.items()})
    names = list(tensors)
    return CheckpointInfo(
        path=os.fspath(path), kind=found.kind, tensors=tensors, dit_prefix=found.dit_prefix,
        vae_decoder_prefix=found.vae_decoder_prefix, has_vae_encoder=found.has_vae_encoder,
        fp8_scaled=any(n == FP8_MARKER or n.endswith("." + FP8_MARKER) for n in names), metadata=metadata,
        label=found.label, detail=found.detail, gguf=gguf, stored_keys=stored_keys,
    )


def _check_keys(path: str, what: str, got: dict[str, TensorInfo], expected: dict[str, torch.Size], hint: str):
    """Strict key and shape check with a message listing the first offenders."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))

    def listing(keys):
        return ", ".join(keys[:5]) + (f", ... ({len(keys)} in all)" if len(keys) > 5 else "")

    if missing:
        raise CheckpointError(
            f"{path} looks like {what} but is missing {len(missing)} tensor(s): {listing(missing)}. "
            f"The file is incomplete or from a different model; {hint}"
        )
    if unexpected:
        raise CheckpointError(
            f"{path} has {len(unexpected)} unexpected tensor(s) for {what}: {listing(unexpected)}. "
            f"It is a different model or a modified file; {hint}"
        )
    for name, size in expected.items():
        if tuple(got[name].shape) != tuple(size):
            raise CheckpointError(
                f"{path}: tensor {name} has shape {list(got[name].shape)}, but the sizes inferred from "
                f"the rest of the file need {list(size)}; the file is inconsistent or modified; {hint}"
            )


def _split_aux(names: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """Separate fp8_scaled extras (`<linear>.scale_weight`; `scale_input` is unused) from weights.
    names: stripped -> full key. Returns (weights, scale_weight keys by Linear weight name)."""
    weights, scales = {}, {}
    for short, full in names.items():
        if short.endswith(".scale_weight"):
            scales[short[: -len(".scale_weight")] + ".weight"] = full
        elif short.endswith(".scale_input") or short == FP8_MARKER:
            continue
        else:
            weights[short] = full
    return weights, scales


def _load_into(
    model: torch.nn.Module,
    path: str,
    weights: dict[str, str],
    scales: dict[str, str],
    weight_dtype: str,
    device: torch.device,
    metadata: dict[str, str],
) -> None:
    """Read tensors from the mapped file, convert by the dtype policy and assign them into `model`
    (built on the meta device). A tensor already in the target dtype on CPU stays a view of the file."""
    from safetensors import safe_open  # the only reader; keeps import of this module light

    if "mochi_xdit_demo" in metadata:  # written by demo.demo_checkpoints
        bar = "!" * 100
        logger.warning("\n%s\n!!! %s (%s)\n%s", bar, metadata.get("notice", "demo weights"), path, bar)

    linear_weights = {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, Linear)}
    high = torch.bfloat16 if weight_dtype == "fp8" else WEIGHT_DTYPES[weight_dtype]
    state, fp8_scales = {}, {}
    with safe_open(path, framework="pt", device="cpu") as f:
        for name, full in weights.items():
            tensor = f.get_tensor(full).to(device)
            scale = f.get_tensor(scales[name]).to(device).float().reshape(()) if name in scales else None
            if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) and scale is None:
                scale = torch.ones((), device=device)  # plain fp8 file: scale 1
            if weight_dtype == "fp8" and name in linear_weights:
                if tensor.dtype != torch.float8_e4m3fn:
                    tensor, scale = quantise_fp8(tensor if scale is None else tensor.float() * scale)
                fp8_scales[name] = scale
            elif scale is not None:
                tensor = (tensor.float() * scale).to(high)  # dequantise fp8_scaled
            elif name in FP32_ONLY:
                tensor = tensor.float()
            elif tensor.is_floating_point():
                tensor = tensor.to(high)
            state[name] = tensor
    model.load_state_dict(state, strict=True, assign=True)
    modules = dict(model.named_modules())
    for name, scale in fp8_scales.items():
        modules[name[: -len(".weight")]].scale_weight = scale
    model.requires_grad_(False)
    model.eval()


def _check_dtype(weight_dtype: str, allowed: tuple[str, ...]) -> None:
    if weight_dtype not in allowed:
        raise ValueError(f"weight_dtype={weight_dtype!r}; use one of {', '.join(allowed)}")


def load_dit(path: str | os.PathLike, weight_dtype: str = "bf16", device: str | torch.device = "cpu",
             compile: DiTCompile = DiTCompile.OFF) -> MochiDiT:
    """Load a Mochi DiT of any size from safetensors (genmo names, optional ComfyUI prefix, fp8_scaled).

    Args:
        path: the .safetensors file, or a .gguf file / GGUF-in-safetensors file (Linear weights stay
            quantised, dequantised per layer at call time; `gguf_checkpoint.py`).
        weight_dtype: "bf16", "fp16", "fp32", or "fp8" (Linear weights stored as float8_e4m3fn with
            a per-tensor scale, cast at call time; everything else bf16; not for GGUF files).
            `pos_frequencies` is always fp32.
        device: where the weights live; on CPU, weights already in the target dtype stay memory-mapped.
        compile: `dit.DiTCompile` (ON compiles the blocks' regions between collectives at the first
            forward).

    Returns:
        MochiDiT in eval mode without gradients; `model.config` holds the inferred size.
    """
    _check_dtype(weight_dtype, tuple(WEIGHT_DTYPES))
    path = os.fspath(path)
    info = inspect_checkpoint(path)
    hint = "use a Mochi DiT file such as mochi_preview_bf16.safetensors (ComfyUI models/diffusion_models)."
    if info.kind != FileKind.DIT:
        advice = info.wrong_slot_advice(Slot.DIT, dit_input="the DiT input", vae_input="the VAE input")
        raise CheckpointError(f"{path} looks like {info.describe()}, but a Mochi DiT was expected. {advice}")
    weights, scales = _split_aux(info.dit_names())
    model = _build_on_meta(path, info, weights, DiTConfig, functools.partial(MochiDiT, compile=compile), "the model",
                           hint)
    if info.quantised:
        from .gguf_checkpoint import load_quantised_into

        if weight_dtype == "fp8":
            raise CheckpointError(f"{path} is already quantised (GGUF); load it with weight_dtype bf16, fp16 or fp32 "
                                  "(the dtype of its unquantised tensors and of the compute)")
        load_quantised_into(model, path, weights, info.stored_keys, info.gguf, WEIGHT_DTYPES[weight_dtype],
                            torch.device(device))
    else:
        _load_into(model, path, weights, scales, weight_dtype, torch.device(device), info.metadata)
    return model


def load_vae_decoder(path: str | os.PathLike, weight_dtype: str = "fp32", device: str | torch.device = "cpu"):
    """Load Mochi's VAE decoder from a bare decoder file or a full VAE (`decoder.` prefix; the
    encoder's tensors are ignored).

    Args:
        path: the .safetensors file (genmo decoder.safetensors or ComfyUI mochi_vae.safetensors).
        weight_dtype: "fp32" (CPU), "bf16" or "fp16".
        device: where the weights live.

    Returns:
        MochiVAEDecoder in eval mode without gradients.
    """
    from .vae import MochiVAEDecoder, VAEDecoderConfig

    _check_dtype(weight_dtype, ("bf16", "fp16", "fp32"))
    path = os.fspath(path)
    info = inspect_checkpoint(path)
    hint = "use Mochi's VAE file such as mochi_vae.safetensors (ComfyUI models/vae) or genmo's decoder.safetensors."
    if info.kind == FileKind.VAE and info.vae_decoder_prefix is None:
        raise CheckpointError(f"{path} looks like {info.describe()}: it has no decoder; {hint}")
    if info.kind != FileKind.VAE:
        advice = info.wrong_slot_advice(Slot.VAE, dit_input="the DiT input", vae_input="the VAE input")
        raise CheckpointError(f"{path} looks like {info.describe()}, but a Mochi VAE was expected. {advice}")
    prefix = info.vae_decoder_prefix
    if prefix:
        names = {k[len(prefix):]: k for k in info.tensors if k.startswith(prefix)}
    else:  # bare decoder: everything except a possible encoder
        names = {k: k for k in info.tensors if not MOCHI_ENCODER.search(k)}
    model = _build_on_meta(path, info, names, VAEDecoderConfig, MochiVAEDecoder, "the decoder", hint)
    _load_into(model, path, names, {}, weight_dtype, torch.device(device), info.metadata)
    return model


VAE_ENCODER_PREFIXES = ("encoder.", "vae.encoder.", "")  # ComfyUI's full VAE, a full checkpoint, genmo's file
# Which files carry Mochi's VAE encoder, said once for every message that refuses a file without it.
ENCODER_FILES = (
    "ComfyUI's mochi_vae.safetensors (Comfy-Org's repackage: encoder + decoder) and genmo's "
    "encoder.safetensors carry the encoder; genmo's decoder.safetensors and other decoder-only files "
    "(e.g. kijai's mochi_preview_vae_decoder_*) do not"
)


def vae_encoder_prefix(info: CheckpointInfo) -> str | None:
    """Prefix in front of the VAE encoder's names in this file ("encoder.", "vae.encoder." or ""
    for genmo's bare encoder.safetensors), None when the file has no encoder."""
    if not info.has_vae_encoder:
        return None
    for prefix in VAE_ENCODER_PREFIXES:
        if f"{prefix}layers.0.weight" in info.tensors:
            return prefix
    return None


def require_vae_encoder(path: str | os.PathLike) -> tuple[CheckpointInfo, str]:
    """What `path` is and the prefix of its VAE encoder (header only).

    Raises CheckpointError for a file that is not a Mochi VAE, or a VAE without an encoder (the
    message says which files carry one).
    """
    path = os.fspath(path)
    info = inspect_checkpoint(path)
    if info.kind != FileKind.VAE:
        advice = info.wrong_slot_advice(Slot.VAE, dit_input="the DiT input", vae_input="the VAE input")
        raise CheckpointError(f"{path} looks like {info.describe()}, but a Mochi VAE was expected. {advice}")
    prefix = vae_encoder_prefix(info)
    if prefix is None:
        raise CheckpointError(
            f"{path} looks like {info.describe()}: it has no encoder, so it cannot encode video; "
            f"use a Mochi VAE file with an encoder: {ENCODER_FILES}."
        )
    return info, prefix


def load_vae_encoder(path: str | os.PathLike, weight_dtype: str = "fp32", device: str | torch.device = "cpu"):
    """Load Mochi's VAE encoder from genmo's encoder.safetensors (bare names) or a full VAE
    (`encoder.` prefix; the decoder's tensors are ignored).

    Args:
        path: the .safetensors file.
        weight_dtype: "fp32" (CPU), "bf16" or "fp16".
        device: where the weights live.

    Returns:
        MochiVAEEncoder in eval mode without gradients.

    Raises CheckpointError as `require_vae_encoder` does, or for a broken encoder.
    """
    from .vae_encoder import MochiVAEEncoder, VAEEncoderConfig

    _check_dtype(weight_dtype, ("bf16", "fp16", "fp32"))
    path = os.fspath(path)
    info, prefix = require_vae_encoder(path)
    if prefix:
        names = {k[len(prefix):]: k for k in info.tensors if k.startswith(prefix)}
    else:  # genmo's bare encoder (a bare decoder's names would clash with its output_proj)
        names = {k: k for k in info.tensors if k.startswith(("layers.", "output_norm.", "output_proj."))}
    hint = f"use a Mochi VAE file with an encoder: {ENCODER_FILES}."
    model = _build_on_meta(path, info, names, VAEEncoderConfig, MochiVAEEncoder, "the encoder", hint)
    _load_into(model, path, names, {}, weight_dtype, torch.device(device), info.metadata)
    return model


def _build_on_meta(path, info, names: dict[str, str], config_class, model_class, what: str, hint: str):
    """Size a model from the file's shapes and build it on the meta device (no memory), after
    checking that the file's tensors are exactly the model's.

    Args:
        names: model key -> key in the file.
        config_class: has `from_shapes(shapes)` raising KeyError for a missing sizing tensor.
        what: "the model" / "the decoder", for messages.
    """
    shapes = {name: info.tensors[full].shape for name, full in names.items()}
    try:
        config = config_class.from_shapes(shapes)
    except KeyError as error:
        raise CheckpointError(
            f"{path} looks like {info.describe()} but is missing tensor {error.args[0]!r}, which sizes "
            f"{what}; the file is incomplete or from a different model; {hint}"
        ) from None
    except (ValueError, IndexError) as error:
        raise CheckpointError(
            f"{path} looks like {info.describe()} but its shapes are inconsistent ({error}); {hint}"
        ) from None
    with torch.device("meta"):
        model = model_class(config)
    expected = {name: t.shape for name, t in model.state_dict().items()}
    _check_keys(path, info.describe(), {n: info.tensors[f] for n, f in names.items()}, expected, hint)
    return model
