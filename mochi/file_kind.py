"""What a safetensors file is, told from its header alone (key names and shapes), so that a wrong
file in the DiT or VAE slot is named for what it is and sent where it belongs.

Users' model folders hold many files that look alike from a distance: CLIP's
`text_model.encoder.layers.N` is not Mochi's VAE encoder (`encoder.layers.N.stack`), SD3 has
`x_embedder` and `t_embedder` as Mochi does, and diffusers' Mochi has a bare `pos_frequencies`.
So every kind is recognised by keys only it has, checked most specific first; shapes settle the
variants (CLIP width 768 / 1280 / 1024, T5 width 4096, UMT5's vocabulary of 256384, VAE latent
channels from `decoder.conv_in`). Key names are those of the files ComfyUI loads (read in its
`comfy/model_detection.py`, `comfy/sd.py`) and of diffusers' models.
"""

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

UMT5_VOCAB = 256384  # Wan's UMT5-XXL; T5-XXL has 32128
XXL_WIDTH = 4096  # T5-XXL and UMT5-XXL model width
MOCHI_LATENT_CHANNELS = 12
LORA_SHARE = 0.5  # a LoRA file is mostly LoRA tensors; a model with one stray LoRA key is still a model


class FileKind(str, Enum):
    """The kinds of model file users keep in ComfyUI's models/ folders. A `str` Enum: the Mochi
    kinds compare equal to their old string values ("dit", "vae", "t5", "unknown")."""

    description: str

    def __new__(cls, value: str, description: str):
        member = str.__new__(cls, value)
        member._value_ = value
        member.description = description
        return member

    def __str__(self) -> str:
        return self.value

    DIT = "dit", "a Mochi DiT / diffusion model"
    VAE = "vae", "a Mochi VAE"
    MOCHI_DIFFUSERS = "mochi_diffusers", "a Mochi DiT in diffusers' layout"
    T5 = "t5", "a T5 text encoder"
    UMT5 = "umt5", "a UMT5 text encoder (Wan's)"
    CLIP_L = "clip_l", "a CLIP-L text encoder"
    CLIP_G = "clip_g", "a CLIP-G text encoder"
    CLIP_H = "clip_h", "a CLIP-H text encoder (OpenCLIP ViT-H, SD 2.x)"
    CLIP_TEXT = "clip_text", "a CLIP text encoder"
    CLIP_VISION = "clip_vision", "a CLIP vision encoder"
    LLM_TEXT = "llm_text", "a language-model text encoder (Llama / Qwen / Gemma style)"
    HUNYUAN_VIDEO = "hunyuan_video", "a HunyuanVideo DiT"
    WAN = "wan", "a Wan video DiT"
    LTX_VIDEO = "ltx_video", "an LTX-Video DiT"
    COGVIDEOX = "cogvideox", "a CogVideoX DiT"
    FLUX = "flux", "a Flux DiT (image model)"
    SD3 = "sd3", "an SD3 DiT (MMDiT, image model)"
    SD_UNET = "sd_unet", "a Stable Diffusion UNet"
    SD_VAE = "sd_vae", "an SD / SDXL VAE"
    FLUX_VAE = "flux_vae", "a Flux / SD3 VAE"
    IMAGE_VAE = "image_vae", "an image VAE"
    VIDEO_VAE = "video_vae", "another video model's VAE"
    LORA = "lora", "a LoRA"
    UNKNOWN = "unknown", "an unrecognised safetensors file"


CLIP_TEXT_WIDTHS = {768: FileKind.CLIP_L, 1280: FileKind.CLIP_G, 1024: FileKind.CLIP_H}


class Slot(str, Enum):
    """The two model inputs a wrong file can be given to."""

    DIT = "dit"
    VAE = "vae"


@dataclass(frozen=True)
class Recognition:
    """What `recognise` found.

    Args:
        kind: the file's kind.
        label: a noun phrase more precise than `kind.description` where the shapes tell (e.g.
            "a T5-XXL text encoder"); "" for the kind's own description.
        detail: header evidence for a description, e.g. "12 layers, width 768"; "" when none.
        dit_prefix: prefix in front of a Mochi DiT's genmo names ("" for bare), None without one.
        vae_decoder_prefix: prefix in front of a Mochi VAE decoder's names, None without one.
        has_vae_encoder: the file holds a Mochi VAE encoder.
    """

    kind: FileKind
    label: str = ""
    detail: str = ""
    dit_prefix: str | None = None
    vae_decoder_prefix: str | None = None
    has_vae_encoder: bool = False

    @property
    def noun(self) -> str:
        """The file's kind as a noun phrase for messages."""
        return self.label or self.kind.description


MOCHI_DIT_PREFIXES = ("model.diffusion_model.", "diffusion_model.")  # else bare genmo names
MOCHI_VAE_DECODER_PREFIXES = ("decoder.", "vae.decoder.")  # else a bare decoder

# Mochi: keys only genmo's AsymmDiT has (SD3 and PixArt also have x_embedder / t_embedder /
# final_layer; diffusers' Mochi has a bare pos_frequencies), matched after the prefix.
_MOCHI_DIT = re.compile(r"^(t5_yproj|t5_y_embedder)\.|^blocks\.\d+\.(attn\.qkv_x|mod_x)\.")
# Mochi VAE decoder after its prefix: blocks.0.0 (conv in), blocks.N.blocks.M.stack, blocks.N.proj,
# and output_proj under a `decoder.` prefix (a bare output_proj is also the encoder's last layer)
_MOCHI_DECODER = re.compile(r"^blocks\.\d+\.(\d+\.|blocks\.\d+\.stack\.|proj\.)")
_MOCHI_DECODER_OUTPUT = re.compile(r"^output_proj\.")
# Mochi VAE encoder: res blocks `layers.N.stack` / `layers.N.attn_block`, down blocks
# `layers.N.layers.M.stack`, bare or under `encoder.`, and the input conv `encoder.layers.0`
# (CLIP's `text_model.encoder.layers.N.self_attn` is none of these)
MOCHI_ENCODER = re.compile(r"^(vae\.)?(encoder\.)?layers\.\d+\.(layers\.\d+\.)?(stack|attn_block)\."
                           r"|^(vae\.)?encoder\.layers\.\d+\.(weight|bias)$")
_MOCHI_DIFFUSERS = re.compile(r"(^|\.)transformer_blocks\.\d+\.attn1\.add_q_proj\.")
_POS_FREQUENCIES = re.compile(r"(^|\.)pos_frequencies$")
_LORA = re.compile(r"(lora_up|lora_down|lora_A|lora_B|lora\.up|lora\.down|lora_mid|hada_w\d|lokr_w\d)"
                   r"(\.|_)|\.alpha$|\.dora_scale$")

# Other models' LoRAs, told by module names only they have (dotted, or kohya's underscores), even
# when some names coincide with Mochi's; the LoRA reader (lora_files.py) refuses them by name. SD3's
# `transformer_blocks.N.attn` also covers Flux / HunyuanVideo-style files (Mochi has attn1 there).
LORA_FAMILIES = (
    (FileKind.FLUX, re.compile(r"(^|[._])(double_blocks|single_blocks|single_transformer_blocks)[._]")),
    (FileKind.SD_UNET, re.compile(r"(^|[._])(down_blocks|up_blocks|mid_block|input_blocks|output_blocks|"
                                  r"middle_block)[._]|^lora_te\d?_")),
    (FileKind.WAN, re.compile(r"(^|[._])blocks[._]\d+[._](self_attn|cross_attn)[._]")),
    (FileKind.SD3, re.compile(r"(^|[._])transformer_blocks[._]\d+[._]attn[._]")),
)

_DOUBLE_BLOCK = re.compile(r"(^|\.)double_blocks\.(?P<index>\d+)\.")
_SINGLE_BLOCK = re.compile(r"(^|\.)single_blocks\.(?P<index>\d+)\.")
_TRANSFORMER_BLOCK = re.compile(r"(^|\.)transformer_blocks\.(?P<index>\d+)\.")
_SINGLE_TRANSFORMER_BLOCK = re.compile(r"(^|\.)single_transformer_blocks\.(?P<index>\d+)\.")
_HUNYUAN_REFINER = re.compile(r"(^|\.)(txt_in\.individual_token_refiner|context_embedder\.token_refiner)\.")
_FLUX_IMG_IN = re.compile(r"(^|\.)(img_in|x_embedder)\.weight$")
_WAN_BLOCK = re.compile(r"(^|\.)blocks\.(?P<index>\d+)\.(self_attn|cross_attn|attn1|attn2)\.")
_WAN_PATCH = re.compile(r"(^|\.)patch_embedding\.weight$")
_LTX_TIME = re.compile(r"(^|\.)(adaln_single|time_embed\.emb)\.")
_CAPTION_PROJECTION = re.compile(r"(^|\.)caption_projection\.")
_PIXART_POS = re.compile(r"(^|\.)pos_embed\.proj\.")
_COGVIDEOX = re.compile(r"(^|\.)patch_embed\.(proj|text_proj)\.")
_COG_TIME = re.compile(r"(^|\.)time_embedding\.linear_1\.")
_SD3_JOINT = re.compile(r"(^|\.)joint_blocks\.(?P<index>\d+)\.")
_SD3_DIFFUSERS = re.compile(r"(^|\.)transformer_blocks\.(?P<index>\d+)\.attn\.add_q_proj\.")
_UNET_INPUT = re.compile(r"(^|\.)input_blocks\.(\d+)\.")
_UNET_DIFFUSERS = re.compile(r"^(unet\.)?down_blocks\.(\d+)\.(resnets|attentions)\.")
_UNET_CROSS_ATTN = re.compile(r"\.attn2\.to_k\.weight$")
_UNET_SDXL = re.compile(r"(^|\.)(label_emb|add_embedding)\.")
_FULL_CHECKPOINT = re.compile(r"^(first_stage_model|cond_stage_model|conditioner)\.")

_WAN_VAE = re.compile(r"(^|\.)decoder\.middle\.0\.residual\.0\.gamma$")
_WAN22_VAE = re.compile(r"(^|\.)decoder\.upsamples\.0\.upsamples\.0\.")
_WAN_VAE_Z = re.compile(r"(^|\.)decoder\.conv1\.weight$")
_LTX_VAE = re.compile(r"(^|\.)decoder\.up_blocks\.\d+\.res_blocks\.\d+\.conv1\.conv\.weight$")
_VIDEO_VAE_CONV_IN = re.compile(r"(^|\.)decoder\.conv_in\.conv\.weight$")
_IMAGE_VAE_CONV_IN = re.compile(r"(^|\.)decoder\.conv_in\.weight$")
_IMAGE_VAE_BODY = re.compile(r"(^|\.)(encoder\.down\.\d+\.|decoder\.up\.\d+\.|quant_conv\.|"
                             r"encoder\.down_blocks\.\d+\.|decoder\.up_blocks\.\d+\.)")

_T5_BLOCK = re.compile(r"(^|\.)encoder\.block\.(?P<index>\d+)\.layer\.")
_T5_EMBEDDING = re.compile(r"(^|\.)(shared|encoder\.embed_tokens)\.weight$")
_T5_NORM = re.compile(r"(^|\.)encoder\.final_layer_norm\.weight$")
_T5_RELATIVE_BIAS = re.compile(r"(^|\.)encoder\.block\.(?P<index>\d+)\.layer\.0\.SelfAttention\."
                               r"relative_attention_bias\.")
# CLIP text, transformers' names: `text_model.encoder.layers.N.self_attn` (or without `text_model.`,
# as recent transformers name it), never under a vision tower, and with a token embedding
_CLIP_TEXT_LAYER = re.compile(r"^(?!.*(vision_model|visual)\.)(.*\.)?encoder\.layers\.(?P<index>\d+)\.self_attn\.")
_CLIP_TOKEN_EMBEDDING = re.compile(r"(^|\.)token_embedding\.weight$")
_CLIP_TEXT_NORM = re.compile(r"^(?!.*(vision_model|visual)\.)(.*\.)?final_layer_norm\.weight$")
_OPENCLIP_LAYER = re.compile(r"^(?!.*visual\.)(.*\.)?transformer\.resblocks\.(?P<index>\d+)\.")
_OPENCLIP_NORM = re.compile(r"^(?!.*visual\.)(.*\.)?ln_final\.weight$")
_CLIP_VISION_LAYER = re.compile(r"(^|\.)(vision_model\.encoder\.layers|visual\.transformer\.resblocks)\."
                                r"(?P<index>\d+)\.")
_CLIP_VISION_NORM = re.compile(r"(^|\.)(vision_model\.post_layernorm|visual\.ln_post)\.weight$")
_LLM_LAYER = re.compile(r"(^|\.)model\.layers\.(?P<index>\d+)\.self_attn\.")
_LLM_EMBEDDING = re.compile(r"(^|\.)model\.embed_tokens\.weight$")


class _Header:
    """Key-name queries over one file's tensor shapes."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]]):
        self.shapes = shapes
        self.names = list(shapes)

    def has(self, pattern: re.Pattern) -> bool:
        return any(pattern.search(name) for name in self.names)

    def shape(self, pattern: re.Pattern) -> tuple[int, ...] | None:
        """Shape of the first tensor whose name matches, None if none does."""
        return next((tuple(self.shapes[name]) for name in self.names if pattern.search(name)), None)

    def count(self, pattern: re.Pattern) -> int:
        """How many distinct block indices the pattern's `index` group takes."""
        return len({m.group("index") for name in self.names if (m := pattern.search(name))})


def _width(shape: tuple[int, ...] | None) -> int | None:
    return shape[-1] if shape else None


def _recognise_mochi_dit(header: _Header) -> Recognition | None:
    for prefix in MOCHI_DIT_PREFIXES + ("",):
        if any(n.startswith(prefix) and _MOCHI_DIT.search(n[len(prefix):]) for n in header.names):
            decoder = _mochi_decoder_prefix(header, MOCHI_VAE_DECODER_PREFIXES)  # a full checkpoint's VAE
            return Recognition(FileKind.DIT, dit_prefix=prefix, vae_decoder_prefix=decoder,
                               has_vae_encoder=header.has(MOCHI_ENCODER))
    return None


def _mochi_decoder_prefix(header: _Header, prefixes: tuple[str, ...]) -> str | None:
    for prefix in prefixes:
        for name in header.names:
            rest = name[len(prefix):] if name.startswith(prefix) else None
            if rest is not None and (_MOCHI_DECODER.match(rest) or (prefix and _MOCHI_DECODER_OUTPUT.match(rest))):
                return prefix
    return None


def _recognise_video_or_image_dit(header: _Header) -> Recognition | None:
    """Other diffusion models, most specific marker first."""
    if header.has(_MOCHI_DIFFUSERS) and header.has(_POS_FREQUENCIES):
        return Recognition(FileKind.MOCHI_DIFFUSERS, detail=f"{header.count(_TRANSFORMER_BLOCK)} blocks")
    double = header.count(_DOUBLE_BLOCK) or header.count(_TRANSFORMER_BLOCK)
    single = header.count(_SINGLE_BLOCK) or header.count(_SINGLE_TRANSFORMER_BLOCK)
    if header.has(_HUNYUAN_REFINER) and (double or single):
        return Recognition(FileKind.HUNYUAN_VIDEO, detail=f"{double} double + {single} single blocks")
    if header.has(_DOUBLE_BLOCK) or (header.has(_SINGLE_TRANSFORMER_BLOCK) and header.has(_FLUX_IMG_IN)):
        return Recognition(FileKind.FLUX, detail=f"{double} double + {single} single blocks")
    if header.has(_WAN_PATCH) and header.has(_WAN_BLOCK):
        return Recognition(FileKind.WAN, detail=f"{header.count(_WAN_BLOCK)} blocks")
    transformer_blocks = header.count(_TRANSFORMER_BLOCK)
    if (transformer_blocks and header.has(_CAPTION_PROJECTION) and header.has(_LTX_TIME)
            and not header.has(_PIXART_POS)):
        return Recognition(FileKind.LTX_VIDEO, detail=f"{transformer_blocks} blocks")
    if transformer_blocks and header.has(_COGVIDEOX) and header.has(_COG_TIME):
        return Recognition(FileKind.COGVIDEOX, detail=f"{transformer_blocks} blocks")
    if header.has(_SD3_JOINT) or (header.has(_SD3_DIFFUSERS) and header.has(_PIXART_POS)):
        blocks = header.count(_SD3_JOINT) or header.count(_SD3_DIFFUSERS)
        return Recognition(FileKind.SD3, detail=f"{blocks} blocks")
    if header.has(_UNET_INPUT) or (header.has(_UNET_DIFFUSERS) and header.has(_COG_TIME)):
        return Recognition(FileKind.SD_UNET, detail=_unet_detail(header))
    return None


def _unet_detail(header: _Header) -> str:
    context = header.shape(_UNET_CROSS_ATTN)
    if header.has(_UNET_SDXL):
        family = "SDXL"
    elif context and context[-1] == 768:
        family = "SD 1.x"
    elif context and context[-1] == 1024:
        family = "SD 2.x"
    else:
        family = "SD family"
    full = any(_FULL_CHECKPOINT.match(name) for name in header.names)
    return family + (", full checkpoint with VAE and text encoder" if full else "")


def _recognise_vae(header: _Header) -> Recognition | None:
    decoder = _mochi_decoder_prefix(header, MOCHI_VAE_DECODER_PREFIXES + ("",))
    encoder = header.has(MOCHI_ENCODER)
    if decoder is not None or encoder:
        return Recognition(FileKind.VAE, vae_decoder_prefix=decoder, has_vae_encoder=encoder)
    if header.has(_WAN_VAE):
        z = header.shape(_WAN_VAE_Z)
        family = "Wan 2.2" if header.has(_WAN22_VAE) else "Wan 2.1"
        return Recognition(FileKind.VIDEO_VAE, detail=f"{family}, {z[1] if z else '?'} latent channels")
    if header.has(_LTX_VAE):
        return Recognition(FileKind.VIDEO_VAE, detail="LTX-Video, 128 latent channels")
    video_conv_in = header.shape(_VIDEO_VAE_CONV_IN)
    if video_conv_in:
        detail = f"HunyuanVideo / CogVideoX style, {video_conv_in[1]} latent channels"
        return Recognition(FileKind.VIDEO_VAE, detail=detail)
    conv_in = header.shape(_IMAGE_VAE_CONV_IN)
    if conv_in and len(conv_in) == 4 and header.has(_IMAGE_VAE_BODY):
        channels = conv_in[1]
        kind = {4: FileKind.SD_VAE, 16: FileKind.FLUX_VAE}.get(channels, FileKind.IMAGE_VAE)
        return Recognition(kind, detail=f"{channels} latent channels")
    return None


def _recognise_text_encoder(header: _Header) -> Recognition | None:
    t5_blocks = header.count(_T5_BLOCK)
    if t5_blocks or header.has(_T5_NORM):
        width = _width(header.shape(_T5_NORM))
        vocab = header.shape(_T5_EMBEDDING)
        biased = header.count(_T5_RELATIVE_BIAS)
        detail = f"{t5_blocks} blocks" + (f", width {width}" if width else "")
        xxl = "-XXL" if width == XXL_WIDTH else ""
        if biased > 1 or (vocab and vocab[0] == UMT5_VOCAB):  # T5 has the bias in block 0 only
            return Recognition(FileKind.UMT5, f"a UMT5{xxl} text encoder (Wan's)", detail)
        return Recognition(FileKind.T5, f"a T5{xxl} text encoder", detail)
    layers = header.count(_CLIP_TEXT_LAYER) or header.count(_OPENCLIP_LAYER)
    if layers and header.has(_CLIP_TOKEN_EMBEDDING):
        width = _width(header.shape(_CLIP_TEXT_NORM) or header.shape(_OPENCLIP_NORM))
        kind = CLIP_TEXT_WIDTHS.get(width, FileKind.CLIP_TEXT)
        detail = f"{layers} layers" + (f", width {width}" if width else "")
        if header.has(_CLIP_VISION_LAYER):
            detail += ", with a vision tower"
        return Recognition(kind, detail=detail)
    layers = header.count(_CLIP_VISION_LAYER)
    if layers:
        width = _width(header.shape(_CLIP_VISION_NORM))
        detail = f"{layers} layers" + (f", width {width}" if width else "")
        return Recognition(FileKind.CLIP_VISION, detail=detail)
    layers = header.count(_LLM_LAYER)
    if layers and header.has(_LLM_EMBEDDING):
        return Recognition(FileKind.LLM_TEXT, detail=f"{layers} layers")
    return None


def _recognise_lora(header: _Header) -> Recognition | None:
    lora = sum(1 for name in header.names if _LORA.search(name))
    if not header.names or lora < LORA_SHARE * len(header.names):
        return None
    families = [kind for kind, pattern in LORA_FAMILIES if any(pattern.search(name) for name in header.names)]
    if families:
        target = f" for {families[0].description}"
    else:
        target = " for a Mochi DiT" if any("qkv_x" in name or "mod_x" in name for name in header.names) else ""
    return Recognition(FileKind.LORA, detail=f"{lora} LoRA tensors{target}")


def recognise(shapes: Mapping[str, tuple[int, ...]]) -> Recognition:
    """Tell a file's kind from its tensor names and shapes (a safetensors header, no data).

    Args:
        shapes: tensor name -> shape, for every tensor in the file.

    Returns:
        Recognition; FileKind.UNKNOWN when no kind's marker keys are present.
    """
    header = _Header(shapes)
    for recogniser in (_recognise_lora, _recognise_mochi_dit, _recognise_video_or_image_dit,
                       _recognise_vae, _recognise_text_encoder):
        found = recogniser(header)
        if found is not None:
            return found
    return Recognition(FileKind.UNKNOWN)


_CLIP_TEXT = (FileKind.CLIP_L, FileKind.CLIP_G, FileKind.CLIP_H, FileKind.CLIP_TEXT)
_OTHER_DITS = (FileKind.HUNYUAN_VIDEO, FileKind.WAN, FileKind.LTX_VIDEO, FileKind.COGVIDEOX, FileKind.FLUX,
               FileKind.SD3)
_OTHER_VAES = (FileKind.SD_VAE, FileKind.FLUX_VAE, FileKind.IMAGE_VAE, FileKind.VIDEO_VAE)
_MOCHI_TEXT = "Mochi's text encoder is T5-XXL (e.g. t5xxl_fp16.safetensors), loaded with CLIPLoader type mochi"
_WANTED = {
    Slot.DIT: "the Mochi DiT here: mochi_preview_bf16.safetensors (or genmo's dit.safetensors) from "
              "models/diffusion_models/",
    Slot.VAE: "Mochi's VAE here: mochi_vae.safetensors (or genmo's decoder.safetensors) from models/vae/",
}


def _where_it_belongs(kind: FileKind) -> str:
    """One sentence: where a file of a kind this pack does not load belongs; "" if unknown."""
    if kind == FileKind.T5:
        return ("It is the text encoder Mochi uses, but it belongs in models/text_encoders/, loaded with "
                "CLIPLoader type mochi, whose conditioning goes to the sampler.")
    if kind == FileKind.UMT5:
        return f"It belongs in models/text_encoders/ (for Wan); {_MOCHI_TEXT}."
    if kind in _CLIP_TEXT or kind == FileKind.LLM_TEXT:
        return f"It belongs in models/text_encoders/; Mochi does not use it: {_MOCHI_TEXT}."
    if kind == FileKind.CLIP_VISION:
        return "It belongs in models/clip_vision/ (image prompts for other models); Mochi does not use it."
    if kind == FileKind.MOCHI_DIFFUSERS:
        return "It is Mochi-1 in diffusers' layout (transformer_blocks...), which this pack does not load."
    if kind in _OTHER_DITS:
        return ("It belongs in models/diffusion_models/ and runs with ComfyUI's own nodes (Load Diffusion "
                "Model); this pack runs Mochi-1 only.")
    if kind == FileKind.SD_UNET:
        return ("It belongs in models/checkpoints/ (Load Checkpoint), or models/unet/ without its VAE and "
                "text encoder; this pack runs Mochi-1 only.")
    if kind in _OTHER_VAES:
        return ("It is another model's VAE (models/vae/), which cannot decode Mochi's "
                f"{MOCHI_LATENT_CHANNELS}-channel latents.")
    if kind == FileKind.LORA:
        return "It belongs in models/loras/: a LoRA changes a model, it is not one."
    return ""


def wrong_slot_advice(kind: FileKind, slot: Slot | str, *, mochi_vae_has_decoder: bool,
                      dit_input: str = "dit_name", vae_input: str = "vae_name") -> str:
    """Where a file of this kind belongs and what the slot needs, in one or two sentences.

    Args:
        kind: the file's kind.
        slot: the input the file was given to: Slot.DIT or Slot.VAE (or "dit" / "vae").
        mochi_vae_has_decoder: for a Mochi VAE, whether it holds the decoder (an encoder-only file
            is wrong in either slot).
        dit_input, vae_input: the inputs' names as the user sees them ("--dit" / "--vae" in the CLI).

    Returns:
        "" for a file that is right for the slot, else the advice, ending with a full stop.
    """
    slot = Slot(slot)
    mochi_vae = kind == FileKind.VAE and mochi_vae_has_decoder
    if (slot == Slot.DIT and kind == FileKind.DIT) or (slot == Slot.VAE and mochi_vae):
        return ""
    wanted = _WANTED[slot]
    if kind == FileKind.VAE and not mochi_vae:
        return ("It holds only Mochi's VAE encoder, and decoding needs the decoder: use mochi_vae.safetensors "
                f"(encoder + decoder) or genmo's decoder.safetensors in {vae_input}; pick {wanted}.")
    if kind in (FileKind.DIT, FileKind.VAE):
        return f"Select it in {vae_input if kind == FileKind.VAE else dit_input} instead, and pick {wanted}."
    also = ""
    if slot == Slot.DIT and kind in _OTHER_VAES:
        also = f", and Mochi's VAE (mochi_vae.safetensors) in {vae_input}"
    return f"{_where_it_belongs(kind)} Pick {wanted}{also}.".strip()
