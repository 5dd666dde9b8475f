"""The bundled video-to-video workflow against a real ComfyUI server: one good run and the bad
inputs MochiTiledVAEEncode must refuse with one clear message. Not CI (ComfyUI is not on PyPI);
run with the harness venv's python:

    COMFY_ROOT=/tmp/comfy_i22 COMFY_DIR=/tmp/comfy_i22/ComfyUI COMFY_VENV=/tmp/comfy/venv \\
        /tmp/comfy/venv/bin/python tools/comfy_v2v_check.py [--port 8122]

It reuses tools/comfy_server_check.py (model files, pack link, server start/stop, POST /prompt and
/history polling). Extra files: a demo VAE with an encoder half (`encoder.` + `decoder.`, as
ComfyUI's mochi_vae.safetensors), a decoder-only VAE, and a 9-frame 80x64 mp4 in ComfyUI/input/
(PyAV). Prompts come from workflows/api/mochi_xdit_video_to_video_api.json with the text encoding
replaced by the harness's E2EFakeT5Cond, ImageFromBatch length 7, ImageScale 64x48, 3 steps
(the first run with cfg_schedule "4.5*2,1"), world_size 2. Exit status 1 when any outcome is not the expected one.

If the harness venv has no Ray, give it the main environment's (same Python) without shadowing its
torch: a folder of links to ray, msgpack, jsonschema (+ referencing, rpds, jsonschema_specifications)
and google (protobuf) with their dist-info, put on PYTHONPATH (2026-12-02: 8 of 8 cases as expected,
57 s).
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import comfy_server_check as server  # noqa: E402

WORKFLOW = server.PACK_DIR / "workflows" / "api" / "mochi_xdit_video_to_video_api.json"
VAE_WITH_ENCODER, DECODER_ONLY = "mochi_xdit_demo_vae_with_encoder.safetensors", "mochi_xdit_decoder_only.safetensors"
INPUT_VIDEO = "mochi_xdit_v2v_input.mp4"
LOADER, POSITIVE, NEGATIVE, FRAMES, SCALE, ENCODE, SAMPLER, SAVE = "5", "2", "3", "12", "13", "14", "6", "9"


def write_files() -> None:
    import av
    import numpy
    from safetensors.torch import save_file

    server.write_models(server.COMFY_DIR / "models")  # the demo DiT (and the other files the main check uses)
    from mochi_xdit.mochi.demo import (DEMO_VAE_CONFIG, DEMO_VAE_ENCODER_CONFIG, random_vae_encoder_state_dict,
                                       random_vae_state_dict)

    decoder = {f"decoder.{k}": v for k, v in random_vae_state_dict(DEMO_VAE_CONFIG, seed=1).items()}
    encoder = {f"encoder.{k}": v for k, v in random_vae_encoder_state_dict(DEMO_VAE_ENCODER_CONFIG, seed=1).items()}
    save_file({**decoder, **encoder}, str(server.COMFY_DIR / "models" / "vae" / VAE_WITH_ENCODER))
    save_file(decoder, str(server.COMFY_DIR / "models" / "vae" / DECODER_ONLY))
    (server.COMFY_DIR / "input").mkdir(exist_ok=True)
    with av.open(str(server.COMFY_DIR / "input" / INPUT_VIDEO), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = 80, 64, "yuv420p"
        for i in range(9):
            x = numpy.linspace(0, 255, 80)[None, :, None] + 10 * i
            y = numpy.linspace(0, 255, 64)[:, None, None]
            image = (numpy.concatenate([x + 0 * y, y + 0 * x, (x + y) / 2], axis=2) % 256).astype(numpy.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def base_prompt(seed: int) -> dict:
    prompt = json.loads(WORKFLOW.read_text())
    for node in prompt.values():
        node.pop("_meta", None)
    del prompt["1"]
    prompt[POSITIVE] = {"class_type": "E2EFakeT5Cond", "inputs": {"seed": 1, "tokens": 7}}
    prompt[NEGATIVE] = {"class_type": "E2EFakeT5Cond", "inputs": {"seed": 2, "tokens": 0}}
    prompt["10"]["inputs"]["file"] = INPUT_VIDEO
    prompt[FRAMES]["inputs"]["length"] = 7
    prompt[SCALE]["inputs"].update(width=64, height=48)
    prompt[ENCODE]["inputs"].update(tiling="manual", tile_size=32, tile_overlap=8)
    prompt[LOADER]["inputs"].update(dit_name=server.DIT_NAME, vae_name=VAE_WITH_ENCODER, world_size=2)
    prompt[SAMPLER]["inputs"].update(seed=seed, steps=3)
    prompt[SAVE]["inputs"]["filename_prefix"] = "video/v2v_check"
    return prompt


class Checker(server.Checker):
    def prompt(self) -> dict:
        self.seed += 1
        return base_prompt(self.seed)

    def fails(self, case: str, prompt: dict, needle: str) -> None:
        """Accepted at queue time (the problem is only known from the frames), then one execution
        error on the encode node carrying `needle`."""
        outcome = server.queue(self.base, prompt)
        ok = outcome.http == 200 and outcome.status == "error" and needle in outcome.error
        self.record(case, outcome, ok, outcome.error[:220])

    def run_all(self) -> None:
        p = self.prompt()
        p[SAMPLER]["inputs"]["cfg_schedule"] = "4.5*2,1"  # genmo's cfg schedule: the last step unguided
        self.good("a video to video, denoise 0.6", p)
        p = self.prompt()
        p[FRAMES]["inputs"]["length"] = 8
        self.fails("b 8 frames", p, "pixels has 8 frames; Mochi encodes 6k + 1 frames: use 7 or 13 frames")
        p = self.prompt()
        p[SCALE]["inputs"]["width"] = 72
        self.fails("c width 72", p, "width 72 is not a multiple of 16; resize or crop to 64 or 80")
        p = self.prompt()
        p[LOADER]["inputs"]["vae_name"] = DECODER_ONLY
        self.fails("d decoder-only VAE", p, "it has no encoder, so it cannot encode video")
        p = self.prompt()
        p["15"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 64, "height": 48}}
        p["16"] = {"class_type": "JoinImageWithAlpha", "inputs": {"image": [SCALE, 0], "alpha": ["15", 0]}}
        p[ENCODE]["inputs"]["pixels"] = ["16", 0]
        self.fails("e RGBA frames", p, "pixels has 4 channels per pixel; the Mochi VAE encodes RGB (3)")
        p = self.prompt()
        p[ENCODE]["inputs"].update(tile_size=64, tile_overlap=40)
        self.refused("f tile_overlap > half", p, ENCODE, "at most half of tile_size", exactly_one=True)
        p = self.prompt()
        p[SAMPLER]["inputs"]["cfg_schedule"] = "4.5*5"
        self.refused("h cfg_schedule for 5 of 3 steps", p, SAMPLER, "covers 5 steps but steps=3", exactly_one=True)
        self.good("g good run after the failures (pool reused)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8122)
    parser.add_argument("--python", default=str(server.COMFY_ROOT / "venv" / "bin" / "python"))
    args = parser.parse_args()
    begun = time.perf_counter()
    base, log_path = f"http://127.0.0.1:{args.port}", server.COMFY_ROOT / f"server_{args.port}.log"
    write_files()
    print(f"linked {server.link_pack()} -> {server.PACK_DIR}", flush=True)
    pid = server.start_server(args.port, args.python)
    checker = Checker(base, log_path, pid)
    try:
        problem = server.pack_import_problem(log_path)
        if problem:
            print("the pack failed to import:\n" + problem)
            return 3
        checker.run_all()
    finally:
        server.stop_server(pid)
    print(f"\n{'case':<40} {'http':>4} {'status':<8} {'wall s':>6}  ok  note")
    for row in checker.rows:
        print(f"{row['case']:<40} {row['http']!s:>4} {row['status']:<8} {row['wall_s']:>6}  "
              f"{'yes' if row['expected'] else 'NO '} {row['note'][:150]}")
    bad = [row["case"] for row in checker.rows if not row["expected"]]
    print(f"\ntotal {time.perf_counter() - begun:.0f} s; unexpected: {', '.join(bad) or 'none'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
