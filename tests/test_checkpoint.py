"""Checkpoint loading: round trips in every accepted layout, dtype choices, memory mapping, and a
clear refusal for every wrong file."""

import os

import pytest
import torch
from safetensors.torch import save_file

from mochi_xdit.mochi.checkpoint import CheckpointError, inspect_checkpoint, load_dit, load_vae_decoder
from mochi_xdit.mochi.demo import random_dit_state_dict, random_vae_state_dict
from mochi_xdit.mochi.dit import DiTConfig, MochiDiT
from mochi_xdit.mochi.layers import Linear
from mochi_xdit.mochi.vae import MochiVAEDecoder, VAEDecoderConfig, default_norm_groups

TINY = DiTConfig(depth=2, num_heads=2, head_dim=16, hidden_size_x=64, hidden_size_y=32,
                 mlp_hidden_x=128, mlp_hidden_y=64, t5_feat_dim=32)
TINY_VAE = VAEDecoderConfig(channels=(8, 16), num_res_blocks=(1, 1, 1), temporal_expansions=(2,),
                            norm_groups=default_norm_groups((8, 16)))


@pytest.fixture(scope="module")
def dit_state():
    return random_dit_state_dict(TINY, seed=11)


@pytest.fixture(scope="module")
def reference(dit_state):
    model = MochiDiT(TINY)
    model.load_state_dict(dit_state)
    return model.eval()


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 12, 2, 4, 6, generator=generator)
    text = torch.randn(1, 8, TINY.t5_feat_dim, generator=generator)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]])
    return latent, torch.tensor([0.6]), text, mask


def forward(model, inputs):
    with torch.no_grad():
        return model(*inputs)


def fp8_scaled(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Write a state dict the way ComfyUI's fp8_scaled files are: every Linear weight (2-D) as
    (w / scale) in float8_e4m3fn with a fp32 scalar `scale_weight`, plus the `scaled_fp8` marker."""
    out = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    for name, tensor in state.items():
        if tensor.dim() == 2:
            scale = tensor.abs().max().float() / 448.0
            out[name] = (tensor / scale).to(torch.float8_e4m3fn)
            out[name[: -len("weight")] + "scale_weight"] = scale.reshape(())
            out[name[: -len("weight")] + "scale_input"] = torch.ones(())
        else:
            out[name] = tensor.to(torch.bfloat16)
    return out


def test_dit_round_trip_genmo_names_and_comfy_prefix(tmp_path, dit_state, reference, inputs):
    bare, prefixed = tmp_path / "dit.safetensors", tmp_path / "full.safetensors"
    save_file(dit_state, bare)
    full = {f"model.diffusion_model.{k}": v for k, v in dit_state.items()}
    full["text_encoders.t5xxl.transformer.shared.weight"] = torch.zeros(4, 4)  # other parts: ignored
    save_file(full, prefixed)
    expected = forward(reference, inputs)
    for path, prefix in ((bare, ""), (prefixed, "model.diffusion_model.")):
        info = inspect_checkpoint(path)
        assert info.kind == "dit" and info.dit_prefix == prefix
        model = load_dit(path, weight_dtype="fp32")
        assert model.config == TINY
        loaded = model.state_dict()
        assert set(loaded) == set(dit_state) and all(torch.equal(loaded[k], v) for k, v in dit_state.items())
        # bit-identical weights; mapped tensors have other alignments, so kernels may take other
        # SIMD paths and round differently: the project's fp32 parity tolerance applies
        assert (forward(model, inputs) - expected).abs().max().item() <= 1e-5


def test_dit_fp8_scaled_dequantises_exactly(tmp_path, dit_state, reference, inputs):
    path = tmp_path / "fp8.safetensors"
    quantised = fp8_scaled(dit_state)
    save_file(quantised, path)
    assert inspect_checkpoint(path).fp8_scaled

    # Oracle: the fp8 values times their scale, computed here; loading must reproduce it exactly.
    dequantised = {}
    for name, tensor in dit_state.items():
        if tensor.dim() == 2:
            scale_name = name[: -len("weight")] + "scale_weight"
            dequantised[name] = quantised[name].float() * quantised[scale_name]
        else:
            dequantised[name] = quantised[name].float()
    oracle = MochiDiT(TINY)
    oracle.load_state_dict(dequantised)
    loaded = load_dit(path, weight_dtype="fp32")
    state = loaded.state_dict()
    assert all(torch.equal(state[k], v) for k, v in dequantised.items())
    got = forward(loaded, inputs)
    assert (got - forward(oracle.eval(), inputs)).abs().max().item() <= 1e-5

    # Kept in fp8 storage, the Linear scales at call time: same numbers up to fp32 rounding.
    kept = load_dit(path, weight_dtype="fp8")
    assert kept.blocks[0].attn.qkv_x.weight.dtype == torch.float8_e4m3fn
    assert (forward(kept, inputs) - got).abs().max().item() <= 1e-5

    # Against the full-precision model: e4m3 keeps 3 mantissa bits, so each weight is off by at
    # most 2^-4 relative (uniform rounding: RMS ~2^-4/sqrt(3) ~ 3.6%), and the norms after each
    # layer keep errors from compounding; a relative RMS error under 10% means the dequantisation
    # is right (a wrong or missing scale gives errors of order 100%), not merely close.
    expected = forward(reference, inputs)
    relative = ((got - expected).norm() / expected.norm()).item()
    assert relative < 0.10, relative


def test_weight_dtype_choices(tmp_path, dit_state):
    path = tmp_path / "dit.safetensors"
    save_file(dit_state, path)
    for choice, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        model = load_dit(path, weight_dtype=choice)
        for name, param in model.named_parameters():
            assert param.dtype == (torch.float32 if name == "pos_frequencies" else dtype), (choice, name)
            assert not param.requires_grad
    model = load_dit(path, weight_dtype="fp8")
    linears = {name for name, module in model.named_modules() if isinstance(module, Linear)}
    for name, param in model.named_parameters():
        module = name.rsplit(".", 1)[0]
        if module in linears and name.endswith(".weight"):
            assert param.dtype == torch.float8_e4m3fn, name
            scale = model.get_submodule(module).scale_weight
            assert scale.dtype == torch.float32 and scale.dim() == 0
        elif name == "pos_frequencies":
            assert param.dtype == torch.float32
        else:  # biases, norms, the patch-embedding conv
            assert param.dtype == torch.bfloat16, name
    with pytest.raises(ValueError, match="bf16, fp16, fp32, fp8"):
        load_dit(path, weight_dtype="int4")


def file_mappings(path) -> list[tuple[int, int]]:
    """Address ranges of this process mapped from `path` (Linux /proc/self/maps)."""
    real = os.path.realpath(path)
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5] == real:
                low, high = (int(v, 16) for v in fields[0].split("-"))
                ranges.append((low, high))
    return ranges


@pytest.mark.parametrize("dtype,choice", [(torch.float32, "fp32"), (torch.bfloat16, "bf16")])
def test_weights_are_memory_mapped_not_copied(tmp_path, dit_state, dtype, choice):
    path = tmp_path / f"dit_{choice}.safetensors"
    save_file({k: v.to(dtype) for k, v in dit_state.items()}, path)
    model = load_dit(path, weight_dtype=choice)
    ranges = file_mappings(path)
    assert ranges, "the checkpoint file is not mapped"
    for name, param in model.named_parameters():
        if name == "pos_frequencies" and dtype != torch.float32:
            continue  # converted to fp32 on purpose
        pointer = param.data_ptr()
        assert any(low <= pointer < high for low, high in ranges), f"{name} was copied out of the file"


def test_vae_decoder_round_trip_bare_and_full_vae(tmp_path):
    state = random_vae_state_dict(TINY_VAE, seed=2)
    reference = MochiVAEDecoder(TINY_VAE)
    reference.load_state_dict(state)
    latent = torch.randn(1, 12, 2, 3, 4, generator=torch.Generator().manual_seed(1))
    expected = reference.decode(latent)
    bare, full = tmp_path / "decoder.safetensors", tmp_path / "mochi_vae.safetensors"
    save_file(state, bare)
    full_state = {f"decoder.{k}": v for k, v in state.items()}
    full_state["encoder.layers.0.weight"] = torch.zeros(8, 12)  # a full VAE's encoder: ignored
    full_state["encoder.layers.4.layers.1.attn_block.attn.qkv.weight"] = torch.zeros(24, 8)
    save_file(full_state, full)
    for path in (bare, full):
        assert inspect_checkpoint(path).kind == "vae"
        decoder = load_vae_decoder(path)
        assert decoder.config == TINY_VAE
        assert (decoder.decode(latent) - expected).abs().max().item() <= 1e-5


def test_wrong_files_get_clear_errors(tmp_path, dit_state):
    vae = {f"decoder.{k}": v for k, v in random_vae_state_dict(TINY_VAE, seed=2).items()}
    vae["encoder.layers.0.weight"] = torch.zeros(8, 12)
    save_file(vae, tmp_path / "vae.safetensors")
    with pytest.raises(CheckpointError, match=r"looks like a Mochi VAE \(decoder \+ encoder.*a Mochi DiT was expected"):
        load_dit(tmp_path / "vae.safetensors")

    save_file(dit_state, tmp_path / "dit.safetensors")
    dit_as_vae = r"looks like a Mochi DiT / diffusion model \(2 blocks.*a Mochi VAE was expected"
    with pytest.raises(CheckpointError, match=dit_as_vae):
        load_vae_decoder(tmp_path / "dit.safetensors")

    encoder_only = {"layers.0.weight": torch.zeros(8, 12),
                    "layers.4.layers.1.attn_block.attn.qkv.weight": torch.zeros(24, 8)}
    save_file(encoder_only, tmp_path / "encoder.safetensors")
    with pytest.raises(CheckpointError, match=r"looks like a Mochi VAE \(encoder, .*it has no decoder"):
        load_vae_decoder(tmp_path / "encoder.safetensors")

    t5 = {"shared.weight": torch.zeros(8, 4), "encoder.final_layer_norm.weight": torch.zeros(4)}
    for i in range(2):
        t5[f"encoder.block.{i}.layer.0.SelfAttention.q.weight"] = torch.zeros(4, 4)
    save_file(t5, tmp_path / "t5xxl.safetensors")
    for loader in (load_dit, load_vae_decoder):
        with pytest.raises(CheckpointError, match=r"looks like a T5 text encoder \(2 blocks"):
            loader(tmp_path / "t5xxl.safetensors")

    truncated = tmp_path / "truncated.safetensors"
    data = (tmp_path / "dit.safetensors").read_bytes()
    truncated.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated.*download the file again"):
        load_dit(truncated)
    truncated.write_bytes(data[:100])
    with pytest.raises(CheckpointError, match="truncated"):
        inspect_checkpoint(truncated)

    missing = dict(dit_state)
    del missing["blocks.1.attn.proj_x.bias"]
    save_file(missing, tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\): blocks.1.attn.proj_x.bias"):
        load_dit(tmp_path / "missing.safetensors")
    sizing = {k: v for k, v in dit_state.items() if k != "t5_yproj.weight"}
    save_file(sizing, tmp_path / "sizing.safetensors")
    with pytest.raises(CheckpointError, match="missing tensor 't5_yproj.weight'"):
        load_dit(tmp_path / "sizing.safetensors")

    extra = dict(dit_state)
    extra["blocks.0.attn.lora_up.weight"] = torch.zeros(2, 2)
    save_file(extra, tmp_path / "extra.safetensors")
    with pytest.raises(CheckpointError, match=r"1 unexpected tensor\(s\).*blocks.0.attn.lora_up.weight"):
        load_dit(tmp_path / "extra.safetensors")

    torch.save(dit_state, tmp_path / "mochi.pt")
    with pytest.raises(CheckpointError, match="pickle.*use the .safetensors version"):
        load_dit(tmp_path / "mochi.pt")
    os.rename(tmp_path / "mochi.pt", tmp_path / "renamed.safetensors")
    with pytest.raises(CheckpointError, match="pickle.*use the .safetensors version"):
        load_dit(tmp_path / "renamed.safetensors")

    with pytest.raises(CheckpointError, match="is not a file"):
        load_dit(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_dit(tmp_path / "nowhere.safetensors")
    (tmp_path / "text.safetensors").write_text("hello, this is not a model at all")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_dit(tmp_path / "text.safetensors")
    save_file({"something.else": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="unrecognised safetensors file.*something.else"):
        load_dit(tmp_path / "other.safetensors")


def test_demo_files_are_written_once_deterministically_and_load_loudly(tmp_path, monkeypatch, caplog):
    from mochi_xdit.mochi.demo import (DEMO_DIT_CONFIG, DEMO_NOTICE, DEMO_SEED, DEMO_VAE_CONFIG, demo_checkpoints,
                                       load_demo_models)

    monkeypatch.setenv("MOCHI_XDIT_DEMO_DIR", str(tmp_path / "cache"))  # read at call time
    dit_path, vae_path = demo_checkpoints()
    assert dit_path.parent == tmp_path / "cache" and dit_path.is_file() and vae_path.is_file()
    stamp = (dit_path.stat().st_mtime_ns, vae_path.stat().st_mtime_ns)
    with caplog.at_level("WARNING"):
        dit, vae = load_demo_models()
    assert (dit_path.stat().st_mtime_ns, vae_path.stat().st_mtime_ns) == stamp, "demo files rewritten"
    assert sum(DEMO_NOTICE in record.getMessage() for record in caplog.records) == 2  # DiT and VAE
    assert dit.config == DEMO_DIT_CONFIG and vae.config == DEMO_VAE_CONFIG
    expected = random_dit_state_dict(DEMO_DIT_CONFIG, DEMO_SEED)
    assert all(torch.equal(dit.state_dict()[k], v) for k, v in expected.items())
    expected = random_vae_state_dict(DEMO_VAE_CONFIG, DEMO_SEED)
    assert all(torch.equal(vae.state_dict()[k], v) for k, v in expected.items())
