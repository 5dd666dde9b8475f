"""T5 text encoding for the CLI: ComfyUI's Mochi tokenisation (tokens + EOS, pad to 256, no
truncation, zeroed padding), an empty prompt with no valid token, and the single-file loader giving
the same features as the Hugging Face directory it came from."""

import pytest
import torch
from safetensors.torch import save_file

from mochi_xdit.mochi.text_encoder import (
    EOS_ID,
    PAD_ID,
    T5TextEncoder,
    demo_text_encoder,
    load_text_encoder,
    tokenize,
    write_demo_text_encoder,
)


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory):
    return write_demo_text_encoder(str(tmp_path_factory.mktemp("t5") / "demo_t5"))


@pytest.fixture(scope="module")
def encoder(demo_folder):
    return load_text_encoder(demo_folder)


def test_tokens_then_eos_padded_to_256_with_mask(encoder):
    plain = encoder.tokenizer("a red fox", add_special_tokens=False)["input_ids"]
    tokens = tokenize(encoder.tokenizer, "a red fox")
    n = len(plain)
    assert tokens.ids.shape == tokens.mask.shape == (1, 256)
    assert tokens.ids[0, :n].tolist() == plain and tokens.ids[0, n].item() == EOS_ID
    assert (tokens.ids[0, n + 1:] == PAD_ID).all()
    assert tokens.mask[0].tolist() == [1] * (n + 1) + [0] * (255 - n)


def test_long_prompt_is_never_truncated(encoder):
    prompt = " ".join(["fox"] * 300)
    tokens = tokenize(encoder.tokenizer, prompt)
    n = len(encoder.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert n >= 300 and tokens.ids.shape == (1, n + 1) and int(tokens.mask.sum()) == n + 1


def test_features_are_zero_at_padding_and_match_an_unpadded_forward(encoder):
    condition = encoder.encode("a red fox running through snow")
    valid = condition.num_valid_tokens
    assert condition.features.shape == (1, 256, 4096)
    assert condition.features[0, valid:].abs().max().item() == 0.0
    assert condition.features[0, :valid].abs().min().item() >= 0  # real numbers, not NaN
    ids = tokenize(encoder.tokenizer, "a red fox running through snow").ids[:, :valid]
    with torch.no_grad():
        alone = encoder.model(input_ids=ids).last_hidden_state  # masking padding == not having it
    assert (condition.features[0, :valid] - alone[0]).abs().max().item() <= 1e-5


def test_empty_prompt_has_zero_valid_tokens(encoder):
    condition = encoder.encode("")
    assert condition.num_valid_tokens == 0 and condition.mask.shape == (1, 256)
    assert condition.features.abs().max().item() == 0.0


def test_single_safetensors_file_plus_tokenizer_equals_the_directory(encoder, demo_folder, tmp_path):
    state = {k: v for k, v in encoder.model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    single = str(tmp_path / "t5xxl_demo.safetensors")  # ComfyUI-style: one file, T5 names, no config
    save_file({k: v.contiguous() for k, v in state.items()}, single)
    loaded = load_text_encoder(single, tokenizer_path=demo_folder)
    a, b = encoder.encode("blue sky"), loaded.encode("blue sky")
    assert torch.equal(a.mask, b.mask)
    assert (a.features - b.features).abs().max().item() <= 1e-6


def test_fp8_scaled_single_file_dequantises_with_its_scales(encoder, demo_folder, tmp_path):
    state = {k: v for k, v in encoder.model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    quantised = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    for key, value in state.items():
        if key.endswith(".weight") and value.dim() == 2 and "shared" not in key and "relative_attention" not in key:
            scale = value.abs().max() / 448.0
            quantised[key] = (value / scale).to(torch.float8_e4m3fn)
            quantised[key[: -len("weight")] + "scale_weight"] = scale.reshape(())
        else:
            quantised[key] = value.contiguous()
    path = str(tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors")
    save_file(quantised, path)
    loaded = load_text_encoder(path, tokenizer_path=demo_folder)
    a, b = encoder.encode("green forest"), loaded.encode("green forest")
    # fp8 keeps ~3 significant bits per weight: close to, not equal to, the full-precision encoder
    rel = (a.features - b.features).norm() / a.features.norm()
    assert rel.item() <= 0.1


def test_refuses_wrong_width_and_missing_tokenizer(encoder, demo_folder, tmp_path):
    from transformers import T5Config, T5EncoderModel

    narrow = T5EncoderModel(T5Config(vocab_size=40, d_model=32, d_kv=8, d_ff=16, num_layers=1, num_heads=2,
                                     is_encoder_decoder=False))
    with pytest.raises(ValueError, match="d_model=32.*4096"):
        T5TextEncoder(narrow, encoder.tokenizer)
    single = str(tmp_path / "t5.safetensors")
    save_file({"x": torch.zeros(1)}, single)
    with pytest.raises(ValueError, match="--t5-tokenizer"):
        load_text_encoder(single)
    with pytest.raises(ValueError, match="not a T5 encoder file"):
        load_text_encoder(single, tokenizer_path=demo_folder)
    with pytest.raises(ValueError, match="does not exist"):
        load_text_encoder(str(tmp_path / "nothing"))


def test_demo_encoder_is_written_once_and_deterministic(tmp_path):
    first = demo_text_encoder(str(tmp_path)).encode("a cat")
    second = demo_text_encoder(str(tmp_path)).encode("a cat")
    assert torch.equal(first.features, second.features)
    assert first.num_valid_tokens >= 2


def test_the_cli_frees_t5_and_its_gpu_cache_before_the_ranks_load(demo_folder, monkeypatch):
    """The CLI's encode_prompts returns only after the encoder is gone and the CUDA cache emptied
    (checked on the CPU as the order of events: on a GPU rank 0 then loads the DiT there)."""
    import types
    import weakref

    from mochi_xdit import cli
    from mochi_xdit.mochi import demo, text_encoder

    events, models = [], []

    def loaded(_cache_dir):
        encoder = text_encoder.load_text_encoder(demo_folder)
        models.append(weakref.ref(encoder.model))
        events.append("loaded")
        return encoder

    monkeypatch.setattr(text_encoder, "demo_text_encoder", loaded)
    monkeypatch.setattr(demo, "demo_dir", lambda: demo_folder)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)  # as on a GPU machine
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: events.append(
        "cache emptied, encoder " + ("gone" if models[0]() is None else "alive")))
    plan = types.SimpleNamespace(demo=True, device="cuda")
    positive, negative = cli.encode_prompts(plan, "a cat", "")
    assert events == ["loaded", "cache emptied, encoder gone"]
    assert int(positive.mask.sum()) > 0 and int(negative.mask.sum()) == 0
