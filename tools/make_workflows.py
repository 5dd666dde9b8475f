"""Writes the bundled workflows from one graph description, so the UI-format file (what ComfyUI's
front-end loads from the templates list or by drag-in) and its API-format twin (what
`POST /prompt` takes) cannot drift apart.

    python tools/make_workflows.py    # rewrites workflows/NAME.json (UI) and workflows/api/NAME_api.json

Text to video is ComfyUI's own Mochi text-to-video template with three nodes swapped:
UNETLoader + VAELoader -> MochiXDiTLoader, KSampler -> MochiXDiTSampler, VAEDecode ->
MochiTiledVAEDecode. Video to video replaces its empty latent with LoadVideo ->
GetVideoComponents -> ImageFromBatch (the first 37 = 6k + 1 frames) -> ImageScale (848x480,
centre crop) -> MochiTiledVAEEncode, and samples with denoise 0.6. Widget values follow each node's input order (core nodes as in ComfyUI
0.3.64; the pack's nodes from their declarations in `workers/option_table.py`, so the order and
the defaults cannot drift); an INT with `control_after_generate` (the seed) has one extra UI-only
widget value. Run with the package importable (installed, or PYTHONPATH holding `mochi_xdit`).
"""

import json
import os
import uuid

from mochi_xdit.workers.option_table import Door, widget_order

HERE = os.path.dirname(os.path.abspath(__file__))
WORKFLOWS = os.path.join(os.path.dirname(HERE), "workflows")
NAME = "mochi_xdit_text_to_video"
V2V_NAME = "mochi_xdit_video_to_video"
PROMPT = (
    "A red fox trots through fresh snow in a quiet birch forest at dawn, soft golden light, "
    "breath visible in the cold air, cinematic, shallow depth of field."
)


def pack_widgets(door: Door, **values) -> list[tuple]:
    """(widget name, value) of one of the pack's nodes, in its widget order; `values` overrides a
    declared default (None as the name: the seed's UI-only control widget)."""
    widgets = []
    for entry in widget_order(door):
        widgets.append((entry.name, values.pop(entry.name, entry.default)))
        if entry.seed_widget:
            widgets.append((None, "fixed"))
    if values:
        raise ValueError(f"not widgets of {door}: {sorted(values)}")
    return widgets


# (id, class, title, [(widget name, value)], [(input name, type, (source id, slot))], [(output name, type)],
#  position, size)
NODES = [
    (1, "CLIPLoader", "Load T5-XXL (type mochi)",
     [("clip_name", "t5xxl_fp16.safetensors"), ("type", "mochi"), ("device", "default")],
     [], [("CLIP", "CLIP")], (40, 120), (320, 106)),
    (2, "CLIPTextEncode", "Positive prompt", [("text", PROMPT)],
     [("clip", "CLIP", (1, 0))], [("CONDITIONING", "CONDITIONING")], (400, 40), (420, 180)),
    (3, "CLIPTextEncode", "Negative prompt (empty)", [("text", "")],
     [("clip", "CLIP", (1, 0))], [("CONDITIONING", "CONDITIONING")], (400, 270), (420, 120)),
    (4, "EmptyMochiLatentVideo", "Video size and length",
     [("width", 848), ("height", 480), ("length", 37), ("batch_size", 1)],
     [], [("LATENT", "LATENT")], (400, 440), (320, 130)),
    (5, "MochiXDiTLoader", "Mochi xDiT Loader (multi-GPU pool)",
     pack_widgets(Door.LOADER, dit_name="mochi_preview_bf16.safetensors", vae_name="mochi_vae.safetensors",
                  world_size=2),
     [], [("pool", "MOCHI_XDIT_POOL")], (40, 300), (320, 298)),
    (6, "MochiXDiTSampler", "Mochi xDiT Sampler",
     pack_widgets(Door.SAMPLER, seed=42),
     [("pool", "MOCHI_XDIT_POOL", (5, 0)), ("positive", "CONDITIONING", (2, 0)),
      ("negative", "CONDITIONING", (3, 0)), ("latent_image", "LATENT", (4, 0))],
     [("samples", "LATENT")], (860, 120), (320, 358)),
    (7, "MochiTiledVAEDecode", "Mochi xDiT Tiled VAE Decode",
     pack_widgets(Door.DECODE),
     [("pool", "MOCHI_XDIT_POOL", (5, 0)), ("samples", "LATENT", (6, 0))],
     [("images", "IMAGE")], (1220, 120), (320, 180)),
    (8, "CreateVideo", "Create Video", [("fps", 24.0)],
     [("images", "IMAGE", (7, 0)), ("audio", "AUDIO", None)], [("VIDEO", "VIDEO")], (1220, 340), (270, 80)),
    (9, "SaveVideo", "Save Video",
     [("filename_prefix", "video/mochi_xdit"), ("format", "auto"), ("codec", "auto")],
     [("video", "VIDEO", (8, 0))], [], (1560, 120), (420, 420)),
]

V2V_PROMPT = "The same scene in late autumn: orange and red leaves, low golden sun, light mist, cinematic."
_COMMON = {node[0]: node for node in NODES}
V2V_NODES = [
    _COMMON[1],
    (2, "CLIPTextEncode", "Positive prompt (the new look)", [("text", V2V_PROMPT)],
     [("clip", "CLIP", (1, 0))], [("CONDITIONING", "CONDITIONING")], (400, 40), (420, 180)),
    _COMMON[3],
    _COMMON[5],
    (10, "LoadVideo", "Load the input video", [("file", "mochi_input.mp4"), (None, "image")],
     [], [("VIDEO", "VIDEO")], (40, 640), (320, 340)),
    (11, "GetVideoComponents", "Get Video Components", [],
     [("video", "VIDEO", (10, 0))], [("images", "IMAGE"), ("audio", "AUDIO"), ("fps", "FLOAT")], (400, 640), (270, 110)),
    (12, "ImageFromBatch", "First 37 frames (6k+1)", [("batch_index", 0), ("length", 37)],
     [("image", "IMAGE", (11, 0))], [("IMAGE", "IMAGE")], (400, 790), (270, 100)),
    (13, "ImageScale", "Resize to 848x480 (multiples of 16)",
     [("upscale_method", "lanczos"), ("width", 848), ("height", 480), ("crop", "center")],
     [("image", "IMAGE", (12, 0))], [("IMAGE", "IMAGE")], (400, 930), (270, 150)),
    (14, "MochiTiledVAEEncode", "Mochi xDiT Tiled VAE Encode",
     pack_widgets(Door.ENCODE),
     [("pool", "MOCHI_XDIT_POOL", (5, 0)), ("pixels", "IMAGE", (13, 0))],
     [("samples", "LATENT")], (860, 640), (320, 150)),
    (6, "MochiXDiTSampler", "Mochi xDiT Sampler (denoise 0.6)",
     pack_widgets(Door.SAMPLER, seed=42, denoise=0.6),
     [("pool", "MOCHI_XDIT_POOL", (5, 0)), ("positive", "CONDITIONING", (2, 0)),
      ("negative", "CONDITIONING", (3, 0)), ("latent_image", "LATENT", (14, 0))],
     [("samples", "LATENT")], (860, 120), (320, 358)),
    _COMMON[7],
    (8, "CreateVideo", "Create Video", [("fps", 30.0)],
     [("images", "IMAGE", (7, 0)), ("audio", "AUDIO", None)], [("VIDEO", "VIDEO")], (1220, 340), (270, 80)),
    (9, "SaveVideo", "Save Video",
     [("filename_prefix", "video/mochi_xdit_v2v"), ("format", "auto"), ("codec", "auto")],
     [("video", "VIDEO", (8, 0))], [], (1560, 120), (420, 420)),
]

# Download hints the front-end shows for missing files (same sources as ComfyUI's Mochi template).
MODEL_FILES = {
    1: [("t5xxl_fp16.safetensors", "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/"
         "t5xxl_fp16.safetensors?download=true", "text_encoders")],
    5: [("mochi_preview_bf16.safetensors", "https://huggingface.co/Comfy-Org/mochi_preview_repackaged/resolve/main/"
         "split_files/diffusion_models/mochi_preview_bf16.safetensors?download=true", "diffusion_models"),
        ("mochi_vae.safetensors", "https://huggingface.co/Comfy-Org/mochi_preview_repackaged/resolve/main/"
         "split_files/vae/mochi_vae.safetensors?download=true", "vae")],
}


def api_workflow(nodes: list = NODES) -> dict:
    prompt = {}
    for node_id, class_type, title, widgets, inputs, _, _, _ in nodes:
        values = {name: value for name, value in widgets if name is not None}
        for name, _, source in inputs:
            if source is not None:
                values[name] = [str(source[0]), source[1]]
        prompt[str(node_id)] = {"class_type": class_type, "inputs": values, "_meta": {"title": title}}
    return prompt


def ui_workflow(nodes_in: list = NODES, graph_id: int = 0x6d6f636869786469745f743276) -> dict:
    links, link_ids = [], {}
    for node_id, _, _, _, inputs, _, _, _ in nodes_in:
        for slot, (_, kind, source) in enumerate(inputs):
            if source is not None:
                link_id = len(links) + 1
                links.append([link_id, source[0], source[1], node_id, slot, kind])
                link_ids[(node_id, slot)] = link_id
    nodes = []
    for order, (node_id, class_type, title, widgets, inputs, outputs, pos, size) in enumerate(nodes_in):
        node = {
            "id": node_id, "type": class_type, "pos": list(pos), "size": list(size), "flags": {},
            "order": order, "mode": 0,
            "inputs": [{"name": name, "type": kind, "link": link_ids.get((node_id, slot))}
                       for slot, (name, kind, _) in enumerate(inputs)],
            "outputs": [{"name": name, "type": kind, "slot_index": slot,
                         "links": [link[0] for link in links if link[1] == node_id and link[2] == slot]}
                        for slot, (name, kind) in enumerate(outputs)],
            "title": title,
            "properties": {"Node name for S&R": class_type},
            "widgets_values": [value for _, value in widgets],
        }
        if class_type.startswith("Mochi"):
            node["properties"]["cnr_id"] = "comfyui-mochi-xdit"
        if node_id in MODEL_FILES:
            node["properties"]["models"] = [{"name": name, "url": url, "directory": directory}
                                            for name, url, directory in MODEL_FILES[node_id]]
        nodes.append(node)
    return {
        "id": str(uuid.UUID(int=graph_id)), "revision": 0,
        "last_node_id": max(n[0] for n in nodes_in), "last_link_id": len(links),
        "nodes": nodes, "links": links, "groups": [], "config": {},
        "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}, "frontendVersion": "1.27.10"},
        "version": 0.4,
    }


def main() -> None:
    # ComfyUI lists every workflows/*.json as a template and loads it as a UI graph, so the API
    # twin lives one folder down, out of the templates list.
    os.makedirs(os.path.join(WORKFLOWS, "api"), exist_ok=True)
    graphs = []
    for name, nodes, graph_id in ((NAME, NODES, 0x6d6f636869786469745f743276),
                                  (V2V_NAME, V2V_NODES, 0x6d6f636869786469745f763276)):
        graphs += [(os.path.join(WORKFLOWS, f"{name}.json"), ui_workflow(nodes, graph_id)),
                   (os.path.join(WORKFLOWS, "api", f"{name}_api.json"), api_workflow(nodes))]
    for path, graph in graphs:
        with open(path, "w") as f:
            json.dump(graph, f, indent=2)
            f.write("\n")
        print(path)


if __name__ == "__main__":
    main()
