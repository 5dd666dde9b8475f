"""The bundled API-format workflow, executed node by node in Python the way ComfyUI's executor
does it (inputs resolved from links, FUNCTION called with keyword arguments), with tiny demo
checkpoints and a real 2-rank Ray pool on loopback. Core nodes that need ComfyUI itself are stood
in for by what they return (COMFY_FACTS.md): CLIPTextEncode's CONDITIONING, EmptyMochiLatentVideo's
zero LATENT; CreateVideo/SaveVideo receive the IMAGE.

Oracle: the single-process pipeline on the same files (`mochi.pipeline.generate` over `load_dit`,
then `decode_frames` with the same tiles), fp32.
"""

import json
import os
from dataclasses import replace
import sys
import types

import pytest
import torch
from safetensors.torch import save_file

from mochi_xdit import NODE_CLASS_MAPPINGS
from mochi_xdit.mochi.checkpoint import load_dit, load_vae_decoder
from mochi_xdit.mochi.demo import DEMO_DIT_CONFIG, DEMO_VAE_CONFIG, random_dit_state_dict, random_vae_state_dict
from mochi_xdit.mochi.pipeline import decode_frames, generate
from mochi_xdit.mochi.sampler import SampleRequest
from mochi_xdit.mochi.text import TextCondition
from mochi_xdit.mochi.vae_tiling import plan_tiles

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
API_WORKFLOW = os.path.join(ROOT, "workflows", "api", "mochi_xdit_text_to_video_api.json")
UI_WORKFLOW = os.path.join(ROOT, "workflows", "mochi_xdit_text_to_video.json")
TOLERANCE = 1e-5  # fp32, parallel vs single rank (DESIGN.md section 8)

# Small run: 32x48 pixels, 7 frames (T = 2), 3 steps; the rest is the bundled workflow as is.
OVERRIDES = {
    ("1", "clip_name"): "t5xxl_random_fp8.safetensors",
    ("4", "width"): 48, ("4", "height"): 32, ("4", "length"): 7,
    ("5", "dit_name"): "demo_dit.safetensors", ("5", "vae_name"): "demo_vae.safetensors", ("5", "world_size"): 2,
    ("6", "steps"): 3,
    ("7", "tiling"): "manual", ("7", "tile_size"): 32, ("7", "tile_overlap"): 8, ("7", "frame_chunk"): 1,
}


class InterruptProcessingException(Exception):
    pass


def genmo_lora(rank: int, seed: int) -> dict:
    """A genmo-trainer LoRA for the demo DiT: every block's qkv_x / proj_x, bare .lora_A / .lora_B."""
    from mochi_xdit.mochi.lora_files import linear_shapes_for

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (out_features, in_features) in linear_shapes_for(DEMO_DIT_CONFIG).items():
        if module.endswith(("attn.qkv_x", "attn.proj_x")):
            tensors[f"{module}.lora_A"] = torch.randn(rank, in_features, generator=generator) / in_features**0.5
            tensors[f"{module}.lora_B"] = 0.3 * torch.randn(out_features, rank, generator=generator) / rank**0.5
    return tensors


@pytest.fixture(scope="module")
def comfy_env(tmp_path_factory):
    """models/ with the demo DiT and VAE, and stand-ins for folder_paths and comfy.* in sys.modules."""
    root = tmp_path_factory.mktemp("models")
    folders = {name: root / name for name in ("diffusion_models", "vae", "text_encoders", "loras")}
    for path in folders.values():
        path.mkdir()
    save_file(random_dit_state_dict(DEMO_DIT_CONFIG, seed=0), str(folders["diffusion_models"] / "demo_dit.safetensors"))
    vae = {f"decoder.{name}": value for name, value in random_vae_state_dict(DEMO_VAE_CONFIG, seed=1).items()}
    save_file(vae, str(folders["vae"] / "demo_vae.safetensors"))
    save_file(genmo_lora(rank=2, seed=3), str(folders["loras"] / "demo_lora.safetensors"),
              metadata={"kwargs": json.dumps({"qkv_proj_lora_rank": 2, "qkv_proj_lora_alpha": 4,
                                              "out_proj_lora_rank": 2, "out_proj_lora_alpha": 4})})

    folder_paths = types.ModuleType("folder_paths")
    folder_paths.get_filename_list = lambda folder: sorted(os.listdir(folders[folder]))
    folder_paths.get_full_path = lambda folder, name: str(folders[folder] / os.path.relpath(os.path.join("/", name), "/"))
    folder_paths.get_folder_paths = lambda folder: [str(folders[folder])]
    comfy = types.ModuleType("comfy")
    utils = types.ModuleType("comfy.utils")
    management = types.ModuleType("comfy.model_management")
    utils.updates = []

    class ProgressBar:
        def __init__(self, total, node_id=None):
            self.total = total

        def update_absolute(self, value, total=None, preview=None):
            utils.updates.append((value, total))
            if management.interrupt_at is not None and value >= management.interrupt_at:
                management.interrupted = True  # the user presses Cancel during this step

    utils.ProgressBar = ProgressBar
    management.interrupted, management.interrupt_at = False, None
    management.InterruptProcessingException = InterruptProcessingException
    management.processing_interrupted = lambda: management.interrupted

    def throw_exception_if_processing_interrupted():
        if management.interrupted:
            management.interrupted = False
            raise InterruptProcessingException()

    management.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    management.unloaded = 0

    def unload_all_models():  # what POST /free and "Unload Models" end in (main.py's prompt worker)
        management.unloaded += 1

    management.unload_all_models = unload_all_models
    samplers = types.ModuleType("comfy.samplers")
    samplers.KSampler = types.SimpleNamespace(SAMPLERS=["euler", "dpmpp_2m_sde"], SCHEDULERS=["simple", "linear_quadratic"])
    comfy.utils, comfy.model_management, comfy.samplers = utils, management, samplers
    saved = {name: sys.modules.get(name) for name in ("folder_paths", "comfy", "comfy.utils", "comfy.model_management",
                                                      "comfy.samplers")}
    sys.modules.update({"folder_paths": folder_paths, "comfy": comfy, "comfy.utils": utils,
                        "comfy.model_management": management, "comfy.samplers": samplers})
    yield types.SimpleNamespace(folders=folders, utils=utils, management=management)
    for name, module in saved.items():
        if module is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = module
    from mochi_xdit.workers.service import default_service

    default_service().shutdown()


def clip_text_encode(text: str) -> list:
    """CLIPTextEncode's CONDITIONING for Mochi: [[cond [1, 256, 4096], {pooled_output, attention_mask}]];
    the number of valid tokens grows with the prompt, an empty prompt has none."""
    generator = torch.Generator().manual_seed(len(text))
    cond = torch.randn(1, 256, 4096, generator=generator)
    mask = torch.zeros(1, 256, dtype=torch.int64)
    mask[:, : min(255, len(text.split()) + 1) if text else 0] = 1
    return [[cond, {"pooled_output": None, "attention_mask": mask}]]


CORE_NODES = {
    "CLIPLoader": lambda clip_name, type, device="default": ("clip:" + clip_name,),
    "CLIPTextEncode": lambda clip, text: (clip_text_encode(text),),
    "EmptyMochiLatentVideo": lambda width, height, length, batch_size: (
        {"samples": torch.zeros(batch_size, 12, (length - 1) // 6 + 1, height // 8, width // 8)},),
    "CreateVideo": lambda images, fps, audio=None: ({"images": images, "fps": fps},),
    "SaveVideo": lambda video, filename_prefix, format, codec: (),
}


def run_api_workflow(prompt: dict) -> dict:
    """Execute an API-format graph like ComfyUI: each node once, after its inputs, FUNCTION called
    with the widget values and the linked outputs (after our VALIDATE_INPUTS accepted the widgets)."""
    outputs = {}

    def execute(node_id):
        if node_id in outputs:
            return outputs[node_id]
        node = prompt[node_id]
        inputs = {}
        for name, value in node["inputs"].items():
            inputs[name] = execute(value[0])[value[1]] if isinstance(value, list) else value
        class_type = node["class_type"]
        if class_type in NODE_CLASS_MAPPINGS:
            cls = NODE_CLASS_MAPPINGS[class_type]
            names = [n for n in cls.VALIDATE_INPUTS.__code__.co_varnames[1:cls.VALIDATE_INPUTS.__code__.co_argcount]]
            verdict = cls.VALIDATE_INPUTS(**{n: node["inputs"][n] for n in names if n in node["inputs"]})  # raises
            assert verdict is True, f"{class_type}: {verdict}"
            outputs[node_id] = getattr(cls(), cls.FUNCTION)(**inputs)
        else:
            outputs[node_id] = CORE_NODES[class_type](**inputs)
        return outputs[node_id]

    for node_id in prompt:
        execute(node_id)
    return outputs


def small_workflow() -> dict:
    with open(API_WORKFLOW) as f:
        prompt = json.load(f)
    for (node_id, name), value in OVERRIDES.items():
        assert name in prompt[node_id]["inputs"], (node_id, name)
        prompt[node_id]["inputs"][name] = value
    return prompt


def oracle_request(prompt: dict, **extra) -> SampleRequest:
    """The single-process SampleRequest the workflow's sampler (node 6) runs: same prompts, seed,
    steps, cfg and schedule (its `scheduler` input)."""
    sampler = prompt["6"]["inputs"]
    positive = clip_text_encode(prompt["2"]["inputs"]["text"])[0]
    negative = clip_text_encode(prompt["3"]["inputs"]["text"])[0]
    return SampleRequest(
        positive=TextCondition(positive[0], positive[1]["attention_mask"]),
        negative=TextCondition(negative[0], negative[1]["attention_mask"]),
        init_latent=torch.zeros(1, 12, 2, 4, 6), seed=sampler["seed"], steps=sampler["steps"], cfg=sampler["cfg"],
        schedule=sampler["scheduler"], denoise=sampler["denoise"], **extra)


@pytest.mark.parametrize("name", ["mochi_xdit_text_to_video", "mochi_xdit_video_to_video"])
def test_ui_workflow_matches_api_workflow(comfy_env, name):
    """Same nodes, same links, and widget values in each node's input order (seed has the extra
    control_after_generate value in the UI file, LoadVideo its upload button's)."""
    with open(os.path.join(ROOT, "workflows", "api", f"{name}_api.json")) as f:
        api = json.load(f)
    with open(os.path.join(ROOT, "workflows", f"{name}.json")) as f:
        ui = json.load(f)
    assert {str(n["id"]): n["type"] for n in ui["nodes"]} == {k: v["class_type"] for k, v in api.items()}
    links = {link[0]: link for link in ui["links"]}
    for node in ui["nodes"]:
        api_inputs = api[str(node["id"])]["inputs"]
        for slot in node["inputs"]:
            if slot["link"] is not None:
                _, origin, origin_slot, target, _, kind = links[slot["link"]]
                assert api_inputs[slot["name"]] == [str(origin), origin_slot] and target == node["id"]
        widgets = [v for k, v in api_inputs.items() if not isinstance(v, list)]
        values = list(node["widgets_values"])
        if node["type"] == "MochiXDiTSampler":
            assert values.pop(1) in ("fixed", "randomize", "increment", "decrement")
        if node["type"] == "LoadVideo":
            assert values.pop(1) == "image"
        assert values == widgets, node["type"]
        if node["type"] in NODE_CLASS_MAPPINGS:
            spec = NODE_CLASS_MAPPINGS[node["type"]].INPUT_TYPES()
            spec = {**spec["required"], **spec.get("optional", {})}  # the UI's widget order: required, then optional
            order = [name for name, (kind, _) in spec.items() if isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING")]
            assert [k for k, v in api_inputs.items() if not isinstance(v, list)] == order
    assert ui["last_link_id"] == len(ui["links"]) and ui["version"] == 0.4


def test_api_workflow_chain_matches_single_process_pipeline(comfy_env):
    prompt = small_workflow()
    outputs = run_api_workflow(prompt)
    latent = outputs["6"][0]["samples"]
    images = outputs["7"][0]
    assert outputs["8"][0]["images"] is images

    # the oracle: one process, same files, same request
    folders = comfy_env.folders
    request = oracle_request(prompt)
    expected_latent = generate(load_dit(str(folders["diffusion_models"] / "demo_dit.safetensors"), "fp32"), request)
    from mochi_xdit.nodes.decode import tile_spec

    vae = load_vae_decoder(str(folders["vae"] / "demo_vae.safetensors"), "fp32")
    tiles = tile_spec("manual", 32, 8, 1, (1, 12, 2, 4, 6))  # 4x4 latent tiles, overlap 1, 1 frame per chunk
    assert len(plan_tiles((1, 12, 2, 4, 6), tiles)) == 2  # the two ranks decode one tile each
    expected_images = decode_frames(vae, expected_latent, tiles)  # [7, 32, 48, 3]

    assert latent.shape == (1, 12, 2, 4, 6)
    assert (latent - expected_latent).abs().max().item() <= TOLERANCE
    assert images.shape == (7, 32, 48, 3) and images.dtype == torch.float32
    assert 0.0 <= images.min().item() and images.max().item() <= 1.0
    assert (images - expected_images).abs().max().item() <= TOLERANCE
    assert [value for value, _ in comfy_env.utils.updates[-3:]] == [1, 2, 3]


def test_cancel_during_sampling_stops_the_pool_and_the_next_run_works(comfy_env):
    prompt = small_workflow()
    prompt["6"]["inputs"]["steps"] = 6
    comfy_env.management.interrupt_at = 2
    with pytest.raises(InterruptProcessingException):
        run_api_workflow(prompt)
    comfy_env.management.interrupt_at = None
    assert comfy_env.utils.updates[-1] == (2, 6)
    outputs = run_api_workflow(small_workflow())  # same pool, reused
    assert outputs["7"][0].shape == (7, 32, 48, 3)


def test_rank_killed_mid_run_gives_an_error_naming_the_rank_and_the_next_run_rebuilds(comfy_env):
    import signal
    import time

    from mochi_xdit.workers.service import default_service

    acquire_pool = default_service().pool

    prompt = small_workflow()
    prompt["6"]["inputs"]["steps"] = 6
    handle = run_api_workflow({"5": prompt["5"]})["5"][0]
    pool = acquire_pool(handle.spec)
    victim = pool.ranks[1].pid
    bar = comfy_env.utils.ProgressBar
    real_update = bar.update_absolute

    def update_then_kill(self, value, total=None, preview=None):
        real_update(self, value, total, preview)
        if value == 2:
            os.kill(victim, signal.SIGKILL)

    bar.update_absolute = update_then_kill
    started = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match=r"Mochi xDiT pool: rank 1 failed in step\(\).*died"):
            run_api_workflow(prompt)
    finally:
        bar.update_absolute = real_update
    assert time.monotonic() - started < 15.0
    assert pool.dead
    outputs = run_api_workflow(small_workflow())  # the cached loader handle still works: a fresh pool
    assert outputs["7"][0].shape == (7, 32, 48, 3)
    assert acquire_pool(handle.spec) is not pool


def test_comfyui_freeing_memory_stops_the_pool_and_the_next_prompt_restores_it(comfy_env):
    import psutil

    from mochi_xdit.nodes.comfy_hooks import install_free_memory_hook
    from mochi_xdit.workers.service import default_service

    assert install_free_memory_hook() and install_free_memory_hook()  # idempotent: wrapped once
    first = run_api_workflow(small_workflow())["6"][0]["samples"]
    pool = default_service().current
    pids = [info.pid for info in pool.ranks]
    comfy_env.management.unload_all_models()  # the user pressed "Unload Models"
    assert comfy_env.management.unloaded == 1  # ComfyUI's own unload still ran
    assert pool.dead and default_service().current is None
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie" for pid in pids)
    again = run_api_workflow(small_workflow())["6"][0]["samples"]  # the cached handle rebuilds the pool
    assert default_service().current is not None and torch.equal(first, again)


def test_lora_and_step_cache_through_the_chain_equal_one_process_and_leave_the_next_prompt_plain(comfy_env):
    """LoRA loader between loader and sampler, first-block cache on: the 2-rank latent equals the single-process
    loop with the same LoRA and cache; the next prompt without the LoRA node runs the base model."""
    from mochi_xdit.mochi.lora import LoraSwitch
    from mochi_xdit.mochi.lora_files import LoraSpec
    from mochi_xdit.mochi.sampler import DenoiseLoop
    from mochi_xdit.mochi.step_cache import StepCacheKind, StepCacheSpec

    prompt = small_workflow()
    prompt["6"]["inputs"]["steps"] = 6
    prompt["10"] = {"class_type": "MochiXDiTLoraLoader",
                    "inputs": {"pool": ["5", 0], "lora_name": "demo_lora.safetensors", "strength": 0.7}}
    prompt["6"]["inputs"].update(pool=["10", 0], cache="first_block", cache_threshold=0.9)
    latent = run_api_workflow(prompt)["6"][0]["samples"]

    folders = comfy_env.folders
    request = oracle_request(prompt, cache=StepCacheSpec(StepCacheKind.FIRST_BLOCK, 0.9))
    dit = load_dit(str(folders["diffusion_models"] / "demo_dit.safetensors"), "fp32")
    LoraSwitch(dit, torch.float32).set((LoraSpec(str(folders["loras"] / "demo_lora.safetensors"), 0.7),))
    loop = DenoiseLoop(dit, request)
    loop.begin()
    for i in range(loop.num_steps):
        loop.step(i)
    assert loop.cache_stats.skipped, "the threshold should let the cache skip a step"
    assert (latent - loop.finish()).abs().max().item() <= TOLERANCE

    plain = small_workflow()
    plain["6"]["inputs"]["steps"] = 6
    base = generate(load_dit(str(folders["diffusion_models"] / "demo_dit.safetensors"), "fp32"),
                    replace(request, cache=None))
    assert (run_api_workflow(plain)["6"][0]["samples"] - base).abs().max().item() <= TOLERANCE
