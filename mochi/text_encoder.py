"""T5-XXL text encoding for the CLI (ComfyUI keeps using its own T5 nodes).

Tokenisation follows ComfyUI's Mochi text encoder: the prompt's tokens, then EOS, padded with the
pad token to at least 256 tokens (never truncated); the attention mask is 1 on the tokens and EOS,
and the features at padded positions are zeroed. An empty prompt gives zero valid tokens (an
all-zero mask), as genmo does for an empty negative prompt.

Accepted weights: a Hugging Face T5 directory (config.json + weights + tokenizer files), or a
ComfyUI-style single T5 safetensors file (e.g. t5xxl_fp16.safetensors; `fp8_scaled` files too)
together with a tokenizer directory. The demo encoder is a tiny random T5 of the right width with
a tokenizer built here, written to disk and loaded back through the same code.
"""

import gc
import json
import os
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .constants import T5_DIM, TEXT_TOKENS
from .text import TextCondition

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2  # T5's special token ids
SCALED_FP8_MARKER = "scaled_fp8"
_BLOCK_KEY = re.compile(r"encoder\.block\.(\d+)\.")


@dataclass(frozen=True)
class TokenizedPrompt:
    """ids and mask [1, L], L = max(256, tokens + 1)."""

    ids: torch.Tensor
    mask: torch.Tensor


def tokenize(tokenizer, prompt: str, min_length: int = TEXT_TOKENS) -> TokenizedPrompt:
    """ComfyUI Mochi tokenisation: tokens + EOS, padded to `min_length`, no truncation."""
    if not prompt.strip():
        return TokenizedPrompt(torch.full((1, min_length), PAD_ID), torch.zeros(1, min_length, dtype=torch.int64))
    ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
    length = max(min_length, len(ids))
    padded = ids + [tokenizer.pad_token_id] * (length - len(ids))
    mask = [1] * len(ids) + [0] * (length - len(ids))
    return TokenizedPrompt(torch.tensor([padded]), torch.tensor([mask]))


class T5TextEncoder:
    """A T5 encoder and its tokenizer; `encode(prompt)` gives the DiT's `TextCondition`.

    Args:
        model: a transformers `T5EncoderModel` (d_model must be 4096, Mochi's T5-XXL width).
        tokenizer: the matching tokenizer (pad id 0, EOS id 1 as in T5).
    """

    def __init__(self, model, tokenizer):
        if model.config.d_model != T5_DIM:
            raise ValueError(
                f"this T5 has d_model={model.config.d_model}, but Mochi was trained on T5-XXL features of width "
                f"{T5_DIM}; use google/t5-v1_1-xxl (ComfyUI: t5xxl_fp16.safetensors)"
            )
        if tokenizer.pad_token_id != PAD_ID or tokenizer.eos_token_id != EOS_ID:
            raise ValueError(
                f"tokenizer has pad id {tokenizer.pad_token_id} and EOS id {tokenizer.eos_token_id}; T5's are "
                f"{PAD_ID} and {EOS_ID}: use the T5-XXL tokenizer directory (spiece.model or tokenizer.json)"
            )
        self.model = model.eval()
        self.tokenizer = tokenizer

    @torch.no_grad()
    def encode(self, prompt: str) -> TextCondition:
        """[1, L, 4096] fp32 features (zero at padding) and the [1, L] mask, L >= 256."""
        tokens = tokenize(self.tokenizer, prompt)
        if not bool(tokens.mask.any()):
            return TextCondition(torch.zeros(1, tokens.mask.shape[1], T5_DIM), tokens.mask)
        device = next(self.model.parameters()).device
        hidden = self.model(input_ids=tokens.ids.to(device), attention_mask=tokens.mask.to(device)).last_hidden_state
        features = hidden.float().cpu() * tokens.mask[..., None]  # [1, L, 4096], zero at padding (ComfyUI)
        return TextCondition(features, tokens.mask)


def encode_then_free(load: Callable[[], T5TextEncoder], prompts: Sequence[str]) -> list[TextCondition]:
    """Load an encoder, encode `prompts` (features on the CPU), and free the encoder before returning.

    Freeing means the last reference dropped, a garbage collection (transformers modules hold
    reference cycles) and, where CUDA is in use, the caching allocator's blocks handed back: T5-XXL
    is ~9.5 GB in bf16, and the CLI's rank 0 loads the DiT onto the same GPU right after.

    Args:
        load: makes the encoder (e.g. `lambda: load_text_encoder(path, ...)`).
        prompts: the prompts, in order.

    Returns:
        One TextCondition per prompt.
    """
    encoder = load()
    try:
        return [encoder.encode(prompt) for prompt in prompts]
    finally:
        del encoder
        gc.collect()
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()


def _t5_config_from_shapes(shapes: dict[str, tuple[int, ...]]):
    """A transformers T5Config (v1.1: gated GELU, untied) from a T5 encoder's tensor shapes."""
    from transformers import T5Config

    vocab, d_model = shapes["shared.weight"]
    num_layers = 1 + max(int(m.group(1)) for k in shapes if (m := _BLOCK_KEY.match(k)))
    buckets, num_heads = shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    inner = shapes["encoder.block.0.layer.0.SelfAttention.q.weight"][0]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in shapes
    ff_key = "encoder.block.0.layer.1.DenseReluDense." + ("wi_0.weight" if gated else "wi.weight")
    return T5Config(
        vocab_size=vocab, d_model=d_model, d_kv=inner // num_heads, d_ff=shapes[ff_key][0], num_layers=num_layers,
        num_heads=num_heads, relative_attention_num_buckets=buckets,
        feed_forward_proj="gated-gelu" if gated else "relu", is_encoder_decoder=False, use_cache=False,
        tie_word_embeddings=False,
    )


def _load_single_file_t5(path: str, dtype: torch.dtype, device: str):
    """T5EncoderModel from a ComfyUI-style single safetensors file (optionally `fp8_scaled`)."""
    from safetensors import safe_open
    from transformers import T5EncoderModel

    with safe_open(path, framework="pt") as handle:
        keys = list(handle.keys())
        if "shared.weight" not in keys or not any(_BLOCK_KEY.match(k) for k in keys):
            raise ValueError(
                f"{path} is not a T5 encoder file (no shared.weight / encoder.block.N tensors); use a T5-XXL file "
                "such as t5xxl_fp16.safetensors from ComfyUI's models/text_encoders"
            )
        shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in keys}
        config = _t5_config_from_shapes(shapes)
        state = {}
        for key in keys:
            if key == SCALED_FP8_MARKER or key.endswith((".scale_weight", ".scale_input")):
                continue
            tensor = handle.get_tensor(key)
            scale_key = key[: -len("weight")] + "scale_weight" if key.endswith(".weight") else None
            if scale_key in shapes:
                tensor = tensor.float() * handle.get_tensor(scale_key).float()  # fp8_scaled: weight x scale
            state[key] = tensor.to(dtype)
    state.setdefault("encoder.embed_tokens.weight", state["shared.weight"])
    with torch.device("meta"):
        model = T5EncoderModel(config)
    expected = set(model.state_dict())
    missing = sorted(expected - set(state))
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} T5 tensors (first: {missing[0]}); the file is incomplete")
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, assign=True)
    return model.to(device)


def load_text_encoder(t5_path: str, tokenizer_path: str | None = None, dtype: torch.dtype = torch.float32,
                      device: str = "cpu") -> T5TextEncoder:
    """Load a T5 encoder for the CLI.

    Args:
        t5_path: a Hugging Face T5 directory (config.json), or a single T5 .safetensors file.
        tokenizer_path: tokenizer directory; default `t5_path` for a directory. Required for a file.
        dtype: compute dtype (fp32 on CPU; bf16 is fine on GPU).
        device: where the encoder runs.
    """
    from transformers import AutoTokenizer, T5EncoderModel

    if os.path.isdir(t5_path):
        if not os.path.isfile(os.path.join(t5_path, "config.json")):
            raise ValueError(f"{t5_path} is a directory without config.json; give a Hugging Face T5 directory "
                             "(e.g. google/t5-v1_1-xxl) or a single T5 .safetensors file plus --t5-tokenizer")
        model = T5EncoderModel.from_pretrained(t5_path, dtype=dtype).to(device)
        tokenizer_path = tokenizer_path or t5_path
    elif os.path.isfile(t5_path):
        if not t5_path.endswith(".safetensors"):
            raise ValueError(f"{t5_path}: only .safetensors T5 files are supported (pickle files can run code)")
        if tokenizer_path is None:
            raise ValueError(f"{t5_path} is a single weights file; also give its tokenizer directory "
                             "(--t5-tokenizer, e.g. the tokenizer files of google/t5-v1_1-xxl)")
        model = _load_single_file_t5(t5_path, dtype, device)
    else:
        raise ValueError(f"T5 path {t5_path!r} does not exist; give a T5 directory or .safetensors file")
    if not os.path.isdir(tokenizer_path):
        raise ValueError(f"tokenizer path {tokenizer_path!r} is not a directory with tokenizer files")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    return T5TextEncoder(model, tokenizer)


# --- the demo encoder ---------------------------------------------------------------------------

DEMO_T5_LAYERS = 1
DEMO_T5_HEADS = 2
DEMO_T5_KV = 16
DEMO_T5_FF = 64


def _demo_vocabulary() -> list[tuple[str, float]]:
    """Unigram pieces: T5's three special tokens first (ids 0, 1, 2), then characters and common words."""
    words = ("the a an of in on and with to is red fox running through snow cat dog video forest sea sky "
             "blue green light night city walking flying").split()
    pieces = ["<pad>", "</s>", "<unk>", "\u2581"] + ["\u2581" + w for w in words]
    pieces += [c for c in string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation]
    scores = [0.0, 0.0, 0.0, -2.0] + [-1.0] * len(words) + [-5.0] * (len(pieces) - 4 - len(words))
    return list(zip(pieces, scores))


def write_demo_text_encoder(folder: str, seed: int = 0) -> str:
    """Write a tiny random T5 encoder (d_model 4096, 1 layer) and a tokenizer built here (no network)
    as a Hugging Face directory; returns the folder. Its features are noise, like the demo DiT."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    os.makedirs(folder, exist_ok=True)
    backend = Tokenizer(models.Unigram(_demo_vocabulary(), unk_id=UNK_ID))
    backend.normalizer = normalizers.NFKC()
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(folder)
    config = T5Config(vocab_size=len(_demo_vocabulary()), d_model=T5_DIM, d_kv=DEMO_T5_KV, d_ff=DEMO_T5_FF,
                      num_layers=DEMO_T5_LAYERS, num_heads=DEMO_T5_HEADS, feed_forward_proj="gated-gelu",
                      is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):  # random weights without touching the caller's RNG
        torch.manual_seed(seed)
        model = T5EncoderModel(config)
    model.save_pretrained(folder)
    with open(os.path.join(folder, "DEMO_README.json"), "w") as note:
        json.dump({"what": "tiny random T5 encoder for the mochi_xdit demo; output is noise"}, note)
    return folder


def demo_text_encoder(cache_dir: str) -> T5TextEncoder:
    """The demo encoder, written once under `cache_dir/demo_t5` and loaded through `load_text_encoder`."""
    folder = os.path.join(cache_dir, "demo_t5")
    if not os.path.isfile(os.path.join(folder, "DEMO_README.json")):
        write_demo_text_encoder(folder)
    return load_text_encoder(folder)
