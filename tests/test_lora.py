"""Mochi LoRAs (mochi/lora.py, the call-time low-rank addition in mochi/layers.py, the rank verb).

Oracles: diffusers' MochiTransformer3DModel with a PEFT LoRA injected by diffusers' own Mochi LoRA
loader (same random base weights, same file); the merge formula W + strength * B @ A * alpha / rank
on a plain model for the genmo and ComfyUI formats; one rank for the gloo multi-rank runs.
"""

import importlib.util
import json
import os
import struct
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mochi_xdit.mochi import lora as lora_module
from mochi_xdit.mochi import lora_files
from mochi_xdit.mochi.checkpoint import load_dit
from mochi_xdit.mochi.demo import random_dit_state_dict
from mochi_xdit.mochi.dit import DiTConfig, MochiDiT
from mochi_xdit.mochi.layers import Linear
from mochi_xdit.mochi.lora import LoraSwitch, apply_loras, clear_loras, load_lora
from mochi_xdit.mochi.lora_files import (
    BLOCK_LINEARS, GLOBAL_LINEARS, LoraError, LoraFormat, LoraModulesIgnored, LoraProblem, LoraSpec, inspect_lora,
    linear_shapes,
)
from mochi_xdit.mochi.parallel.testing import run_ranks

pytestmark = pytest.mark.timeout(240)

TOLERANCE = 1e-5
# 2 heads (Ulysses 2 divides them); MLP widths int(8 d / 3) as diffusers builds them.
CONFIG = DiTConfig(depth=2, num_heads=2, head_dim=32, hidden_size_x=64, hidden_size_y=32,
                   mlp_hidden_x=170, mlp_hidden_y=85, t5_feat_dim=32)
LATENT = (1, 12, 2, 4, 6)  # 2 x 2 x 3 = 12 video tokens
VALID_TEXT = 7


def build(state: dict[str, torch.Tensor], config: DiTConfig = CONFIG) -> MochiDiT:
    with torch.device("meta"):
        model = MochiDiT(config)
    model.load_state_dict(state, assign=True)
    return model.eval().requires_grad_(False)


def inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(LATENT, generator=generator)
    text = torch.randn(1, 16, CONFIG.t5_feat_dim, generator=generator)
    mask = torch.zeros(1, 16, dtype=torch.int64)
    mask[0, :VALID_TEXT] = 1
    return latent, torch.tensor([0.6]), text, mask


@torch.no_grad()
def run(model, ctx=None, dtype=torch.float32) -> torch.Tensor:
    latent, sigma, text, mask = inputs()
    return model(latent.to(dtype), sigma, text, mask, ctx=ctx).float()


def random_pair(out_features: int, in_features: int, rank: int, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A [r, in], B [out, r] giving a delta about 0.3x a random base weight's size."""
    down = torch.randn(rank, in_features, generator=generator) / in_features**0.5
    up = 0.3 * torch.randn(out_features, rank, generator=generator) / rank**0.5
    return down, up


def merged_model(state, deltas: dict[str, torch.Tensor]) -> MochiDiT:
    """The plain model with W + delta for each listed Linear (the merge formula)."""
    state = dict(state)
    for module, delta in deltas.items():
        state[f"{module}.weight"] = state[f"{module}.weight"] + delta
    return build(state)


def max_error(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def state():
    return random_dit_state_dict(CONFIG, seed=0)


@pytest.fixture(scope="module")
def base_output(state):
    return run(build(state))


def genmo_file(path, rank=4, qkv_alpha=12.0, out_alpha=2.0, seed=1, with_metadata=True):
    """A genmo-trainer LoRA: attention qkv / proj pairs, bare `.lora_A` / `.lora_B`, kwargs metadata.
    Returns (path, {module: dense delta})."""
    generator = torch.Generator().manual_seed(seed)
    shapes = linear_shapes(build(random_dit_state_dict(CONFIG)))
    tensors, deltas = {}, {}
    for i in range(CONFIG.depth):
        for name, alpha in (("qkv_x", qkv_alpha), ("qkv_y", qkv_alpha), ("proj_x", out_alpha), ("proj_y", out_alpha)):
            module = f"blocks.{i}.attn.{name}"
            if module not in shapes:  # the last block has no proj_y
                continue
            down, up = random_pair(*shapes[module], rank, generator)
            tensors[f"{module}.lora_A"], tensors[f"{module}.lora_B"] = down, up
            deltas[module] = up @ down * (alpha / rank)
    kwargs = {"qkv_proj_lora_rank": rank, "qkv_proj_lora_alpha": qkv_alpha, "qkv_proj_lora_dropout": 0.0,
              "out_proj_lora_rank": rank, "out_proj_lora_alpha": out_alpha, "out_proj_lora_dropout": 0.0}
    save_file(tensors, str(path), metadata={"kwargs": json.dumps(kwargs)} if with_metadata else None)
    return str(path), deltas


# -- tables and parsing ----------------------------------------------------------------------

def test_linear_tables_match_the_model(state):
    model = build(state)
    expected = set(GLOBAL_LINEARS) | {f"blocks.{i}.{name}" for i in range(CONFIG.depth) for name in BLOCK_LINEARS}
    expected -= {f"blocks.{CONFIG.depth - 1}.{name}" for name in ("attn.proj_y", "mlp_y.w1", "mlp_y.w2")}
    assert set(linear_shapes(model)) == expected


def test_every_diffusers_linear_maps_onto_one_of_ours(state):
    theirs = diffusers_model()
    ours = linear_shapes(build(state))
    for name, module in theirs.named_modules():
        if isinstance(module, torch.nn.Linear):
            resolved = lora_files._resolve(f"transformer.{name}")
            assert not isinstance(resolved, str), f"{name}: {resolved}"
            naming, target, _ = resolved
            assert naming is lora_files._Naming.DIFFUSERS and target.module in ours, name
            out_features, in_features = ours[target.module]
            rows = out_features if target.part is None else out_features // 3
            assert (module.out_features, module.in_features) == (rows, in_features), name


# -- the diffusers oracle --------------------------------------------------------------------

def diffusers_model():
    import diffusers

    return diffusers.MochiTransformer3DModel(
        patch_size=CONFIG.patch_size, num_attention_heads=CONFIG.num_heads, attention_head_dim=CONFIG.head_dim,
        num_layers=CONFIG.depth, pooled_projection_dim=CONFIG.hidden_size_y, in_channels=CONFIG.in_channels,
        text_embed_dim=CONFIG.t5_feat_dim, time_embed_dim=CONFIG.timestep_freq_dim,
    ).eval()


def genmo_to_diffusers(state):
    """bench/diffusers_keys.py (imports nothing of ours), loaded by path."""
    path = Path(__file__).resolve().parent.parent / "bench" / "diffusers_keys.py"
    spec = importlib.util.spec_from_file_location("_diffusers_keys", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.genmo_to_diffusers(state, CONFIG.depth)


def peft_file(path, theirs, rank=4, alpha=8, use_rslora=False):
    """A diffusers / PEFT LoRA on every Linear of diffusers' Mochi, saved the way diffusers saves one:
    `transformer.`-prefixed keys, the LoraConfig as JSON under `lora_adapter_metadata`, with an alpha
    and a rank pattern."""
    generator = torch.Generator().manual_seed(7)
    rank_pattern = {"transformer_blocks.0.ff.net.2": 2}
    alpha_pattern = {"transformer_blocks.1.attn1.to_k": 3.0}
    tensors, targets = {}, []
    for name, module in theirs.named_modules():
        if isinstance(module, torch.nn.Linear):
            r = rank_pattern.get(name, rank)
            down, up = random_pair(module.out_features, module.in_features, r, generator)
            tensors[f"transformer.{name}.lora_A.weight"] = down
            tensors[f"transformer.{name}.lora_B.weight"] = up
            targets.append(name)
    config = {"r": rank, "lora_alpha": alpha, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
              "target_modules": targets, "use_rslora": use_rslora, "use_dora": False, "lora_dropout": 0.0}
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in config.items()})}
    save_file(tensors, str(path), metadata=metadata)
    return str(path)


@pytest.mark.parametrize("use_rslora", [False, True], ids=["alpha_over_r", "rslora"])
def test_diffusers_lora_matches_diffusers_own_loader(state, base_output, tmp_path, use_rslora):
    from diffusers.loaders.lora_pipeline import Mochi1LoraLoaderMixin

    theirs = diffusers_model()
    theirs.load_state_dict(genmo_to_diffusers(state), strict=True)
    path = peft_file(tmp_path / "peft_lora.safetensors", theirs, use_rslora=use_rslora)
    lora_state, metadata = Mochi1LoraLoaderMixin.lora_state_dict(path, return_lora_metadata=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes about target_modules
        Mochi1LoraLoaderMixin.load_lora_into_transformer(lora_state, transformer=theirs, metadata=metadata,
                                                         adapter_name="lora")
    latent, sigma, text, mask = inputs()

    ours = build(state)
    weights = load_lora(path, ours)
    assert weights.info.format is LoraFormat.DIFFUSERS and not weights.info.ignored
    for strength in (1.0, -0.7):
        theirs.set_adapters(["lora"], weights=[strength])
        with torch.no_grad():
            expected = theirs(latent, text, (1 - sigma) * 1000, mask, return_dict=False)[0]
        apply_loras(ours, [(weights, strength)])
        got = run(ours)
        assert max_error(got, expected) <= TOLERANCE, f"strength {strength}: {max_error(got, expected):.2e}"
        assert max_error(got, base_output) > 1e-2  # the LoRA really changes the output
    clear_loras(ours)
    assert torch.equal(run(ours), base_output)


# -- genmo and ComfyUI files against the merge formula ---------------------------------------

def test_genmo_file_matches_merge_formula(state, base_output, tmp_path):
    path, deltas = genmo_file(tmp_path / "genmo.safetensors", rank=4, qkv_alpha=12.0, out_alpha=2.0)
    info = inspect_lora(path, CONFIG)
    assert info.format is LoraFormat.GENMO and not info.ignored
    assert info.describe() == "a genmo trainer Mochi LoRA (7 layers in 2 blocks, rank 4)"
    assert {p.scale for p in info.pairs if "qkv" in p.module} == {3.0}
    assert {p.scale for p in info.pairs if "proj" in p.module} == {0.5}
    ours = build(state)
    apply_loras(ours, [(load_lora(path, ours), 1.0)])
    expected = run(merged_model(state, deltas))
    assert max_error(run(ours), expected) <= TOLERANCE
    assert max_error(expected, base_output) > 1e-2


def test_genmo_file_without_metadata_uses_genmo_default_alpha(tmp_path):
    path, _ = genmo_file(tmp_path / "genmo_plain.safetensors", rank=8, with_metadata=False)
    info = inspect_lora(path)
    assert info.format is LoraFormat.GENMO and {p.scale for p in info.pairs} == {16 / 8}


def test_comfy_and_kohya_names_match_merge_formula(state, tmp_path):
    """`diffusion_model.` + lora_down / lora_up + .alpha, and `lora_unet_` underscored names without
    alpha (scale 1, ComfyUI's rule), in one file."""
    generator = torch.Generator().manual_seed(3)
    shapes = linear_shapes(build(state))
    tensors, deltas = {}, {}
    for module, alpha in (("blocks.0.attn.qkv_x", 2.0), ("blocks.1.mlp_x.w1", 6.0), ("t5_y_embedder.to_kv", 1.0)):
        down, up = random_pair(*shapes[module], 4, generator)
        tensors[f"diffusion_model.{module}.lora_down.weight"] = down
        tensors[f"diffusion_model.{module}.lora_up.weight"] = up
        tensors[f"diffusion_model.{module}.alpha"] = torch.tensor(alpha)
        deltas[module] = up @ down * (alpha / 4)
    for module in ("blocks.0.mod_y", "blocks.1.attn.proj_x", "final_layer.mod"):
        down, up = random_pair(*shapes[module], 3, generator)
        kohya = "lora_unet_" + module.replace(".", "_")
        tensors[f"{kohya}.lora_down.weight"], tensors[f"{kohya}.lora_up.weight"] = down, up
        deltas[module] = up @ down
    path = str(tmp_path / "comfy.safetensors")
    save_file(tensors, path)
    ours = build(state)
    weights = load_lora(path, ours)
    assert weights.info.format is LoraFormat.COMFY and len(weights.info.pairs) == 6
    apply_loras(ours, [(weights, 1.0)])
    assert max_error(run(ours), run(merged_model(state, deltas))) <= TOLERANCE


# -- switching: strength 0, stacking, removal ------------------------------------------------

def test_strength_zero_equals_base_bit_for_bit(state, base_output, tmp_path):
    path, _ = genmo_file(tmp_path / "a.safetensors")
    ours = build(state)
    apply_loras(ours, [(load_lora(path, ours), 0.0)])
    assert torch.equal(run(ours), base_output)


def test_two_loras_stack_as_the_sum(state, tmp_path):
    path_a, deltas_a = genmo_file(tmp_path / "a.safetensors", seed=1)
    path_b, deltas_b = genmo_file(tmp_path / "b.safetensors", seed=2, qkv_alpha=4.0, out_alpha=4.0)
    ours = build(state)
    apply_loras(ours, [(load_lora(path_a, ours), 0.6), (load_lora(path_b, ours), -1.3)])
    deltas = {m: 0.6 * deltas_a[m] - 1.3 * deltas_b[m] for m in deltas_a}
    assert max_error(run(ours), run(merged_model(state, deltas))) <= TOLERANCE


def test_swap_and_back_to_none_restores_base_bit_for_bit(state, base_output, tmp_path):
    path_a, _ = genmo_file(tmp_path / "a.safetensors", seed=1)
    path_b, deltas_b = genmo_file(tmp_path / "b.safetensors", seed=2)
    ours = build(state)
    switch = LoraSwitch(ours, torch.float32)
    assert switch.set((LoraSpec(path_a, 1.0),))
    with_a = run(ours)
    assert switch.set((LoraSpec(path_b, 1.0),))  # swap: only B is active
    assert max_error(run(ours), run(merged_model(state, deltas_b))) <= TOLERANCE
    assert switch.set(())
    assert torch.equal(run(ours), base_output)
    assert all(m.low_rank is None for m in ours.modules() if isinstance(m, Linear))
    assert switch.set((LoraSpec(path_a, 1.0),))
    assert torch.equal(run(ours), with_a)


def test_switch_is_a_noop_when_nothing_changed(state, tmp_path, monkeypatch):
    path, _ = genmo_file(tmp_path / "a.safetensors")
    ours = build(state)
    switch = LoraSwitch(ours, torch.float32)
    loads = []
    real_load = lora_module.load_lora
    monkeypatch.setattr(lora_module, "load_lora", lambda *a: loads.append(a) or real_load(*a))
    assert switch.set((LoraSpec(path, 1.0),)) and len(loads) == 1
    assert not switch.set((LoraSpec(path, 1.0),))
    assert switch.set((LoraSpec(path, 0.5),)) and len(loads) == 1  # strength only: no re-read
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # the file was replaced
    assert switch.set((LoraSpec(path, 0.5),)) and len(loads) == 2


def test_fp8_base_weights_with_lora(state, tmp_path):
    """fp8-stored Linears (ComfyUI fp8_scaled semantics) + a LoRA equals the dequantised weights
    plus the merged delta, and clearing leaves the fp8 weights untouched."""
    dit_path = str(tmp_path / "dit.safetensors")
    save_file(state, dit_path)
    fp8 = load_dit(dit_path, "fp8")
    base = run(fp8)
    path, deltas = genmo_file(tmp_path / "genmo.safetensors")
    reference = {k: v.float() for k, v in fp8.state_dict().items() if not k.endswith("scale_weight")}
    for name, module in fp8.named_modules():
        if isinstance(module, Linear):
            assert module.weight.dtype == torch.float8_e4m3fn
            reference[f"{name}.weight"] = module.base_weight_as(torch.float32) + deltas.get(name, 0.0)
    apply_loras(fp8, [(load_lora(path, fp8), 1.0)])
    assert max_error(run(fp8), run(build(reference))) <= TOLERANCE
    apply_loras(fp8, [(load_lora(path, fp8), 1.0)], dtype=torch.bfloat16)  # a GPU's activation dtype
    in_bf16 = run(fp8, dtype=torch.bfloat16)
    assert torch.isfinite(in_bf16).all() and max_error(in_bf16, run(build(reference))) < 0.1
    clear_loras(fp8)
    assert torch.equal(run(fp8), base)


# -- several ranks ---------------------------------------------------------------------------

LAYOUTS = {"ulysses2": (1, 2, 1), "ring2": (1, 1, 2), "cfg2": (2, 1, 1)}


def rank_main(state, specs) -> dict:
    """Every rank: the same LoRAs through LoraSwitch (as the actor does), then each layout's forward."""
    from mochi_xdit.mochi.parallel.config import ParallelConfig
    from mochi_xdit.mochi.parallel.layout import ParallelContext

    model = build(state)
    LoraSwitch(model, torch.float32).set(specs)
    results = {}
    for name, (cfg, ulysses, ring) in LAYOUTS.items():
        ctx = ParallelContext(ParallelConfig(2, cfg, ulysses, ring, num_heads=CONFIG.num_heads))
        results[name] = run(model, ctx=ctx)
        ctx.close()
    return results


def test_several_ranks_with_loras_equal_one_rank(state, tmp_path):
    """Sequence parallelism shards tokens only and the LoRA is a per-token Linear on full weights, so
    each rank adds the same contribution to its tokens: the gathered output equals one rank's."""
    shapes = linear_shapes(build(state))
    genmo_path, _ = genmo_file(tmp_path / "genmo.safetensors")
    split_path = write_split_qkv_lora(tmp_path / "split.safetensors", shapes, torch.Generator().manual_seed(11))
    specs = (LoraSpec(genmo_path, 0.8), LoraSpec(split_path, 1.2))
    results = run_ranks(rank_main, 2, state, specs, timeout_s=200, collective_timeout_s=60)
    single = build(state)
    LoraSwitch(single, torch.float32).set(specs)
    expected = run(single)
    assert max_error(expected, run(build(state))) > 1e-2
    for name in LAYOUTS:
        for rank, per_rank in enumerate(results):
            error = max_error(per_rank[name], expected)
            assert error <= TOLERANCE, f"{name} rank {rank}: max abs error {error:.2e}"


def write_split_qkv_lora(path, shapes, generator):
    """diffusers names on q / k / v separately (the row-slice case), no metadata (scale 1)."""
    tensors = {}
    for i in range(CONFIG.depth):
        for name, module in (("to_q", "attn.qkv_x"), ("to_v", "attn.qkv_x"), ("add_k_proj", "attn.qkv_y"),
                             ("ff.net.0.proj", "mlp_x.w1")):
            out_features, in_features = shapes[f"blocks.{i}.{module}"]
            rows = out_features // 3 if module.startswith("attn.qkv") else out_features
            down, up = random_pair(rows, in_features, 3, generator)
            key = f"transformer.transformer_blocks.{i}.{'' if name.startswith('ff') else 'attn1.'}{name}"
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = down, up
    save_file(tensors, str(path))
    return str(path)


# -- files that are refused or partly ignored --------------------------------------------------

def save_pairs(path, keys: dict[str, tuple[int, ...]], metadata=None) -> str:
    generator = torch.Generator().manual_seed(0)
    save_file({k: torch.randn(shape, generator=generator) for k, shape in keys.items()}, str(path), metadata=metadata)
    return str(path)


def expect_error(kind: LoraProblem, path, *words, config=None):
    with pytest.raises(LoraError) as caught:
        inspect_lora(path, config)
    assert caught.value.kind is kind, str(caught.value)
    for word in words:
        assert word in str(caught.value), str(caught.value)
    return caught.value


def test_flux_lora_is_refused(tmp_path):
    path = save_pairs(tmp_path / "flux.safetensors", {
        "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": (4, 64),
        "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": (64, 4),
        "transformer.transformer_blocks.0.ff.net.2.lora_A.weight": (4, 170),  # a name Mochi shares
        "transformer.transformer_blocks.0.ff.net.2.lora_B.weight": (64, 4),
    })
    expect_error(LoraProblem.NOT_MOCHI, path, "Flux", "not a Mochi LoRA")


def test_sd_lora_is_refused(tmp_path):
    path = save_pairs(tmp_path / "sd.safetensors", {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 64),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": (64, 4),
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": (),
    })
    expect_error(LoraProblem.NOT_MOCHI, path, "Stable Diffusion")


def test_lora_naming_no_mochi_layer_is_refused(tmp_path):
    path = save_pairs(tmp_path / "llm.safetensors", {
        "base_model.model.layers.0.self_attn.q_proj.lora_A.weight": (4, 64),
        "base_model.model.layers.0.self_attn.q_proj.lora_B.weight": (64, 4),
    })
    expect_error(LoraProblem.NOT_MOCHI, path, "names no layer of Mochi", "layers.0.self_attn.q_proj")


def test_checkpoint_given_as_lora_is_refused(state, tmp_path):
    path = str(tmp_path / "dit.safetensors")
    save_file(state, path)
    expect_error(LoraProblem.NOT_A_LORA, path, "no LoRA tensors", "Mochi DiT")


def test_mismatched_ranks_are_refused(tmp_path):
    path = save_pairs(tmp_path / "ranks.safetensors", {
        "blocks.0.attn.qkv_x.lora_A": (8, 64), "blocks.0.attn.qkv_x.lora_B": (192, 4)})
    expect_error(LoraProblem.INCONSISTENT, path, "rank 8", "rank 4")


def test_lora_for_another_width_is_refused_with_the_model(tmp_path, state):
    path = save_pairs(tmp_path / "wide.safetensors", {
        "blocks.0.attn.qkv_x.lora_A": (16, 3072), "blocks.0.attn.qkv_x.lora_B": (9216, 16)})
    assert inspect_lora(path).pairs  # the file itself is fine ...
    error = expect_error(LoraProblem.SHAPE_MISMATCH, path, "3072", "different model", config=CONFIG)  # ... not here
    with pytest.raises(LoraError) as caught:
        load_lora(path, build(state))
    assert caught.value.kind is LoraProblem.SHAPE_MISMATCH and str(caught.value) == str(error)


def test_truncated_file_is_refused(tmp_path):
    path, _ = genmo_file(tmp_path / "cut.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 100)
    expect_error(LoraProblem.BAD_FILE, path, "truncated")
    with open(path, "r+b") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        f.truncate(8 + header_len // 2)  # cut inside the header
    expect_error(LoraProblem.BAD_FILE, path, "truncated")


def test_pickle_files_are_refused_without_unpickling(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load must never run on a LoRA"))
    pt = tmp_path / "genmo_lora.pt"
    torch.save({"blocks.0.attn.qkv_x.lora_A": torch.zeros(4, 64)}, pt)
    expect_error(LoraProblem.PICKLE, pt, "pickle", "safetensors.torch.save_file", "qkv_proj_lora_alpha")
    disguised = tmp_path / "disguised.safetensors"
    disguised.write_bytes(pt.read_bytes())
    expect_error(LoraProblem.PICKLE, disguised, "pickle")


def test_every_header_length_reads_as_the_lora_it_is_not_as_a_pickle(tmp_path):
    """A safetensors file starts with its header's length: lengths 0x0280..0x05ff start 0x80 0x02..0x05,
    a pickle's protocol mark (a rank-8 file written by bench/lora_swap.py has a 1408-byte header).
    Every one reads as the genmo LoRA it is; a truncated copy is called truncated, not a pickle."""
    save_file({"blocks.0.attn.qkv_x.lora_A": torch.zeros(8, 64), "blocks.0.attn.qkv_x.lora_B": torch.zeros(192, 8)},
              str(tmp_path / "genmo.safetensors"))
    data = (tmp_path / "genmo.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header, body = data[8:8 + length].rstrip(b" "), data[8 + length:]
    path = tmp_path / "padded.safetensors"
    for target in range(0x0280, 0x0600):  # safetensors pads headers with spaces
        path.write_bytes(struct.pack("<Q", target) + header + b" " * (target - len(header)) + body)
        assert inspect_lora(path).format is LoraFormat.GENMO, hex(target)
    path.write_bytes((struct.pack("<Q", 0x0580) + header + b" " * (0x0580 - len(header)) + body)[:200])
    expect_error(LoraProblem.BAD_FILE, path, "truncated")


def test_missing_file_and_unpaired_and_dora_are_refused(tmp_path):
    expect_error(LoraProblem.NOT_FOUND, tmp_path / "absent.safetensors", "does not exist")
    path = save_pairs(tmp_path / "half.safetensors", {"blocks.0.attn.qkv_x.lora_A": (4, 64)})
    expect_error(LoraProblem.INCONSISTENT, path, "partner")
    path = save_pairs(tmp_path / "dora.safetensors", {
        "blocks.0.attn.qkv_x.lora_A": (4, 64), "blocks.0.attn.qkv_x.lora_B": (192, 4),
        "blocks.0.attn.qkv_x.dora_scale": (1, 64)})
    expect_error(LoraProblem.UNSUPPORTED, path, "DoRA")


def test_modules_the_model_lacks_are_listed_in_one_warning(state, base_output, tmp_path):
    path = save_pairs(tmp_path / "partial.safetensors", {
        "blocks.0.attn.qkv_x.lora_A": (4, 64), "blocks.0.attn.qkv_x.lora_B": (192, 4),
        "blocks.0.attn.q_norm_x.lora_A": (4, 32), "blocks.0.attn.q_norm_x.lora_B": (32, 4),  # a norm
        "blocks.1.attn.proj_y.lora_A": (4, 64), "blocks.1.attn.proj_y.lora_B": (32, 4),  # last block: absent
        "blocks.9.attn.qkv_x.lora_A": (4, 64), "blocks.9.attn.qkv_x.lora_B": (192, 4),  # beyond depth 2
    })
    ours = build(state)
    with pytest.warns(LoraModulesIgnored) as caught:
        weights = load_lora(path, ours)
    assert len(caught) == 1
    message = str(caught[0].message)
    for name in ("blocks.0.attn.q_norm_x", "blocks.1.attn.proj_y", "blocks.9.attn.qkv_x"):
        assert name in message
    assert {m.source for m in weights.info.ignored} == {"blocks.0.attn.q_norm_x", "blocks.1.attn.proj_y",
                                                        "blocks.9.attn.qkv_x"}
    assert [p.module for p in weights.info.pairs] == ["blocks.0.attn.qkv_x"]
    apply_loras(ours, [(weights, 1.0)])
    assert max_error(run(ours), base_output) > 1e-3


# -- the rank verb ---------------------------------------------------------------------------

def test_rank_worker_set_loras(state, base_output, tmp_path):
    from mochi_xdit.mochi.parallel.config import ParallelConfig
    from mochi_xdit.workers.actor import RankWorker
    from mochi_xdit.workers.protocol import PoolSpec

    dit_path = str(tmp_path / "dit.safetensors")
    save_file(state, dit_path)
    path, deltas = genmo_file(tmp_path / "genmo.safetensors")
    worker = RankWorker(0, PoolSpec(dit_path, None, "fp32", ParallelConfig(1, num_heads=CONFIG.num_heads)))
    worker.load()
    base = run(worker.dit)
    assert max_error(base, base_output) <= TOLERANCE
    worker.set_loras((LoraSpec(path, 0.5),))
    expected = run(merged_model(state, {m: 0.5 * d for m, d in deltas.items()}))
    assert max_error(run(worker.dit), expected) <= TOLERANCE
    worker.set_loras(())
    assert torch.equal(run(worker.dit), base)
    worker._loop = object()  # a run in progress
    with pytest.raises(RuntimeError, match="during a run"):
        worker.set_loras((LoraSpec(path, 1.0),))
