"""Template-browser thumbnails: the workflow's graph drawn as boxes and wires."""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

SIZE = (512, 384)
PACK_PREFIX = "DiffPrivacy"


def draw_thumbnail(ui: dict, path: Path) -> None:
    nodes = {n["id"]: n for n in ui["nodes"]}
    xs = [n["pos"][0] for n in nodes.values()]
    ys = [n["pos"][1] for n in nodes.values()]
    span_x = max(xs) - min(xs) + max(n["size"][0] for n in nodes.values())
    span_y = max(n["pos"][1] + n["size"][1] for n in nodes.values()) - min(ys)
    scale = min((SIZE[0] - 20) / span_x, (SIZE[1] - 20) / span_y)

    left, top = (SIZE[0] - span_x * scale) / 2, (SIZE[1] - span_y * scale) / 2  # centred

    def box(node):
        x = left + (node["pos"][0] - min(xs)) * scale
        y = top + (node["pos"][1] - min(ys)) * scale
        return x, y, x + node["size"][0] * scale, y + node["size"][1] * scale

    image = Image.new("RGB", SIZE, (32, 34, 38))
    draw = ImageDraw.Draw(image)
    for _link, src, _slot, dst, _tslot, _kind in ui["links"]:
        a, b = box(nodes[src]), box(nodes[dst])
        draw.line([(a[2], (a[1] + a[3]) / 2), (b[0], (b[1] + b[3]) / 2)], fill=(120, 160, 200), width=2)
    for node in nodes.values():
        ours = node["type"].startswith(PACK_PREFIX)
        draw.rounded_rectangle(box(node), radius=4, fill=(70, 50, 110) if ours else (60, 60, 66),
                               outline=(200, 170, 255) if ours else (120, 120, 120))
        x1, y1, _x2, _y2 = box(node)
        label = node.get("title") or node["type"].removeprefix(PACK_PREFIX)
        draw.text((x1 + 4, y1 + 3), label[:22], fill=(235, 235, 235))
    image.save(path, quality=90)
