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


# ---------------------------------------------------------------- telling model files apart
# Fake files carry the key names of the real ones (as ComfyUI and the model authors name them) with
# tiny tensors; a shape is real only where it is the evidence (CLIP / T5 width, vocabulary, latent
# channels, cross-attention width). Shapes are [1] unless given.

def save_shapes(path, shapes: dict[str, tuple[int, ...]], metadata: dict[str, str] | None = None):
    save_file({name: torch.zeros(shape, dtype=torch.float16) for name, shape in shapes.items()}, path,
              metadata=metadata)
    return path


def keys(pattern: str, count: int, shape=(1,)) -> dict[str, tuple[int, ...]]:
    """`pattern` with {i} for i in range(count), all with one shape."""
    return {pattern.format(i=i): shape for i in range(count)}


def clip_l_hf(prefix: str = "") -> dict:
    shapes = {f"{prefix}text_model.embeddings.token_embedding.weight": (1, 768),
              f"{prefix}text_model.embeddings.position_embedding.weight": (1, 768),
              f"{prefix}text_model.final_layer_norm.weight": (768,)}
    for part in ("self_attn.q_proj.weight", "self_attn.out_proj.weight", "layer_norm1.weight", "mlp.fc1.weight"):
        shapes |= keys(f"{prefix}text_model.encoder.layers.{{i}}.{part}", 12)
    return shapes


def clip_g_openclip() -> dict:
    shapes = {"token_embedding.weight": (1, 1280), "positional_embedding": (1, 1280), "ln_final.weight": (1280,),
              "text_projection": (1, 1280)}
    for part in ("attn.in_proj_weight", "attn.out_proj.weight", "ln_1.weight", "mlp.c_fc.weight"):
        shapes |= keys(f"transformer.resblocks.{{i}}.{part}", 32)
    return shapes


def clip_g_hf() -> dict:
    shapes = {"text_model.embeddings.token_embedding.weight": (1, 1280),
              "text_model.final_layer_norm.weight": (1280,), "text_projection.weight": (1, 1)}
    for part in ("self_attn.q_proj.weight", "layer_norm1.weight", "mlp.fc1.weight"):
        shapes |= keys(f"text_model.encoder.layers.{{i}}.{part}", 32)
    return shapes


def t5_xxl(vocab: int = 32128, bias_blocks: int = 1) -> dict:
    shapes = {"shared.weight": (vocab, 1), "encoder.final_layer_norm.weight": (4096,)}
    for part in ("layer.0.SelfAttention.q.weight", "layer.0.SelfAttention.o.weight", "layer.0.layer_norm.weight",
                 "layer.1.DenseReluDense.wi_0.weight", "layer.1.DenseReluDense.wo.weight"):
        shapes |= keys(f"encoder.block.{{i}}.{part}", 24)
    shapes |= keys("encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight", bias_blocks)
    return shapes


def hunyuan_video(prefix: str = "") -> dict:
    shapes = {"img_in.proj.weight": (1, 16, 1, 2, 2), "txt_in.input_embedder.weight": (1, 4096),
              "txt_in.individual_token_refiner.blocks.0.norm1.weight": (1,), "time_in.in_layer.weight": (1, 1),
              "vector_in.in_layer.weight": (1, 768), "guidance_in.in_layer.weight": (1, 1),
              "final_layer.linear.weight": (1, 1)}
    shapes |= keys("double_blocks.{i}.img_attn.qkv.weight", 20) | keys("double_blocks.{i}.txt_mlp.0.weight", 20)
    shapes |= keys("single_blocks.{i}.linear1.weight", 40)
    return {prefix + name: shape for name, shape in shapes.items()}


def wan() -> dict:
    shapes = {"patch_embedding.weight": (1, 16, 1, 2, 2), "text_embedding.0.weight": (1, 4096),
              "time_embedding.0.weight": (1, 256), "time_projection.1.weight": (1, 1),
              "head.head.weight": (1, 1), "head.modulation": (1, 2, 1536)}
    for part in ("self_attn.q.weight", "cross_attn.k.weight", "ffn.0.weight", "modulation", "norm3.weight"):
        shapes |= keys(f"blocks.{{i}}.{part}", 30)
    return shapes


def ltx_video() -> dict:
    shapes = {"patchify_proj.weight": (1, 128), "adaln_single.emb.timestep_embedder.linear_1.weight": (1, 256),
              "adaln_single.linear.weight": (1, 1), "caption_projection.linear_1.weight": (1, 4096),
              "scale_shift_table": (2, 1), "proj_out.weight": (1, 1)}
    for part in ("attn1.to_q.weight", "attn2.to_k.weight", "ff.net.0.proj.weight", "scale_shift_table"):
        shapes |= keys(f"transformer_blocks.{{i}}.{part}", 28)
    return {f"model.diffusion_model.{name}": shape for name, shape in shapes.items()}


def flux(prefix: str = "") -> dict:
    shapes = {"img_in.weight": (1, 64), "txt_in.weight": (1, 4096), "time_in.in_layer.weight": (1, 256),
              "vector_in.in_layer.weight": (1, 768), "guidance_in.in_layer.weight": (1, 256),
              "final_layer.linear.weight": (1, 1)}
    shapes |= keys("double_blocks.{i}.img_attn.qkv.weight", 19)
    shapes |= keys("double_blocks.{i}.img_attn.norm.key_norm.scale", 19)
    shapes |= keys("single_blocks.{i}.linear1.weight", 38)
    return {prefix + name: shape for name, shape in shapes.items()}


def sd3() -> dict:
    # SD3 also has x_embedder / t_embedder / final_layer, which once made it "a Mochi DiT"
    shapes = {"x_embedder.proj.weight": (1, 16, 2, 2), "t_embedder.mlp.0.weight": (1, 256),
              "y_embedder.mlp.0.weight": (1, 2048), "context_embedder.weight": (1, 4096), "pos_embed": (1, 1, 1),
              "final_layer.linear.weight": (1, 1)}
    shapes |= keys("joint_blocks.{i}.context_block.attn.qkv.weight", 24)
    shapes |= keys("joint_blocks.{i}.x_block.attn.qkv.weight", 24)
    return {f"model.diffusion_model.{name}": shape for name, shape in shapes.items()}


def sd_unet(sdxl: bool = False) -> dict:
    context = 2048 if sdxl else 768
    shapes = {"input_blocks.0.0.weight": (1, 4, 3, 3),
              "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (1, context),
              "middle_block.0.in_layers.0.weight": (1,), "output_blocks.0.0.in_layers.0.weight": (1,),
              "time_embed.0.weight": (1, 1), "out.2.weight": (4, 1, 3, 3)}
    if sdxl:
        shapes["label_emb.0.0.weight"] = (1, 2816)
    shapes = {f"model.diffusion_model.{name}": shape for name, shape in shapes.items()}
    shapes["first_stage_model.decoder.conv_in.weight"] = (1, 4, 3, 3)
    shapes |= {f"cond_stage_model.{name}": shape for name, shape in clip_l_hf("transformer.").items()}
    return shapes


def image_vae(latent_channels: int, quant_conv: bool) -> dict:
    shapes = {"encoder.conv_in.weight": (1, 3, 3, 3), "encoder.down.0.block.0.conv1.weight": (1,),
              "encoder.mid.block_1.conv1.weight": (1,), "decoder.conv_in.weight": (1, latent_channels, 3, 3),
              "decoder.up.0.block.0.conv1.weight": (1,), "decoder.conv_out.weight": (3, 1, 3, 3)}
    if quant_conv:
        shapes |= {"quant_conv.weight": (1, 1, 1, 1), "post_quant_conv.weight": (1, 1, 1, 1)}
    return shapes


def wan_vae() -> dict:
    return {"encoder.conv1.weight": (1, 3, 3, 3, 3), "conv1.weight": (32, 32, 1, 1, 1),
            "conv2.weight": (16, 16, 1, 1, 1),
            "decoder.conv1.weight": (1, 16, 3, 3, 3), "decoder.middle.0.residual.0.gamma": (1, 1, 1, 1),
            "decoder.upsamples.0.residual.0.gamma": (1, 1, 1, 1)}


def mochi_encoder_only() -> dict:
    # genmo's encoder.safetensors: its output_proj once made it "decoder + encoder"
    return {"layers.0.weight": (1, 1, 1, 1, 1), "layers.1.stack.0.weight": (1,), "layers.1.stack.2.weight": (1,),
            "layers.4.layers.0.weight": (1,), "layers.4.layers.1.stack.0.weight": (1,),
            "layers.4.layers.1.attn_block.attn.qkv.weight": (1, 1), "output_norm.weight": (1,),
            "output_proj.weight": (24, 1)}


def mochi_lora() -> dict:
    shapes = {}
    for i in range(2):
        for part in ("attn.qkv_x", "attn.proj_x", "mlp_x.w1"):
            shapes |= {f"blocks.{i}.{part}.lora_A.weight": (4, 1), f"blocks.{i}.{part}.lora_B.weight": (1, 4),
                       f"blocks.{i}.{part}.alpha": ()}
    return shapes


FILES = {  # name -> (shapes, kind, phrase that describe() must contain)
    "clip_l": (clip_l_hf(), "clip_l", "a CLIP-L text encoder (12 layers, width 768"),
    "clip_l_in_comfy_wrapper": (clip_l_hf("transformer."), "clip_l", "a CLIP-L text encoder (12 layers, width 768"),
    "clip_g_openclip": (clip_g_openclip(), "clip_g", "a CLIP-G text encoder (32 layers, width 1280"),
    "clip_g_hf": (clip_g_hf(), "clip_g", "a CLIP-G text encoder (32 layers, width 1280"),
    "t5xxl": (t5_xxl(), "t5", "a T5-XXL text encoder (24 blocks, width 4096"),
    "umt5_bias_in_every_block": (t5_xxl(bias_blocks=24), "umt5", "a UMT5-XXL text encoder (Wan's) (24 blocks"),
    "umt5_vocabulary": (t5_xxl(vocab=256384), "umt5", "a UMT5-XXL text encoder"),
    "hunyuan_video": (hunyuan_video("model.diffusion_model."), "hunyuan_video",
                      "a HunyuanVideo DiT (20 double + 40 single blocks"),
    "wan": (wan(), "wan", "a Wan video DiT (30 blocks"),
    "ltx_video": (ltx_video(), "ltx_video", "an LTX-Video DiT (28 blocks"),
    "flux": (flux(), "flux", "a Flux DiT (image model) (19 double + 38 single blocks"),
    "sd3": (sd3(), "sd3", "an SD3 DiT (MMDiT, image model) (24 blocks"),
    "sd15_checkpoint": (sd_unet(), "sd_unet", "a Stable Diffusion UNet (SD 1.x, full checkpoint with VAE and text"),
    "sdxl_checkpoint": (sd_unet(sdxl=True), "sd_unet", "a Stable Diffusion UNet (SDXL, full checkpoint"),
    "sd_vae": (image_vae(4, quant_conv=True), "sd_vae", "an SD / SDXL VAE (4 latent channels"),
    "flux_vae": (image_vae(16, quant_conv=False), "flux_vae", "a Flux / SD3 VAE (16 latent channels"),
    "wan_vae": (wan_vae(), "video_vae", "another video model's VAE (Wan 2.1, 16 latent channels"),
    "mochi_vae_encoder": (mochi_encoder_only(), "vae", "a Mochi VAE (encoder, 8 tensors"),
    "mochi_lora": (mochi_lora(), "lora", "a LoRA (18 LoRA tensors for a Mochi DiT"),
    "clip_vision_h": ({**keys("vision_model.encoder.layers.{i}.self_attn.q_proj.weight", 32),
                       "vision_model.post_layernorm.weight": (1280,)}, "clip_vision",
                      "a CLIP vision encoder (32 layers, width 1280"),
    "llava_llama3": ({**keys("model.layers.{i}.self_attn.q_proj.weight", 32), "model.embed_tokens.weight": (1, 1)},
                     "llm_text", "a language-model text encoder (Llama / Qwen / Gemma style) (32 layers"),
}


@pytest.mark.parametrize("name", sorted(FILES))
def test_model_files_users_have_are_told_apart(tmp_path, name):
    from mochi_xdit.mochi.file_kind import FileKind

    shapes, kind, phrase = FILES[name]
    info = inspect_checkpoint(save_shapes(tmp_path / f"{name}.safetensors", shapes))
    assert info.kind == FileKind(kind) and isinstance(info.kind, FileKind)
    assert phrase in info.describe(), info.describe()
    if kind != "vae":
        assert "Mochi VAE" not in info.describe() and info.dit_prefix is None and info.vae_decoder_prefix is None


def test_clip_l_in_the_dit_slot_is_named_and_sent_to_text_encoders(tmp_path):
    path = save_shapes(tmp_path / "clip_l.safetensors", clip_l_hf())
    info = inspect_checkpoint(path)
    assert not info.has_vae_encoder  # CLIP's text_model.encoder.layers once read as Mochi's VAE encoder
    advice = info.wrong_slot_advice("dit")
    assert "models/text_encoders/" in advice and "T5-XXL" in advice and "CLIPLoader type mochi" in advice
    assert advice.endswith("Pick the Mochi DiT here: mochi_preview_bf16.safetensors (or genmo's dit.safetensors) "
                           "from models/diffusion_models/.")
    with pytest.raises(CheckpointError, match=r"looks like a CLIP-L text encoder \(12 layers.*"
                                              r"models/text_encoders/.*CLIPLoader type mochi"):
        load_dit(path)
    with pytest.raises(CheckpointError, match=r"a CLIP-L text encoder.*Pick Mochi's VAE here: mochi_vae"):
        load_vae_decoder(path)


def test_wrong_slot_advice_says_where_each_file_belongs(tmp_path):
    expected = {  # name -> (phrase in the DiT slot's advice, phrase in the VAE slot's advice)
        "t5xxl": ("the text encoder Mochi uses", "CLIPLoader type mochi"),
        "umt5_vocabulary": ("(for Wan); Mochi's text encoder is T5-XXL", "t5xxl_fp16.safetensors"),
        "wan": ("Load Diffusion Model", "this pack runs Mochi-1 only"),
        "sd15_checkpoint": ("models/checkpoints/ (Load Checkpoint)", "models/checkpoints/"),
        "flux_vae": ("and Mochi's VAE (mochi_vae.safetensors) in vae_name",
                     "cannot decode Mochi's 12-channel latents"),
        "clip_vision_h": ("models/clip_vision/", "models/clip_vision/"),
        "mochi_lora": ("models/loras/", "models/loras/"),
        "mochi_vae_encoder": ("only Mochi's VAE encoder", "only Mochi's VAE encoder"),
    }
    for name, (in_dit_slot, in_vae_slot) in expected.items():
        info = inspect_checkpoint(save_shapes(tmp_path / f"{name}.safetensors", FILES[name][0]))
        dit_advice, vae_advice = info.wrong_slot_advice("dit"), info.wrong_slot_advice("vae")
        assert in_dit_slot in dit_advice and in_vae_slot in vae_advice, (name, dit_advice, vae_advice)
        assert "mochi_preview_bf16.safetensors" in dit_advice and "mochi_vae.safetensors" in vae_advice


def test_mochi_files_keep_their_kinds_and_slot_advice(tmp_path, dit_state):
    from mochi_xdit.mochi.file_kind import FileKind, Slot

    full = {f"model.diffusion_model.{k}": v for k, v in fp8_scaled(dit_state).items()}
    save_file(full, tmp_path / "mochi_fp8_scaled.safetensors")
    dit = inspect_checkpoint(tmp_path / "mochi_fp8_scaled.safetensors")
    assert dit.kind == "dit" and dit.kind is FileKind.DIT and dit.dit_prefix == "model.diffusion_model."
    assert dit.fp8_scaled and "a Mochi DiT / diffusion model (2 blocks" in dit.describe()
    assert dit.wrong_slot_advice(Slot.DIT) == ""
    assert dit.wrong_slot_advice("vae", dit_input="--dit").startswith("Select it in --dit instead, and pick Mochi's VAE")

    save_file(random_vae_state_dict(TINY_VAE, seed=2), tmp_path / "decoder.safetensors")
    vae = inspect_checkpoint(tmp_path / "decoder.safetensors")
    assert vae.kind == "vae" and vae.vae_decoder_prefix == "" and not vae.has_vae_encoder
    assert vae.describe().startswith("a Mochi VAE (decoder, ")
    assert vae.wrong_slot_advice("vae") == ""
    assert vae.wrong_slot_advice("dit").startswith("Select it in vae_name instead, and pick the Mochi DiT here")

    encoder = inspect_checkpoint(save_shapes(tmp_path / "encoder.safetensors", mochi_encoder_only()))
    assert encoder.kind == "vae" and encoder.vae_decoder_prefix is None and encoder.has_vae_encoder
    with pytest.raises(CheckpointError, match=r"looks like a Mochi VAE \(encoder, 8 tensors.*it has no decoder"):
        load_vae_decoder(tmp_path / "encoder.safetensors")
    with pytest.raises(ValueError, match="is not a valid Slot"):
        dit.wrong_slot_advice("text_encoder")


def test_header_of_640_bytes_is_not_taken_for_a_pickle(tmp_path):
    """A header length of 0x280 makes the file start with 0x80 0x02, a pickle's protocol mark."""
    import json
    import struct

    from safetensors import safe_open

    header = json.dumps({"something.else": {"dtype": "F16", "shape": [1], "data_offsets": [0, 2]}}).encode()
    path = tmp_path / "odd_length.safetensors"
    path.write_bytes(struct.pack("<Q", 640) + header.ljust(640) + b"\0\0")
    assert path.read_bytes()[:2] == b"\x80\x02"
    with safe_open(path, framework="pt") as f:  # the file is valid for the reference reader
        assert list(f.keys()) == ["something.else"]
    assert inspect_checkpoint(path).kind == "unknown"


def test_unrecognised_file_lists_its_keys_and_claimed_architecture(tmp_path):
    path = save_shapes(tmp_path / "odd.safetensors", {"something.else": (2,), "more.things": (1,)},
                       metadata={"modelspec.architecture": "some-new-model"})
    info = inspect_checkpoint(path)
    assert info.kind == "unknown"
    assert info.describe() == ("an unrecognised safetensors file (2 tensors, F16; first keys: more.things, "
                               "something.else; its metadata says modelspec.architecture='some-new-model')")
    assert info.wrong_slot_advice("dit").startswith("Pick the Mochi DiT here: mochi_preview_bf16.safetensors")


def test_diffusers_layouts_are_told_apart():
    """Key names from diffusers' own model classes (tiny configs, built on the meta device)."""
    import diffusers
    import transformers

    from mochi_xdit.mochi.file_kind import FileKind, recognise

    with torch.device("meta"):
        models = build_reference_models(diffusers, transformers, FileKind)
    for kind, model in models.items():
        found = recognise({name: tuple(t.shape) for name, t in model.state_dict().items()})
        assert found.kind == kind, (type(model).__name__, found)


def build_reference_models(diffusers, transformers, FileKind) -> dict:
    """kind -> a tiny model of that kind as diffusers / transformers build it."""
    image_vae = dict(block_out_channels=(32, 64), norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2,
                     up_block_types=("UpDecoderBlock2D",) * 2)
    t5 = dict(d_model=16, d_ff=8, num_layers=2, num_heads=2, d_kv=8, vocab_size=8)
    return {
        FileKind.MOCHI_DIFFUSERS: diffusers.MochiTransformer3DModel(
            num_layers=2, num_attention_heads=2, attention_head_dim=8, text_embed_dim=16, pooled_projection_dim=16,
            in_channels=12, out_channels=12),
        FileKind.COGVIDEOX: diffusers.CogVideoXTransformer3DModel(
            num_layers=2, num_attention_heads=2, attention_head_dim=8, text_embed_dim=16, time_embed_dim=16),
        FileKind.LTX_VIDEO: diffusers.LTXVideoTransformer3DModel(
            num_layers=2, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16, caption_channels=16),
        FileKind.FLUX: diffusers.FluxTransformer2DModel(
            num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=16, joint_attention_dim=16,
            pooled_projection_dim=16, axes_dims_rope=(4, 6, 6)),
        FileKind.SD3: diffusers.SD3Transformer2DModel(
            num_layers=2, num_attention_heads=2, attention_head_dim=8, joint_attention_dim=16,
            caption_projection_dim=16, pooled_projection_dim=16, sample_size=16),
        FileKind.WAN: diffusers.WanTransformer3DModel(
            num_layers=2, num_attention_heads=2, attention_head_dim=8, text_dim=16, freq_dim=16, ffn_dim=32),
        FileKind.HUNYUAN_VIDEO: diffusers.HunyuanVideoTransformer3DModel(
            num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=16, text_embed_dim=16,
            pooled_projection_dim=16, rope_axes_dim=(4, 6, 6), num_refiner_layers=1),
        FileKind.SD_UNET: diffusers.UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=768, attention_head_dim=4,
            norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
        FileKind.SD_VAE: diffusers.AutoencoderKL(latent_channels=4, **image_vae),
        FileKind.FLUX_VAE: diffusers.AutoencoderKL(latent_channels=16, **image_vae),
        FileKind.CLIP_L: transformers.CLIPTextModel(transformers.CLIPTextConfig(
            hidden_size=768, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2, vocab_size=8)),
        FileKind.T5: transformers.T5EncoderModel(transformers.T5Config(**t5)),
        FileKind.UMT5: transformers.UMT5EncoderModel(transformers.UMT5Config(**t5)),
    }
