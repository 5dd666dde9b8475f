"""The pack's queue-time checks and run paths, against a real ComfyUI server (not CI: ComfyUI is not
on PyPI). Run with the harness venv's python (ray, safetensors, einops, av installed there):

    /tmp/comfy/venv/bin/python tools/comfy_server_check.py [--port 8197] [--keep-going]

It writes tiny model files into ComfyUI's models folders (the demo DiT and VAE, a genmo-format
Mochi LoRA, a Flux LoRA, a CLIP-L-looking file in diffusion_models), links this folder as
custom_nodes/ComfyUI-Mochi-xDiT (a name that is not `mochi_xdit`), starts a server through the
comfy harness (`run_workflow.py --start-only --pack harness_nodes --server-arg '--preview-method
latent2rgb'`), and POSTs API-format prompts made from workflows/api/mochi_xdit_text_to_video_api.json
(CLIPLoader/CLIPTextEncode replaced by the harness's E2EFakeT5Cond: T5-shaped conditioning, 7 valid
tokens positive, 0 negative; 64x48 px, 7 frames, 3 steps, world_size 2). Every case records the HTTP
status, node_errors (errors counted per node), the final status, the execution error and the wall
time; a table is printed at the end, with the server log's "Mochi xDiT:" lines. Exit status 1 when
any outcome is not the expected one. The server it started is always stopped (its process group).
"""

import argparse
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parents[1]
PACK_LINK_NAME = "ComfyUI-Mochi-xDiT"
COMFY_ROOT = Path(os.environ.get("COMFY_ROOT", "/tmp/comfy"))
COMFY_DIR = Path(os.environ.get("COMFY_DIR", COMFY_ROOT / "ComfyUI"))
HARNESS_DIR = Path(os.environ.get("COMFY_HARNESS", "/work/shared/tools/comfy_harness"))
WORKFLOW = PACK_DIR / "workflows" / "api" / "mochi_xdit_text_to_video_api.json"

DIT_NAME, VAE_NAME = "mochi_xdit_demo_dit.safetensors", "mochi_xdit_demo_vae.safetensors"
MOCHI_LORA, FLUX_LORA, CLIP_L = "mochi_demo_lora.safetensors", "flux_lora.safetensors", "clip_l.safetensors"
GGUF_DIT = "mochi_xdit_demo_dit_Q8_0.gguf"  # ComfyUI does not list .gguf in diffusion_models; the loader does
LOADER, POSITIVE, NEGATIVE, LATENT, SAMPLER, SAVE, LORA_NODE = "5", "2", "3", "4", "6", "9", "10"
PROMPT_TIMEOUT_S = 600
INTERRUPT_AT_STEP = 3  # case n: POST /interrupt once the sampler reports this step (websocket progress)


# --- model files ------------------------------------------------------------------------------------

def import_pack():
    """This folder as the package `mochi_xdit` (as the pack's own __init__ does inside ComfyUI)."""
    if "mochi_xdit" not in sys.modules:
        spec = importlib.util.spec_from_file_location("mochi_xdit", PACK_DIR / "__init__.py",
                                                      submodule_search_locations=[str(PACK_DIR)])
        package = importlib.util.module_from_spec(spec)
        sys.modules["mochi_xdit"] = package
        spec.loader.exec_module(package)


def write_gguf_dit(path: Path, state: dict, linears: set[str]) -> None:
    """The DiT as city96's converter writes one: the checkpoint's own names, Linear weights Q8_0."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "mochi")
    for name, tensor in state.items():
        data = tensor.float().numpy()
        if name.removesuffix(".weight") in linears and data.shape[-1] % 32 == 0:
            writer.add_tensor(name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_models(models: Path) -> None:
    import torch
    from safetensors.torch import save_file

    import_pack()
    from mochi_xdit.mochi.demo import DEMO_DIT_CONFIG, DEMO_VAE_CONFIG, random_dit_state_dict, random_vae_state_dict
    from mochi_xdit.mochi.lora_files import linear_shapes_for

    for folder in ("diffusion_models", "vae", "loras"):
        (models / folder).mkdir(parents=True, exist_ok=True)
    save_file(random_dit_state_dict(DEMO_DIT_CONFIG, seed=0), str(models / "diffusion_models" / DIT_NAME))
    write_gguf_dit(models / "diffusion_models" / GGUF_DIT, random_dit_state_dict(DEMO_DIT_CONFIG, seed=0),
                  set(linear_shapes_for(DEMO_DIT_CONFIG)))
    vae = {f"decoder.{k}": v for k, v in random_vae_state_dict(DEMO_VAE_CONFIG, seed=1).items()}
    save_file(vae, str(models / "vae" / VAE_NAME))

    generator, rank = torch.Generator().manual_seed(3), 2  # genmo trainer layout, as tests/test_workflow_chain.py
    lora = {}
    for module, (out_features, in_features) in linear_shapes_for(DEMO_DIT_CONFIG).items():
        if module.endswith(("attn.qkv_x", "attn.proj_x")):
            lora[f"{module}.lora_A"] = torch.randn(rank, in_features, generator=generator) / in_features**0.5
            lora[f"{module}.lora_B"] = 0.3 * torch.randn(out_features, rank, generator=generator) / rank**0.5
    save_file(lora, str(models / "loras" / MOCHI_LORA),
              metadata={"kwargs": json.dumps({"qkv_proj_lora_rank": rank, "qkv_proj_lora_alpha": 4,
                                              "out_proj_lora_rank": rank, "out_proj_lora_alpha": 4})})

    flux = {}
    for module in ("lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_0_img_attn_proj",
                   "lora_unet_single_blocks_0_linear1"):
        flux[f"{module}.lora_down.weight"] = torch.randn(4, 64, generator=generator)
        flux[f"{module}.lora_up.weight"] = torch.zeros(192, 4)
        flux[f"{module}.alpha"] = torch.tensor(4.0)
    save_file(flux, str(models / "loras" / FLUX_LORA))

    width = 768  # CLIP-L's width, read by the pack from final_layer_norm; two layers, tiny vocabulary
    clip = {"text_model.embeddings.token_embedding.weight": torch.zeros(16, width, dtype=torch.float16),
            "text_model.embeddings.position_embedding.weight": torch.zeros(77, width, dtype=torch.float16),
            "text_model.final_layer_norm.weight": torch.ones(width, dtype=torch.float16),
            "text_model.final_layer_norm.bias": torch.zeros(width, dtype=torch.float16)}
    for layer in range(2):
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            clip[f"text_model.encoder.layers.{layer}.self_attn.{proj}.weight"] = torch.zeros(width, width, dtype=torch.float16)
            clip[f"text_model.encoder.layers.{layer}.self_attn.{proj}.bias"] = torch.zeros(width, dtype=torch.float16)
    save_file(clip, str(models / "diffusion_models" / CLIP_L))


# --- server -----------------------------------------------------------------------------------------

def link_pack() -> Path:
    """custom_nodes/ComfyUI-Mochi-xDiT -> this folder; a link to this folder under another name is
    removed (the harness names links by the target's basename, which would load the pack twice)."""
    custom = COMFY_DIR / "custom_nodes"
    for entry in custom.iterdir():
        if entry.is_symlink() and entry.name != PACK_LINK_NAME and entry.resolve() == PACK_DIR:
            entry.unlink()
    link = custom / PACK_LINK_NAME
    if link.is_symlink():
        link.unlink()
    elif link.exists():
        raise SystemExit(f"{link} exists and is not a link; move it away")
    link.symlink_to(PACK_DIR)
    return link


def start_server(port: int, python: str) -> int:
    cmd = [python, str(HARNESS_DIR / "run_workflow.py"), "--start-only", "--port", str(port),
           "--pack", str(HARNESS_DIR / "harness_nodes"), "--server-arg=--preview-method latent2rgb"]
    print("$", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, COMFY_ROOT=str(COMFY_ROOT),
                                                                         COMFY_DIR=str(COMFY_DIR)))
    print(done.stdout.strip(), done.stderr.strip(), sep="\n", flush=True)
    found = re.search(r"running: pid (\d+)", done.stdout)
    if done.returncode != 0 or not found:
        raise SystemExit(f"the harness could not start the server (exit {done.returncode})")
    return int(found.group(1))


def stop_server(pid: int) -> None:
    for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait_s
        while time.time() < deadline:
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.3)


def pack_import_problem(log_path: Path) -> str | None:
    text = log_path.read_text(errors="replace")
    link = str(COMFY_DIR / "custom_nodes" / PACK_LINK_NAME)
    if f"Cannot import {link}" in text or re.search(r"IMPORT FAILED\): " + re.escape(link), text):
        return text[-4000:]
    return None


# --- prompts ----------------------------------------------------------------------------------------

def base_prompt(seed: int) -> dict:
    """The bundled API workflow at test size, text encoding replaced by E2EFakeT5Cond."""
    prompt = json.loads(WORKFLOW.read_text())
    for node in prompt.values():
        node.pop("_meta", None)
    del prompt["1"]
    prompt[POSITIVE] = {"class_type": "E2EFakeT5Cond", "inputs": {"seed": 1, "tokens": 7}}
    prompt[NEGATIVE] = {"class_type": "E2EFakeT5Cond", "inputs": {"seed": 2, "tokens": 0}}  # empty prompt: 0 tokens
    prompt[LATENT]["inputs"].update(width=64, height=48, length=7)
    prompt[LOADER]["inputs"].update(dit_name=DIT_NAME, vae_name=VAE_NAME, weight_dtype="auto", world_size=2,
                                    ulysses_degree=0, ring_degree=0, cfg_degree=0, ray_address="",
                                    attention_backend="auto")
    prompt[SAMPLER]["inputs"].update(seed=seed, steps=3, cfg=4.5, sampler_name="euler", scheduler="simple",
                                     cache="off")
    prompt[SAVE]["inputs"]["filename_prefix"] = "video/server_check"
    return prompt


def with_lora(prompt: dict, lora_name: str) -> dict:
    prompt[LORA_NODE] = {"class_type": "MochiXDiTLoraLoader",
                         "inputs": {"pool": [LOADER, 0], "lora_name": lora_name, "strength": 1.0}}
    prompt[SAMPLER]["inputs"]["pool"] = [LORA_NODE, 0]
    return prompt


def http(base: str, method: str, path: str, body=None, timeout=30) -> tuple[int, object]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    try:
        return status, json.loads(raw) if raw else None
    except json.JSONDecodeError:
        return status, raw.decode(errors="replace")


class Outcome:
    """What one POST /prompt came to."""

    def __init__(self):
        self.http, self.node_errors, self.status, self.error, self.wall_s = None, {}, None, "", 0.0
        self.messages, self.outputs, self.prompt_id = [], {}, None
        self.last_step = self.interrupted_at = None  # (value, max) of the sampler's progress (case n)

    def error_texts(self, node: str | None = None) -> list[str]:
        return [f"{e.get('message', '')} {e.get('details', '')}"
                for nid, entry in self.node_errors.items() if node in (None, nid) for e in entry.get("errors", [])]

    def counts(self) -> str:
        return ",".join(f"{nid}:{len(e.get('errors', []))}" for nid, e in self.node_errors.items()) or "-"


def queue(base: str, prompt: dict | None, prompt_id: str | None = None) -> Outcome:
    """POST /prompt (or take an already queued `prompt_id`), then poll /history until it is over."""
    outcome, started = Outcome(), time.perf_counter()
    if prompt_id is not None:
        outcome.http, answer = 200, {"prompt_id": prompt_id}
    else:
        outcome.http, answer = http(base, "POST", "/prompt", {"prompt": prompt, "client_id": "server-check"})
    if outcome.http != 200:
        if isinstance(answer, dict):
            outcome.node_errors = answer.get("node_errors") or {}
            error = answer.get("error") or {}
            outcome.error = f"{error.get('message', '')} {error.get('details', '')}".strip() if isinstance(error, dict) else str(error)
        else:
            outcome.error = str(answer)[:300]
        outcome.wall_s = time.perf_counter() - started
        return outcome
    outcome.prompt_id = prompt_id = answer["prompt_id"]
    while time.perf_counter() - started < PROMPT_TIMEOUT_S:
        _, history = http(base, "GET", f"/history/{prompt_id}")
        if isinstance(history, dict) and prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
            entry = history[prompt_id]
            status = entry.get("status", {})
            if status.get("status_str") in ("success", "error"):
                outcome.status, outcome.messages = status["status_str"], status.get("messages", [])
                outcome.outputs = entry.get("outputs", {})
                for kind, data in outcome.messages:
                    if kind == "execution_error":
                        outcome.error = f"{data.get('exception_type')}: {data.get('exception_message', '').strip()}"
                    elif kind == "execution_interrupted":
                        outcome.status = "interrupted"
                break
        time.sleep(0.3)
    else:
        outcome.status = "timeout"
    outcome.wall_s = time.perf_counter() - started
    return outcome


async def _interrupt_when(base: str, prompt: dict, at_step: int, outcome: Outcome) -> None:
    """POST the prompt with a websocket open; POST /interrupt when its progress reaches `at_step`;
    return once the server says the prompt is over (`executing` with node None)."""
    import aiohttp

    client_id = f"server-check-{os.getpid()}"
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{base.replace('http', 'ws', 1)}/ws?clientId={client_id}") as ws:
            async with session.post(f"{base}/prompt", json={"prompt": prompt, "client_id": client_id}) as response:
                outcome.http, answer = response.status, await response.json()
            if outcome.http != 200:
                outcome.node_errors = answer.get("node_errors") or {}
                return
            outcome.prompt_id = answer["prompt_id"]
            while True:
                message = await ws.receive(timeout=PROMPT_TIMEOUT_S)
                if message.type != aiohttp.WSMsgType.TEXT:  # binary: latent previews
                    if message.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                        return
                    continue
                event = json.loads(message.data)
                data = event.get("data") or {}
                if data.get("prompt_id") not in (None, outcome.prompt_id):
                    continue
                if event["type"] == "progress":
                    outcome.last_step = (data.get("value"), data.get("max"))
                    if outcome.interrupted_at is None and data.get("value", 0) >= at_step:
                        outcome.interrupted_at = outcome.last_step
                        async with session.post(f"{base}/interrupt", json={"prompt_id": outcome.prompt_id}) as r:
                            await r.read()
                elif event["type"] == "executing" and data.get("node") is None:
                    return


def queue_and_interrupt(base: str, prompt: dict, at_step: int) -> Outcome:
    """Like `queue`, with POST /interrupt at step `at_step` of the sampler's progress."""
    import asyncio

    outcome, started = Outcome(), time.perf_counter()
    asyncio.run(_interrupt_when(base, prompt, at_step, outcome))
    if outcome.prompt_id is None:
        return outcome
    finished = queue(base, None, prompt_id=outcome.prompt_id)
    finished.last_step, finished.interrupted_at = outcome.last_step, outcome.interrupted_at
    finished.wall_s = time.perf_counter() - started
    return finished


def output_files(outcome: Outcome) -> list[Path]:
    files = []
    for node_output in outcome.outputs.values():
        for items in node_output.values():
            for item in items if isinstance(items, list) else []:
                if isinstance(item, dict) and "filename" in item:
                    files.append(COMFY_DIR / item.get("type", "output") / item.get("subfolder", "") / item["filename"])
    return files


# --- processes ---------------------------------------------------------------------------------------

def descendants(pid: int):
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def rank_workers(pid: int) -> list[str]:
    import psutil

    found = []
    for proc in descendants(pid):
        try:
            if "RankWorker" in " ".join(proc.cmdline()) or "RankWorker" in proc.name():
                found.append(f"{proc.pid} {' '.join(proc.cmdline())[:80]}")
        except psutil.Error:
            pass
    return found


def is_loopback(address: str) -> bool:
    """127.0.0.0/8, ::1, and IPv4-mapped loopback (::ffff:127.0.0.1, what gRPC's dual-stack sockets show)."""
    import ipaddress

    ip = ipaddress.ip_address(address.split("%")[0])
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


def flash_attn_refusal_needle() -> str:
    """What the flash_attn refusal must name here: the CPU ranks (no CUDA), else the install line."""
    import torch

    if not torch.cuda.is_available():
        return "runs on CUDA GPUs only"
    return "pip install flash-attn" if importlib.util.find_spec("flash_attn") is None else "(installed)"


def listeners(pid: int) -> list[tuple[str, int, str, str]]:
    """(address, port, process name, cmdline head) of every TCP listener of the server's process tree."""
    import psutil

    found = []
    for proc in descendants(pid):
        try:
            connections = proc.net_connections(kind="tcp") if hasattr(proc, "net_connections") else proc.connections(kind="tcp")
            for c in connections:
                if c.status == psutil.CONN_LISTEN:
                    found.append((c.laddr.ip, c.laddr.port, proc.name(), " ".join(proc.cmdline())[:60]))
        except psutil.Error:
            pass
    return found


# --- the cases ---------------------------------------------------------------------------------------

class Checker:
    def __init__(self, base: str, log_path: Path, server_pid: int):
        self.base, self.log_path, self.server_pid = base, log_path, server_pid
        self.rows, self.seed = [], 100

    def log_offset(self) -> int:
        return self.log_path.stat().st_size

    def log_since(self, offset: int) -> str:
        with open(self.log_path, errors="replace") as f:
            f.seek(offset)
            return f.read()

    def prompt(self) -> dict:
        self.seed += 1  # a new seed per run: ComfyUI's cache would otherwise skip the sampler
        return base_prompt(self.seed)

    def record(self, case: str, outcome: Outcome | None, expected: bool, note: str) -> None:
        row = {"case": case, "http": outcome.http if outcome else "-",
               "node_errors": outcome.counts() if outcome else "-",
               "status": (outcome.status or "-") if outcome else "-",
               "wall_s": round(outcome.wall_s, 1) if outcome else 0.0, "expected": expected, "note": note}
        self.rows.append(row)
        print(f"[{case}] {'ok ' if expected else 'UNEXPECTED'} http={row['http']} errors={row['node_errors']} "
              f"status={row['status']} {row['wall_s']}s  {note}", flush=True)
        if outcome and not expected:
            print(f"    error: {outcome.error[:400]}\n    node errors: {outcome.error_texts()}", flush=True)

    def good(self, case: str, prompt: dict | None = None, note_extra: str = "") -> Outcome:
        outcome = queue(self.base, prompt or self.prompt())
        files = [f for f in output_files(outcome) if f.is_file() and f.stat().st_size > 0]
        ok = outcome.http == 200 and outcome.status == "success" and bool(files)
        note = (f"video {files[0].name}" if files else f"no video; {outcome.error[:160]}") + note_extra
        self.record(case, outcome, ok, note)
        return outcome

    def refused(self, case: str, prompt: dict, node: str, needle: str | None, exactly_one: bool = False) -> Outcome:
        outcome = queue(self.base, prompt)
        texts = outcome.error_texts(node)
        ok = outcome.http == 400 and bool(texts)
        if needle is not None:
            ok = ok and any(needle.lower() in t.lower() for t in texts)
        if exactly_one:
            ok = ok and len(texts) == 1 and len(outcome.node_errors) == 1
        if outcome.http != 400 and outcome.prompt_id:  # accepted by mistake: do not let it run on
            http(self.base, "POST", "/interrupt", {"prompt_id": outcome.prompt_id})
        first = texts[0].strip() if texts else outcome.error
        self.record(case, outcome, ok, f"node {node}: {len(texts)} error(s): {first[:150]}")
        return outcome

    def run_all(self) -> None:
        # a. the good run starts the pool
        self.good("a good run")
        # b-d, f, j, k: refused at queue time (nothing runs)
        p = self.prompt()
        p[LOADER]["inputs"].update(world_size=4, ulysses_degree=2, ring_degree=1, cfg_degree=1)
        self.refused("b degrees 4=1x2x1", p, LOADER, "world_size", exactly_one=True)
        p = self.prompt()
        p[LOADER]["inputs"].update(world_size=3)
        self.refused("c world_size 3 on 2 CPUs", p, LOADER, "CPU")
        p = self.prompt()
        p[LOADER]["inputs"]["ray_address"] = "ray://head:10001"
        grpc = importlib.util.find_spec("grpc") is not None
        if grpc:
            outcome = queue(self.base, p)
            self.record("d ray:// (grpc importable)", outcome, True, "grpc importable in this venv: not checked")
        else:
            self.refused("d ray://head:10001", p, LOADER, "ray[client]")
        p = self.prompt()
        p[LOADER]["inputs"]["dit_name"] = CLIP_L
        self.refused("f CLIP-L as dit_name", p, LOADER, "CLIP-L text encoder")
        p = self.prompt()
        p[LOADER]["inputs"]["attention_backend"] = "flash_attn"
        needle = flash_attn_refusal_needle()
        if needle == "(installed)":
            self.record("j flash_attn backend", None, True, "flash_attn is installed here: not refused, not checked")
        else:
            self.refused("j flash_attn backend", p, LOADER, needle)
        p = self.prompt()
        p[SAMPLER]["inputs"]["steps"] = 0
        self.refused("k steps 0", p, SAMPLER, "steps")

        # e. an unreachable cluster fails fast and leaves the live pool alone
        p = self.prompt()
        p[LOADER]["inputs"]["ray_address"] = "127.0.0.1:1"
        offset = self.log_offset()
        outcome = queue(self.base, p)
        message = outcome.error
        ok = (outcome.http == 200 and outcome.status == "error" and outcome.wall_s <= 30
              and "127.0.0.1:1" in message and "ray start --head" in message
              and "refused the connection" in message and "within" not in message)  # refused at once
        self.record("e ray_address 127.0.0.1:1", outcome, ok, message[:200])
        outcome = queue(self.base, self.prompt())
        lines = [line for line in self.log_since(offset).splitlines() if "Mochi xDiT:" in line]
        reused = any("reusing the live pool" in line for line in lines)
        restarted = any("Mochi xDiT: starting" in line for line in lines)
        files = [f for f in output_files(outcome) if f.is_file()]
        self.record("e' good run after it", outcome, outcome.status == "success" and bool(files) and not restarted,
                    f"reused={reused} new start={restarted}")

        # m. every listener of the server's process tree is on loopback while the pool is alive
        sockets = listeners(self.server_pid)
        public = [s for s in sockets if not is_loopback(s[0])]
        self.record("m listeners loopback", None, bool(sockets) and not public,
                    f"{len(sockets)} listeners (" + ", ".join(
                        f"{name} {sum(s[2] == name for s in sockets)}" for name in sorted({s[2] for s in sockets}))
                    + "); not loopback: " + (
                        "; ".join(f"{ip}:{port} {name} [{cmd}]" for ip, port, name, cmd in public) or "none"))

        # g. LoRA loader
        self.refused("g Flux LoRA", with_lora(self.prompt(), FLUX_LORA), LORA_NODE, "Flux")
        self.good("g Mochi LoRA", with_lora(self.prompt(), MOCHI_LORA))

        # h. ComfyUI-side sampler path
        p = self.prompt()
        p[SAMPLER]["inputs"].update(sampler_name="dpmpp_2m_sde", scheduler="karras")
        self.good("h dpmpp_2m_sde/karras", p)
        p = self.prompt()
        p[SAMPLER]["inputs"].update(sampler_name="dpmpp_2m_sde", scheduler="karras", cache="teacache")
        self.refused("h ... + teacache", p, SAMPLER, "cache")

        # o. prompts saved before the sampler's widgets became KSampler's: `schedule` still runs,
        # a bad one is refused naming it; the LoRA strength has the same limit as the CLI's
        p = self.prompt()
        for name in ("sampler_name", "scheduler"):
            p[SAMPLER]["inputs"].pop(name, None)
        p[SAMPLER]["inputs"]["schedule"] = "simple"
        self.good("o old prompt with schedule", p)
        p = self.prompt()
        p[SAMPLER]["inputs"].pop("scheduler", None)
        p[SAMPLER]["inputs"]["schedule"] = "karras"
        self.refused("o' schedule karras", p, SAMPLER, "schedule='karras'")
        p = with_lora(self.prompt(), MOCHI_LORA)
        p[LORA_NODE]["inputs"]["strength"] = 100.0
        self.refused("o'' LoRA strength 100", p, LORA_NODE, "strength=100.0 is outside")

        # i. first-block step cache on the on-rank path
        p = self.prompt()
        p[SAMPLER]["inputs"].update(cache="first_block", cache_threshold=0.9, steps=6)  # first/last always compute
        offset = self.log_offset()
        outcome = self.good("i first_block cache", p)
        cache_lines = [line.strip() for line in self.log_since(offset).splitlines() if "step cache (first_block" in line]
        if not cache_lines:
            self.rows[-1]["expected"] = False
        self.rows[-1]["note"] += "; " + (cache_lines[0][-90:] if cache_lines else "NO 'step cache (first_block' line")

        # n. interrupt a long run, then a good run
        p = self.prompt()
        p[SAMPLER]["inputs"]["steps"] = 60
        outcome = queue_and_interrupt(self.base, p, INTERRUPT_AT_STEP)
        self.record(f"n interrupt at step {INTERRUPT_AT_STEP}/60", outcome, outcome.status == "interrupted",
                    f"interrupt sent at progress {outcome.interrupted_at}, last progress {outcome.last_step}"
                    + (f"; {outcome.error[:100]}" if outcome.error else ""))
        self.good("n' good run after it")

        # q. weights sharded over the two ranks (a new pool); compile on with sharded weights is refused
        p = self.prompt()
        p[LOADER]["inputs"]["weights"] = "sharded"
        offset = self.log_offset()
        self.good("q weights sharded", p)
        sharded = [line.strip() for line in self.log_since(offset).splitlines() if "fp32 weights, sharded" in line]
        if not sharded:
            self.rows[-1]["expected"] = False
        self.rows[-1]["note"] += "; " + (sharded[0][-80:] if sharded else "NO 'fp32 weights, sharded' line")
        p = self.prompt()
        p[LOADER]["inputs"].update(weights="sharded", compile="on")
        self.refused("q' compile on + sharded", p, LOADER, "compile=on needs the DiT's weights on every rank")

        # r. a GGUF DiT (listed by the loader, Linear weights kept quantised); fp8 with it is refused
        p = self.prompt()
        p[LOADER]["inputs"]["dit_name"] = GGUF_DIT
        self.good("r GGUF Q8_0 DiT", p)
        p[LOADER]["inputs"]["weight_dtype"] = "fp8"
        self.refused("r' GGUF DiT with fp8", p, LOADER, "already quantised")

        # l. POST /free stops the pool; the next run starts a new one
        offset = self.log_offset()
        status, _ = http(self.base, "POST", "/free", {"unload_models": True, "free_memory": True})
        deadline, stopped, workers = time.time() + 40, False, []
        while time.time() < deadline:
            stopped = "pool stopped" in self.log_since(offset)
            workers = rank_workers(self.server_pid)
            if stopped and not workers:
                break
            time.sleep(0.5)
        self.record("l POST /free", None, status == 200 and stopped and not workers,
                    f"http {status}; log 'pool stopped': {stopped}; RankWorker processes: {workers or 'none'}")
        offset = self.log_offset()
        self.good("l' good run after /free")
        started = any("Mochi xDiT: starting" in line for line in self.log_since(offset).splitlines())
        if not started:
            self.rows[-1]["expected"] = False
        self.rows[-1]["note"] += f"; new pool start: {started}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8197)
    parser.add_argument("--python", default=str(COMFY_ROOT / "venv" / "bin" / "python"))
    parser.add_argument("--json-out", default=None, help="write the table as JSON here")
    args = parser.parse_args()
    begun = time.perf_counter()
    base, log_path = f"http://127.0.0.1:{args.port}", COMFY_ROOT / f"server_{args.port}.log"

    write_models(COMFY_DIR / "models")
    print(f"linked {link_pack()} -> {PACK_DIR}", flush=True)
    pid = start_server(args.port, args.python)
    checker = Checker(base, log_path, pid)
    try:
        problem = pack_import_problem(log_path)
        if problem:
            print("the pack failed to import:\n" + problem)
            return 3
        checker.run_all()
    except Exception as error:  # report what ran so far; the server is stopped below
        import traceback

        traceback.print_exc()
        checker.rows.append({"case": "script", "http": "-", "node_errors": "-", "status": "crashed", "wall_s": 0.0,
                             "expected": False, "note": f"{type(error).__name__}: {error}"[:200]})
    finally:
        stop_server(pid)

    print("\nMochi xDiT: lines of the server log:")
    for line in log_path.read_text(errors="replace").splitlines():
        if "Mochi xDiT:" in line:
            print("  " + line.strip()[:220])
    print(f"\n{'case':<32} {'http':>4} {'node_errors':<11} {'status':<11} {'wall s':>6}  ok  note")
    for row in checker.rows:
        print(f"{row['case']:<32} {row['http']!s:>4} {row['node_errors']:<11} {row['status']:<11} "
              f"{row['wall_s']:>6}  {'yes' if row['expected'] else 'NO '} {row['note'][:150]}")
    bad = [row["case"] for row in checker.rows if not row["expected"]]
    print(f"\ntotal {time.perf_counter() - begun:.0f} s; unexpected: {', '.join(bad) or 'none'}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(checker.rows, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
