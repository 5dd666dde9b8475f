"""Draw the bundled templates' thumbnails: a diagram of each node graph, read from the workflow JSON.

ComfyUI's frontend (comfyui_frontend_package 1.27) shows each custom-node template with the image
`/api/workflow_templates/<pack folder>/<template name>.jpg`, i.e. a same-named .jpg beside the
JSON, in a 256 x 256 CSS-pixel box (object-contain); 512 x 512 stays sharp on HiDPI screens.
The picture is the real graph (node titles, class types, links coloured by type as the default
palette colours them), not a video frame. Run after changing the workflow:

    python tools/make_template_thumbnail.py            # writes workflows/<name>.jpg for every template
"""

import argparse
import json
import os

from PIL import Image, ImageDraw, ImageFont

SIZE = 512
BACKGROUND = (32, 32, 32)
CORE_NODE, CORE_TITLE = (53, 53, 53), (220, 220, 220)
PACK_NODE, PACK_TITLE = (30, 72, 80), (235, 250, 252)  # this pack's nodes
MUTED = (150, 150, 150)
LINK_COLOURS = {  # ComfyUI's default dark palette; the pool type is ours
    "CLIP": (255, 213, 0), "CONDITIONING": (255, 169, 49), "LATENT": (255, 156, 249), "IMAGE": (100, 181, 246),
    "VIDEO": (129, 199, 132), "MOCHI_XDIT_POOL": (77, 208, 225),
}
BOX_W, BOX_H = 150, 52
COLUMNS = (20, 181, 342)  # left edges
ROWS = (72, 152, 232, 312, 392)  # top edges
# node id -> (column, row): T5 and the pool on top, the sampler in the middle, the video at the bottom
LAYOUT = {1: (0, 0), 5: (2, 0), 2: (0, 1), 3: (1, 1), 4: (0, 2), 6: (1, 2), 7: (1, 3), 8: (1, 4), 9: (2, 4)}
# video to video: the input video's chain across the top right, encoded into the sampler's latent
V2V_LAYOUT = {1: (0, 0), 10: (1, 0), 5: (2, 0), 2: (0, 1), 11: (1, 1), 12: (2, 1), 3: (0, 2), 13: (1, 2),
              14: (2, 2), 6: (1, 3), 7: (0, 4), 8: (1, 4), 9: (2, 4)}
GAP = 28  # px between rows; links run through the gaps (channel routing)
FONT_DIR = "/usr/share/fonts/truetype/dejavu"


def _font(name: str, size: int):
    path = os.path.join(FONT_DIR, name)
    return ImageFont.truetype(path, size) if os.path.exists(path) else ImageFont.load_default(size)


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and draw.textlength(candidate, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return lines + [line]


def _box(node_id: int, layout: dict = LAYOUT) -> tuple[int, int, int, int]:
    column, row = layout[node_id]
    left, top = COLUMNS[column], ROWS[row]
    return left, top, left + BOX_W, top + BOX_H


def _arrow(draw: ImageDraw.ImageDraw, points: list[tuple[int, int]], colour) -> None:
    draw.line(points, fill=colour, width=3, joint="curve")
    (x0, y0), (x1, y1) = points[-2], points[-1]
    if x0 == x1:  # vertical end: head pointing down
        head = [(x1, y1), (x1 - 5, y1 - 8), (x1 + 5, y1 - 8)]
    else:  # horizontal end
        sign = 1 if x1 > x0 else -1
        head = [(x1, y1), (x1 - 8 * sign, y1 - 5), (x1 - 8 * sign, y1 + 5)]
    draw.polygon(head, fill=colour)


def _route(source: int, target: int, port_x: int) -> list[tuple[int, int]]:
    """Orthogonal path from one box to another (layout-specific, kept simple)."""
    sl, st, sr, sb = _box(source)
    tl, tt, tr, tb = _box(target)
    (s_col, s_row), (t_col, t_row) = LAYOUT[source], LAYOUT[target]
    if s_row == t_row:  # side by side: right edge to left edge
        y = (st + sb) // 2
        return [(sr, y), (tl, y)]
    if s_col > t_col:  # down the source's column, then left into the target's right side
        x, y = (sl + sr) // 2, (tt + tb) // 2
        return [(x, sb), (x, y), (tr, y)]
    sx = (sl + sr) // 2
    if sx == port_x:
        return [(sx, sb), (sx, tt)]
    bend = tt - 14
    return [(sx, sb), (sx, bend), (port_x, bend), (port_x, tt)]


def _route_channels(source: int, target: int, port_x: int) -> list[tuple[int, int]]:
    """Path through the gaps between rows and columns, so no link crosses a box: neighbours in a
    row or a column are joined directly; otherwise down into the gap below the source's row, along
    it to the gap beside the source's column (on the target's side), down that gap to the gap above
    the target's row, and along it to the target's top."""
    sl, st, sr, sb = _box(source, V2V_LAYOUT)
    tl, tt, tr, tb = _box(target, V2V_LAYOUT)
    (s_col, s_row), (t_col, t_row) = V2V_LAYOUT[source], V2V_LAYOUT[target]
    if s_row == t_row and abs(s_col - t_col) == 1:
        y = (st + sb) // 2
        return [(sr, y), (tl, y)] if t_col > s_col else [(sl, y), (tr, y)]
    sx = (sl + sr) // 2
    if s_col == t_col and t_row == s_row + 1:
        return [(sx, sb), (sx, tt)]
    below, above = sb + GAP // 2, tt - GAP // 2
    channel = sr + 5 if t_col >= s_col else sl - 5
    return [(sx, sb), (sx, below), (channel, below), (channel, above), (port_x, above), (port_x, tt)]


def render(workflow: dict) -> Image.Image:
    nodes = {node["id"]: node for node in workflow["nodes"]}
    if set(nodes) == set(LAYOUT):
        layout, route, heading = LAYOUT, _route, "Mochi xDiT: text to video"
        subtitle = "Mochi-1 sampled and decoded on a pool of Ray ranks"
    elif set(nodes) == set(V2V_LAYOUT):
        layout, route, heading = V2V_LAYOUT, _route_channels, "Mochi xDiT: video to video"
        subtitle = "a video encoded, re-noised (denoise 0.6), sampled and decoded on the pool"
    else:
        raise ValueError(f"the workflow's nodes {sorted(nodes)} match no layout ({sorted(LAYOUT)} or "
                         f"{sorted(V2V_LAYOUT)}); add one")
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    title = _font("DejaVuSans-Bold.ttf", 21)
    small = _font("DejaVuSansCondensed-Bold.ttf", 12)
    tiny = _font("DejaVuSansCondensed.ttf", 11)
    draw.text((20, 14), heading, font=title, fill=(240, 240, 240))
    draw.text((20, 42), subtitle, font=tiny, fill=MUTED)

    links = [(link[1], link[3], link[5]) for link in workflow["links"]]  # (from, to, type)
    top_inputs: dict[int, list[int]] = {}
    for source, target, _ in links:
        if layout[source][1] != layout[target][1] and (layout[source][0] <= layout[target][0] or route is _route_channels):
            top_inputs.setdefault(target, []).append(source)
    for source, target, kind in links:
        left, _, right, _ = _box(target, layout)
        sources = sorted(top_inputs.get(target, []), key=lambda s: layout[s])
        if source in sources and len(sources) > 1:  # spread several inputs along the top edge
            port_x = left + (right - left) * (sources.index(source) + 1) // (len(sources) + 1)
        else:
            port_x = (left + right) // 2
        _arrow(draw, route(source, target, port_x), LINK_COLOURS.get(kind, MUTED))

    for node_id, node in nodes.items():
        ours = node["type"].startswith("Mochi")
        left, top, right, bottom = _box(node_id, layout)
        draw.rounded_rectangle((left, top, right, bottom), radius=7, fill=PACK_NODE if ours else CORE_NODE,
                               outline=LINK_COLOURS["MOCHI_XDIT_POOL"] if ours else (90, 90, 90), width=2)
        lines = _wrap(draw, node.get("title") or node["type"], small, BOX_W - 12)[:2]
        y = top + (6 if len(lines) == 2 else 10)
        for line in lines:
            draw.text((left + 6, y), line, font=small, fill=PACK_TITLE if ours else CORE_TITLE)
            y += 14
        draw.text((left + 6, bottom - 16), node["type"], font=tiny, fill=MUTED)

    legend_y = 460
    draw.rounded_rectangle((20, legend_y, 34, legend_y + 14), radius=3, fill=PACK_NODE,
                           outline=LINK_COLOURS["MOCHI_XDIT_POOL"])
    draw.text((40, legend_y), "this pack's nodes", font=tiny, fill=MUTED)
    draw.rounded_rectangle((160, legend_y, 174, legend_y + 14), radius=3, fill=CORE_NODE, outline=(90, 90, 90))
    draw.text((180, legend_y), "ComfyUI core nodes", font=tiny, fill=MUTED)
    x = 20
    for kind in ("CLIP", "CONDITIONING", "LATENT", "MOCHI_XDIT_POOL", "IMAGE", "VIDEO"):
        draw.line((x, legend_y + 30, x + 14, legend_y + 30), fill=LINK_COLOURS[kind], width=3)
        label = "POOL" if kind == "MOCHI_XDIT_POOL" else kind
        draw.text((x + 18, legend_y + 24), label, font=tiny, fill=MUTED)
        x += 18 + int(draw.textlength(label, font=tiny)) + 14
    return image


def main() -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workflow", action="append",
                        help="a template JSON (repeatable); default: every workflows/*.json")
    args = parser.parse_args()
    folder = os.path.join(root, "workflows")
    for path in args.workflow or sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".json")):
        with open(path, encoding="utf-8") as f:
            image = render(json.load(f))
        out = os.path.splitext(path)[0] + ".jpg"
        image.save(out, "JPEG", quality=88, optimize=True)
        print(f"{out}: {image.size[0]}x{image.size[1]}, {os.path.getsize(out)} bytes")


if __name__ == "__main__":
    main()
