"""Reading quantised Mochi DiT files: GGUF files, and the GGUF-in-safetensors files made for
ComfyUI-MochiWrapper.

- `.gguf` (read with the `gguf` package, memory-mapped): tensor names are the source checkpoint's,
  with a `model.diffusion_model.` / `model.` prefix stripped (city96's ComfyUI-GGUF
  `tools/convert.py`, which the common DiT GGUFs come from); 1-D and tiny tensors stay F32, the
  rest F16 / BF16 or a quantised type. GGUF lists dimensions innermost first, so shapes are
  reversed here; a `comfy.gguf.orig_shape.<name>` array, where present, gives the real shape.
- GGUF-in-safetensors (`mochi_preview_dit_GGUF_Q8_0.safetensors`, `..._Q4_0_v2.safetensors` on
  Kijai/Mochi_preview_comfy): genmo names; a quantised Linear `<m>` has a U8 tensor
  `<m>.Q8_0_qweight` or `<m>.Q4_0_qweight` [out, in / 32 * 34 or 18] holding GGML blocks, beside
  its `<m>.bias`; everything else is a plain tensor. (Layout read in ComfyUI-MochiWrapper's
  `mz_gguf_loader.py`, which loads them; no such file was at hand to check its header.)

Both are shown to the rest of the loader in the model's own terms (`logical_view`): `<m>.weight`
with the Linear's [out, in] shape and the quantised type as its dtype name, so recognising and
sizing the model is the same code as for any checkpoint. Linear weights of the types
`gguf_linear.GGUFQuant` knows stay quantised (`GGUFLinear`); any other quantised tensor (a
convolution, other block types) is dequantised once at load.
"""

import logging
import os
import warnings

import numpy as np
import torch

from .gguf_linear import GGUFQuant, quantised_linear
from .layers import Linear

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
ORIG_SHAPE_PREFIX = "comfy.gguf.orig_shape."
STRIPPED_PREFIXES = ("model.diffusion_model.", "model.")  # what city96's converter strips
SAFETENSORS_QUANT_SUFFIXES = {".Q8_0_qweight": GGUFQuant.Q8_0, ".Q4_0_qweight": GGUFQuant.Q4_0}
PLAIN_GGUF_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
FP32_ONLY = ("pos_frequencies",)


def is_gguf_file(path: str | os.PathLike) -> bool:
    """True when the file starts with GGUF's magic."""
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def _reader(path: str):
    try:
        import gguf
    except ImportError:
        raise ImportError(f"{path} is a GGUF file; reading it needs the gguf package: pip install gguf") from None
    try:
        return gguf.GGUFReader(path, "r")
    except (ValueError, OSError, IndexError) as error:
        raise ValueError(f"{path} is not a readable GGUF file ({error}); download it again") from None


def read_gguf_header(path: str) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, str]]:
    """Tensor names -> (type name, shape in torch order) and the string metadata of a GGUF file."""
    reader = _reader(path)
    orig_shapes, metadata = {}, {}
    for name, field in reader.fields.items():
        if name.startswith(ORIG_SHAPE_PREFIX):
            orig_shapes[name[len(ORIG_SHAPE_PREFIX):]] = tuple(int(v) for v in field.contents())
        elif not name.startswith("GGUF."):
            value = field.contents()
            if isinstance(value, (str, int, float)):
                metadata[name] = str(value)
    tensors = {}
    for tensor in reader.tensors:
        shape = orig_shapes.get(tensor.name, tuple(int(n) for n in reversed(tensor.shape.tolist())))
        tensors[tensor.name] = (tensor.tensor_type.name, shape)
    return tensors, metadata


def logical_view(tensors: dict[str, tuple[str, tuple[int, ...]]]) -> tuple[dict[str, tuple[str, tuple[int, ...]]],
                                                                        dict[str, str]]:
    """A GGUF-in-safetensors header in the model's terms.

    Args:
        tensors: stored key -> (dtype name, shape) of a safetensors header.

    Returns:
        (logical key -> (dtype name, shape): `<m>.Q8_0_qweight` U8 [out, row_bytes] becomes
        `<m>.weight` "Q8_0" [out, in]; logical key -> stored key, for the renamed ones only).
    """
    logical, stored = {}, {}
    for key, (dtype, shape) in tensors.items():
        suffix = next((s for s in SAFETENSORS_QUANT_SUFFIXES if key.endswith(s)), None)
        if suffix is None or len(shape) != 2:
            logical[key] = (dtype, shape)
            continue
        quant = SAFETENSORS_QUANT_SUFFIXES[suffix]
        out_features, row_bytes = shape
        name = key[: -len(suffix)] + ".weight"
        logical[name] = (quant.value, (out_features, row_bytes // quant.block_bytes * quant.block_elements))
        stored[name] = key
    return logical, stored


def _gguf_tensors(path: str) -> dict[str, tuple[str, np.ndarray, tuple[int, ...]]]:
    """name -> (type name, memory-mapped data, torch-order shape) of every tensor in a GGUF file."""
    reader = _reader(path)
    shapes = dict((name, shape) for name, (_, shape) in read_gguf_header(path)[0].items())
    return {t.name: (t.tensor_type.name, t.data, shapes[t.name]) for t in reader.tensors}


def _to_torch(array: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():  # the mapping is read-only; nothing here writes to it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def _dense(type_name: str, data: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    """A stored tensor as a dense one of `shape` (dequantised when it is quantised)."""
    if type_name in PLAIN_GGUF_TYPES:
        tensor = _to_torch(data)
        if tensor.dtype == torch.uint8:  # BF16 comes back as raw bytes
            tensor = tensor.view(PLAIN_GGUF_TYPES[type_name])
        return tensor.reshape(shape)
    if type_name in GGUFQuant.__members__:
        from .gguf_linear import dequantize

        return dequantize(_to_torch(data), GGUFQuant(type_name)).reshape(shape)
    import gguf

    return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(data, gguf.GGMLQuantizationType[type_name]))
                            ).reshape(shape)


def load_quantised_into(model: torch.nn.Module, path: str, names: dict[str, str], stored_keys: dict[str, str],
                        is_gguf: bool, high: torch.dtype, device: torch.device) -> None:
    """Assign a quantised file's tensors into `model` (built on the meta device): Linear weights of a
    known GGUFQuant become GGUFLinear layers holding the bytes; everything else is dense, in the
    dtype policy of `checkpoint.load_dit` (bf16 / fp16 / fp32; `pos_frequencies` fp32).

    Args:
        model: MochiDiT on the meta device (its keys were checked against the file's logical ones).
        path: the file.
        names: model key -> logical key in the file (with any prefix).
        stored_keys: logical key -> stored key where they differ (GGUF-in-safetensors).
        is_gguf: a .gguf file (else safetensors).
        high: torch.bfloat16, float16 or float32 for the dense tensors (`checkpoint.load_dit` refuses
            fp8 for these files before calling).
        device: where the weights live.
    """
    modules = dict(model.named_modules())
    linear_weights = {f"{name}.weight": name for name, module in modules.items() if isinstance(module, Linear)}
    raw: dict[str, tuple[str, object, tuple[int, ...]]] = {}
    if is_gguf:
        stored = _gguf_tensors(path)
        for name, key in names.items():
            raw[name] = stored[key]
    else:
        from safetensors import safe_open

        with safe_open(path, framework="pt", device="cpu") as f:
            for name, key in names.items():
                stored_key = stored_keys.get(key, key)
                tensor = f.get_tensor(stored_key)
                quant = next((q for s, q in SAFETENSORS_QUANT_SUFFIXES.items() if stored_key.endswith(s)), None)
                raw[name] = (quant.value if quant else "dense", tensor, None)

    state, quantised, fallback = {}, {}, set()
    for name, (type_name, data, shape) in raw.items():
        if name in linear_weights and type_name in GGUFQuant.__members__:
            quantised[name] = (GGUFQuant(type_name), _to_torch(data) if isinstance(data, np.ndarray) else data)
            continue
        if type_name == "dense":
            tensor = data
        else:
            tensor = _dense(type_name, data, shape)
            if type_name not in PLAIN_GGUF_TYPES and name in linear_weights:
                fallback.add(type_name)
        tensor = tensor.float() if name in FP32_ONLY else tensor.to(high) if tensor.is_floating_point() else tensor
        state[name] = tensor.to(device)
    if fallback:
        logger.warning("%s: Linear weights of type %s are dequantised at load (only %s stay quantised in memory)",
                       path, ", ".join(sorted(fallback)), ", ".join(q.value for q in GGUFQuant))
    for name, (quant, data) in quantised.items():
        module_name = linear_weights[name]
        bias = state.pop(f"{module_name}.bias", None)
        layer = quantised_linear(modules[module_name], quant, data.reshape(data.shape[0], -1).to(device), bias)
        parent_name, _, child = module_name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, layer)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    covered = set(quantised) | {f"{linear_weights[name]}.bias" for name in quantised}  # set on the GGUFLinears
    left = [key for key in missing if key not in covered]
    if left or unexpected:
        raise CheckpointError(f"{path}: tensors left unassigned {left[:5]} or unexpected {unexpected[:5]}; "
                              "the file does not match the model it was sized as")
    model.requires_grad_(False)
    model.eval()
