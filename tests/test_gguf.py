"""GGUF DiT files: a `.gguf` of the demo DiT written with the gguf package's writer (Q8_0, Q4_0,
Q4_K, Q5_K, Q6_K and F32 tensors, genmo names as city96's converter writes them) and a
GGUF-in-safetensors file (ComfyUI-MochiWrapper's `<m>.Q8_0_qweight` / `<m>.Q4_0_qweight` layout)
load with their Linear weights still quantised and compute what the dequantised weights compute
(the gguf package's numpy dequantiser is the reference), with a LoRA on top, replicated and sharded.

The gguf package quantises only the 32-element types, so K-quant tensors are random valid blocks
(small scales); the demo DiT's 192- and 96-wide rows are not whole 256-element blocks, so K types
go to the layers whose rows are (as converters fall back per tensor).
"""

import dataclasses

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

gguf = pytest.importorskip("gguf")

from mochi_xdit.mochi.checkpoint import inspect_checkpoint, load_dit  # noqa: E402
from mochi_xdit.mochi.demo import DEMO_DIT_CONFIG, random_dit_state_dict  # noqa: E402
from mochi_xdit.mochi.dit import MochiDiT  # noqa: E402
from mochi_xdit.mochi.file_kind import FileKind  # noqa: E402
from mochi_xdit.mochi.gguf_linear import GGUFLinear, GGUFQuant, dequantize  # noqa: E402
from mochi_xdit.mochi.layers import Linear, LowRankUpdate  # noqa: E402
from mochi_xdit.mochi.parallel.testing import run_ranks  # noqa: E402
from mochi_xdit.mochi.weight_placement import WeightPlacement, local_weight_bytes, place_weights  # noqa: E402

T = gguf.GGMLQuantizationType
CONFIG = dataclasses.replace(DEMO_DIT_CONFIG, t5_feat_dim=256)  # keeps the T5 pool small; rows of 256
TOLERANCE = 1e-5
K_TYPES = (T.Q6_K, T.Q5_K, T.Q4_K)


def random_k_blocks(rows: int, columns: int, qtype, seed: int) -> np.ndarray:
    """Valid K-quant bytes [rows, row_bytes] with small fp16 scales (weights of magnitude ~0.1)."""
    quant = GGUFQuant(qtype.name)
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows, columns // 256, quant.block_bytes), dtype=np.uint8)
    scale = lambda: rng.uniform(2e-4, 6e-4, size=(rows, columns // 256)).astype(np.float16)  # noqa: E731
    if quant is GGUFQuant.Q6_K:
        blocks[..., 208:210] = scale().view(np.uint8).reshape(rows, -1, 2)
    else:
        blocks[..., 0:2] = scale().view(np.uint8).reshape(rows, -1, 2)
        blocks[..., 2:4] = scale().view(np.uint8).reshape(rows, -1, 2)
    return blocks.reshape(rows, -1)


def linear_weight_names(config) -> set[str]:
    with torch.device("meta"):
        model = MochiDiT(config)
    return {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, Linear)}


def quantised_state(config, seed: int = 0):
    """(name -> (ggml type, stored numpy data), name -> dequantised fp32 tensor): Linear weights in
    block blocks of every type, the rest F32."""
    state = random_dit_state_dict(config, seed=seed)
    linears = linear_weight_names(config)
    stored, reference = {}, {}
    for index, (name, tensor) in enumerate(sorted(state.items())):
        array = tensor.numpy()
        if name in linears and tensor.shape[1] % 256 == 0:
            qtype = K_TYPES[index % len(K_TYPES)]
            data = random_k_blocks(*tensor.shape, qtype, seed=index)
        elif name in linears:
            qtype = (T.Q8_0, T.Q4_0)[index % 2]
            data = gguf.quants.quantize(array, qtype)
        else:
            qtype, data = T.F32, array
        stored[name] = (qtype, data)
        dense = array if qtype == T.F32 else gguf.quants.dequantize(data, qtype)
        reference[name] = torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32)).reshape(tensor.shape)
    return stored, reference


def write_gguf(path: str, stored: dict) -> str:
    writer = gguf.GGUFWriter(path, "mochi")
    for name, (qtype, data) in stored.items():
        writer.add_tensor(name, data, raw_dtype=None if qtype == T.F32 else qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def reference_model(reference: dict, config=CONFIG) -> MochiDiT:
    with torch.device("meta"):
        model = MochiDiT(config)
    model.load_state_dict(reference, assign=True)
    return model.eval().requires_grad_(False)


def inputs(t5_feat_dim: int = CONFIG.t5_feat_dim):
    generator = torch.Generator().manual_seed(4)
    latent = torch.randn(1, 12, 2, 8, 12, generator=generator)
    features = torch.randn(1, 32, t5_feat_dim, generator=generator)
    mask = torch.zeros(1, 32, dtype=torch.int64)
    mask[:, :9] = 1
    return latent, torch.tensor([0.6]), features, mask


def add_lora(model) -> None:
    generator = torch.Generator().manual_seed(9)
    for name, module in model.named_modules():
        if isinstance(module, Linear) and name.startswith("blocks."):
            module.low_rank = LowRankUpdate(torch.randn(2, module.in_features, generator=generator) * 0.05,
                                            torch.randn(module.out_features, 2, generator=generator) * 0.05)


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    stored, reference = quantised_state(CONFIG)
    path = write_gguf(str(tmp_path_factory.mktemp("gguf") / "mochi_demo-Q.gguf"), stored)
    return path, stored, reference


def test_torch_dequantisers_equal_the_gguf_package():
    rng = np.random.default_rng(1)
    for quant in GGUFQuant:
        qtype = T[quant.value]
        if quant.block_elements == 256:
            data = random_k_blocks(3, 512, qtype, seed=2)
        else:
            data = gguf.quants.quantize(rng.standard_normal((3, 512)).astype(np.float32), qtype)
        expected = gguf.quants.dequantize(data, qtype)
        got = dequantize(torch.from_numpy(data), quant).numpy()
        assert np.array_equal(got, expected), quant


def test_gguf_file_is_recognised_and_sized(gguf_file):
    path, stored, _ = gguf_file
    info = inspect_checkpoint(path)
    assert info.kind == FileKind.DIT and info.gguf and info.quantised
    assert info.tensors["blocks.0.attn.qkv_x.weight"].shape == (3 * CONFIG.inner_dim, CONFIG.hidden_size_x)
    assert "GGUF" in info.describe() and "2 blocks" in info.describe()
    used = {qtype.name for qtype, _ in stored.values()}
    assert {"Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K", "F32"} <= used


def test_gguf_dit_stays_quantised_and_matches_the_dequantised_reference(gguf_file):
    path, stored, reference = gguf_file
    model = load_dit(path, "fp32", "cpu")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, GGUFLinear)}
    assert len(layers) == len(linear_weight_names(CONFIG))
    assert all(layer.weight.dtype == torch.uint8 for layer in layers.values())
    assert {layer.quant for layer in layers.values()} == set(GGUFQuant)
    expected_model = reference_model(reference)
    with torch.no_grad():
        error = (model(*inputs()) - expected_model(*inputs())).abs().max().item()
    assert error <= TOLERANCE
    add_lora(model)
    add_lora(expected_model)
    with torch.no_grad():
        error = (model(*inputs()) - expected_model(*inputs())).abs().max().item()
    assert error <= TOLERANCE, f"with a LoRA: {error:.2e}"


def test_gguf_in_safetensors_layout_loads_quantised(tmp_path):
    """ComfyUI-MochiWrapper's files: `<m>.Q8_0_qweight` / `<m>.Q4_0_qweight` U8 block bytes."""
    state = random_dit_state_dict(CONFIG, seed=3)
    linears = linear_weight_names(CONFIG)
    tensors, reference = {}, {}
    for index, (name, tensor) in enumerate(sorted(state.items())):
        if name in linears and name.startswith("blocks."):
            qtype = (T.Q8_0, T.Q4_0)[index % 2]
            data = gguf.quants.quantize(tensor.numpy(), qtype)
            tensors[name[: -len(".weight")] + f".{qtype.name}_qweight"] = torch.from_numpy(data)
            reference[name] = torch.from_numpy(gguf.quants.dequantize(data, qtype)).reshape(tensor.shape)
        else:
            tensors[name] = tensor.to(torch.bfloat16)
            reference[name] = tensors[name].float()
    path = str(tmp_path / "mochi_preview_dit_GGUF_Q8_0.safetensors")
    save_file(tensors, path)
    info = inspect_checkpoint(path)
    assert info.kind == FileKind.DIT and info.quantised and not info.gguf
    assert "GGUF in safetensors" in info.describe()
    model = load_dit(path, "fp32", "cpu")
    assert isinstance(model.blocks[0].attn.qkv_x, GGUFLinear)
    with torch.no_grad():
        error = (model(*inputs()) - reference_model(reference)(*inputs())).abs().max().item()
    assert error <= TOLERANCE


def test_gguf_refuses_fp8_storage(gguf_file):
    with pytest.raises(ValueError, match="already quantised"):
        load_dit(gguf_file[0], "fp8", "cpu")


@torch.no_grad()
def sharded_gguf_rank(path: str) -> tuple:
    model = load_dit(path, "fp32", "cpu")
    add_lora(model)
    before = local_weight_bytes(model.blocks)
    place_weights(model, WeightPlacement.SHARDED, torch.device("cpu"))
    return model(*inputs()), local_weight_bytes(model.blocks) / before


def test_gguf_dit_sharded_over_two_ranks_matches_the_reference(gguf_file):
    path, _, reference = gguf_file
    expected_model = reference_model(reference)
    add_lora(expected_model)
    with torch.no_grad():
        expected = expected_model(*inputs())
    for rank, (got, share) in enumerate(run_ranks(sharded_gguf_rank, 2, path, timeout_s=120)):
        assert (got - expected).abs().max().item() <= TOLERANCE, f"rank {rank}"
        assert share <= 0.5 + 0.05, f"rank {rank} holds {share:.2f} of the quantised blocks"


def test_other_and_truncated_gguf_files_are_refused_with_what_they_are(tmp_path):
    from mochi_xdit.mochi.checkpoint import CheckpointError

    path = str(tmp_path / "flux-Q8_0.gguf")
    writer = gguf.GGUFWriter(path, "flux")
    writer.add_tensor("double_blocks.0.img_attn.proj.weight", np.zeros((64, 64), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="looks like a Flux DiT .* but a Mochi DiT was expected"):
        load_dit(path, "fp32", "cpu")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(open(path, "rb").read()[:200])
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        inspect_checkpoint(str(truncated))


def test_the_planner_counts_a_gguf_dit_as_the_bytes_a_rank_keeps(gguf_file, tmp_path):
    from mochi_xdit.mochi.checkpoint import CheckpointInfo, TensorInfo
    from mochi_xdit.mochi.dit import DiTConfig
    from mochi_xdit.mochi.parallel.config import ParallelConfig
    from mochi_xdit.mochi.planner.hardware import gpu_with_memory
    from mochi_xdit.mochi.planner.placement import quantised_weight_split
    from mochi_xdit.mochi.planner.plan import choose_placement

    path, _, _ = gguf_file
    split = quantised_weight_split(inspect_checkpoint(path), CONFIG.depth)
    model = load_dit(path, "bf16", "cpu")  # the oracle: what a rank holds once loaded
    assert split.block_bytes == sum(local_weight_bytes(block) for block in model.blocks)
    assert split.largest_block_bytes == max(local_weight_bytes(block) for block in model.blocks)
    assert abs(split.total_bytes - local_weight_bytes(model)) <= 0.001 * local_weight_bytes(model)  # fp32 tensors

    # the full-size DiT as a Q4_0 file: ~5.6 GB of weights, so one 12 GB card holds it whole at 49 frames,
    # where the same model counted as bf16 (20 GB) would have to be offloaded
    full = DiTConfig()
    with torch.device("meta"):
        meta = MochiDiT(full)
    linears = {f"{name}.weight" for name, module in meta.named_modules() if isinstance(module, Linear)}
    tensors = {name: TensorInfo("Q4_0" if name in linears else "BF16", tuple(tensor.shape))
               for name, tensor in meta.state_dict().items()}
    info = CheckpointInfo("mochi-Q4_0.gguf", FileKind.DIT, tensors, "", None, False, False, {}, gguf=True)
    q4 = quantised_weight_split(info, full.depth)
    assert 5.0e9 < q4.total_bytes < 6.5e9
    card = gpu_with_memory(12)
    assert choose_placement(ParallelConfig(1), 848, 480, 49, card, "bf16")[0] is WeightPlacement.OFFLOAD
    placement, why = choose_placement(ParallelConfig(1), 848, 480, 49, card, "bf16", split=q4)
    assert placement is WeightPlacement.REPLICATED, why
    # what `weights` auto runs on a local GPU, with a .gguf demo DiT (T5 width 4096, as the planner
    # counts real prompts; it fits anything)
    from mochi_xdit.workers.options import LoadChoices, auto_placement

    demo = write_gguf(str(tmp_path / "demo.gguf"), {name: (T.F32, tensor.float().numpy())
                                                    for name, tensor in random_dit_state_dict(DEMO_DIT_CONFIG).items()})
    choices = LoadChoices(demo, None, world_size=1, video=(64, 48, 7))
    placement, why = auto_placement(choices, ParallelConfig(1, num_heads=DEMO_DIT_CONFIG.num_heads), "bf16", card)
    assert placement is WeightPlacement.REPLICATED and why.startswith("weights auto -> replicated: it fits")
