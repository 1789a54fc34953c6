"""The README's Grad-CAM figure: drawings from data/val (top) and their CAMs
(bottom) with the recorded box of the animal (white) and the CAM's peak (the
pointing game's point: a green cross when it falls in the box, red when not).

    python scripts/cam_figure.py --checkpoint checkpoints/RUN/best_acc.pt [--out assets/cam_drawings.jpg]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

NAMES = ["val/cat/cat_003.jpg", "val/fish/fish_005.jpg", "val/cat/cat_010.jpg", "val/fish/fish_012.jpg"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", default=str(ROOT / "data"))
    p.add_argument("--out", default=str(ROOT / "assets" / "cam_drawings.jpg"))
    args = p.parse_args(argv)

    import numpy as np
    from PIL import Image, ImageDraw

    from core.cam import blend_cam, cam_for_image
    from core.images import load_rgb
    from core.predict import Predictor

    pred = Predictor.load(args.checkpoint)
    boxes = json.loads((Path(args.data) / "boxes.json").read_text())["boxes"]
    tiles = []
    for name in NAMES:
        rgb = load_rgb(Path(args.data) / name)
        label = pred.predict_image(rgb, 1)[0][0]
        m = pred.cam(pred.preprocess(rgb)[None], [pred.class_names.index(label)])[0]
        cam = cam_for_image(m, rgb, pred.resize, pred.crop)
        over = blend_cam(rgb, cam, 0.5)
        d = ImageDraw.Draw(over)
        x0, y0, x1, y1 = boxes[name]
        d.rectangle([x0, y0, x1 - 1, y1 - 1], outline=(255, 255, 255), width=2)
        y, x = np.unravel_index(cam.argmax(), cam.shape)
        hit = x0 <= x < x1 and y0 <= y < y1
        c = (0, 255, 0) if hit else (255, 0, 0)
        d.line([(x - 8, y), (x + 8, y)], fill=c, width=3)
        d.line([(x, y - 8), (x, y + 8)], fill=c, width=3)
        ImageDraw.Draw(rgb).text((6, 4), f"{name.split('/')[-1]}: {label}", fill=(255, 255, 255))
        tiles.append((rgb, over))
        print(f"{name}: predicted {label}, CAM peak at ({x}, {y}) {'inside' if hit else 'outside'} the box")
    w, h = tiles[0][0].size
    sheet = Image.new("RGB", (w * len(tiles), h * 2))
    for i, (top, bottom) in enumerate(tiles):
        sheet.paste(top, (i * w, 0))
        sheet.paste(bottom, (i * w, h))
    sheet.save(args.out, quality=85, optimize=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
