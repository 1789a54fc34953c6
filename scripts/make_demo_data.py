"""Generate a small, deterministic cat-vs-fish demo dataset (ImageFolder layout).

    python scripts/make_demo_data.py [--out data] [--seed 0] [--train-per-class 20]
                                     [--val-per-class 16] [--size 256] [--force]

train/ holds "clean" cartoon drawings (soft backgrounds, centred subject);
val/ holds "challenge" drawings (clutter, odd colours, occlusion, noise, blur,
small or off-centre subjects) so validation accuracy says something about
robustness rather than memorisation. Same seed -> byte-identical files.
boxes.json records each drawn animal's bounding box (for Grad-CAM's pointing game).
"""

import argparse
import colorsys
import io
import json
import math
import random
import re
import sys
from pathlib import Path

from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageOps

CLASSES = ("cat", "fish")
SPLITS = ("train", "val")
JPEG_QUALITY = 80
GENERATED_NAME = re.compile(r"^(cat|fish)_\d{3}\.jpg$")
README_MARKER = "# Demo dataset (generated)"
BOXES_NAME = "boxes.json"
BOXES_MARKER = '{\n  "about": "bounding box of the drawn animal'  # how the script knows its own boxes.json


class ForeignFilesError(Exception):
    """The output folder holds files this script did not make."""


# --- colours -----------------------------------------------------------------

def hsv(h, s, v):
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return (round(r * 255), round(g * 255), round(b * 255))


def luminance(rgb):
    r, g, b = rgb
    return (0.299 * r + 0.587 * g + 0.114 * b) / 255


def scale_color(rgb, k):
    return tuple(max(0, min(255, round(c * k))) for c in rgb)


def random_palette(rng):
    """Body/accent colours drawn from the same wide range for both classes,
    so colour alone never tells a cat from a fish."""
    h = rng.random()
    body = hsv(h, rng.uniform(0.0, 0.9), rng.uniform(0.25, 1.0))
    accent = hsv(h + rng.uniform(-0.2, 0.2), rng.uniform(0.2, 1.0),
                 rng.uniform(0.15, 1.0))
    # Details drawn on the body (mouth, whiskers) must stay visible on dark coats.
    ink = (30, 30, 30) if luminance(body) > 0.35 else (225, 225, 225)
    return {"body": body, "accent": accent, "ink": ink,
            "outline": scale_color(body, 0.3)}


def background_colors(rng, subject_rgb):
    """Two soft colours whose brightness differs clearly from the subject."""
    target = luminance(subject_rgb)
    for _ in range(50):
        c1 = hsv(rng.random(), rng.uniform(0.05, 0.45), rng.uniform(0.35, 1.0))
        if abs(luminance(c1) - target) > 0.25:
            break
    c2 = scale_color(c1, rng.uniform(0.8, 1.15))
    return c1, c2


# --- shared drawing helpers ----------------------------------------------------

def ellipse(draw, cx, cy, rx, ry, fill, outline=None, width=0):
    draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=fill,
                 outline=outline, width=width)


def shrink_polygon(points, k):
    """Scale a polygon towards its centroid (used for inner ears)."""
    mx = sum(p[0] for p in points) / len(points)
    my = sum(p[1] for p in points) / len(points)
    return [(mx + (x - mx) * k, my + (y - my) * k) for x, y in points]


def bezier(p0, p1, p2, steps=24):
    return [((1 - t) ** 2 * p0[0] + 2 * (1 - t) * t * p1[0] + t * t * p2[0],
             (1 - t) ** 2 * p0[1] + 2 * (1 - t) * t * p1[1] + t * t * p2[1])
            for t in (i / steps for i in range(steps + 1))]


def clip_to_ellipse(layer, pattern, cx, cy, rx, ry):
    """Composite a pattern layer onto `layer`, only inside an ellipse
    (stripes/scales must not spill outside the fish body)."""
    mask = Image.new("L", layer.size, 0)
    ellipse(ImageDraw.Draw(mask), cx, cy, rx, ry, fill=255)
    pattern.putalpha(ImageChops.multiply(pattern.getchannel("A"), mask))
    layer.alpha_composite(pattern)


# --- cats ------------------------------------------------------------------------

def draw_cat_head(draw, rng, cx, cy, r, pal):
    """Round head, triangular ears, eyes, nose, mouth and whiskers."""
    ow = max(2, round(r / 22))
    rx, ry = r * rng.uniform(1.0, 1.15), r
    for side in (-1, 1):
        tip = (cx + side * rx * rng.uniform(0.6, 0.9),
               cy - ry * rng.uniform(1.35, 1.6))
        ear = [(cx + side * rx * 0.95, cy - ry * 0.3), tip,
               (cx + side * rx * 0.15, cy - ry * 0.9)]
        draw.polygon(ear, fill=pal["body"], outline=pal["outline"], width=ow)
        inner = shrink_polygon(ear, 0.5)
        draw.polygon(inner, fill=(240, 160, 175))
    ellipse(draw, cx, cy, rx, ry, pal["body"], pal["outline"], ow)
    if rng.random() < 0.5:  # lighter muzzle patch, common on real cats
        ellipse(draw, cx, cy + ry * 0.35, rx * 0.45, ry * 0.35,
                scale_color(pal["body"], 1.35))
    if rng.random() < 0.4:  # tabby "M" forehead stripes
        for dx in (-0.2, 0, 0.2):
            draw.line([(cx + dx * rx, cy - ry * 0.85), (cx + dx * rx, cy - ry * 0.55)],
                      fill=pal["accent"], width=ow * 2)

    eye_color = rng.choice([(120, 200, 60), (240, 200, 40), (90, 160, 230), (220, 140, 40)])
    slit = rng.random() < 0.5
    ew, eh = rx * 0.17, ry * rng.uniform(0.15, 0.22)
    for side in (-1, 1):
        ex, ey = cx + side * rx * 0.38, cy - ry * 0.1
        ellipse(draw, ex, ey, ew, eh, eye_color, (20, 20, 20), ow)
        ellipse(draw, ex, ey, ew * (0.25 if slit else 0.55), eh * 0.85, (10, 10, 10))
        ellipse(draw, ex + ew * 0.3, ey - eh * 0.4, ew * 0.18, ew * 0.18, (255, 255, 255))

    ny = cy + ry * 0.22
    draw.polygon([(cx - rx * 0.09, ny - ry * 0.05), (cx + rx * 0.09, ny - ry * 0.05),
                  (cx, ny + ry * 0.07)], fill=(235, 120, 140))
    m = rx * 0.1
    for side in (-1, 1):
        mx = cx + side * m
        draw.arc((mx - m, ny - m * 0.3, mx + m, ny + m * 1.4), 0, 180,
                 fill=pal["ink"], width=ow)
    for side in (-1, 1):
        for k in (-1, 0, 1):
            start = (cx + side * rx * 0.25, ny + ry * 0.08 + k * ry * 0.06)
            end = (cx + side * rx * rng.uniform(1.15, 1.4),
                   ny + k * ry * rng.uniform(0.15, 0.3))
            draw.line([start, end], fill=pal["ink"], width=max(1, ow // 2))


def draw_cat_tail(draw, rng, cx, cy, rx, ry, pal):
    """Thick curved tail: outline stroke first, body-coloured stroke on top."""
    w = round(rx * rng.uniform(0.18, 0.28))
    ow = max(2, round(rx / 18))
    start = (cx + rx * 0.7, cy + ry * 0.75)
    ctrl = (cx + rx * rng.uniform(1.6, 2.1), cy + ry * rng.uniform(0.4, 1.0))
    end = (cx + rx * rng.uniform(1.1, 1.7), cy - ry * rng.uniform(0.2, 0.8))
    pts = bezier(start, ctrl, end)
    draw.line(pts, fill=pal["outline"], width=w + 2 * ow, joint="curve")
    draw.line(pts, fill=pal["body"], width=w, joint="curve")
    ellipse(draw, *end, w / 2 + ow, w / 2 + ow, pal["outline"])
    ellipse(draw, *end, w / 2, w / 2, pal["body"])


def draw_sitting_cat(draw, rng, c, pal):
    rx, ry = c * rng.uniform(0.17, 0.21), c * rng.uniform(0.21, 0.26)
    cx, cy = c * 0.46, c * 0.64
    ow = max(2, round(c / 160))
    draw_cat_tail(draw, rng, cx, cy, rx, ry, pal)
    ellipse(draw, cx, cy, rx, ry, pal["body"], pal["outline"], ow)
    if rng.random() < 0.5:  # tabby stripes across the flank
        for k in range(3):
            y = cy - ry * 0.3 + k * ry * 0.3
            draw.arc((cx - rx * 0.9, y - ry * 0.2, cx - rx * 0.2, y + ry * 0.2),
                     200, 340, fill=pal["accent"], width=ow * 2)
    if rng.random() < 0.5:  # light chest patch
        ellipse(draw, cx, cy - ry * 0.2, rx * 0.4, ry * 0.45, scale_color(pal["body"], 1.35))
    for side in (-1, 1):  # front paws
        ellipse(draw, cx + side * rx * 0.35, cy + ry * 0.92, rx * 0.26, ry * 0.12,
                pal["body"], pal["outline"], ow)
    draw_cat_head(draw, rng, cx, cy - ry * 1.15, c * rng.uniform(0.14, 0.17), pal)


def draw_cat(rng, c):
    """Return an RGBA layer (c x c) with a cat: either a big face or a sitting cat."""
    pal = random_palette(rng)
    layer = Image.new("RGBA", (c, c), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    if rng.random() < 0.5:
        draw_cat_head(draw, rng, c * 0.5, c * 0.58, c * rng.uniform(0.25, 0.3), pal)
    else:
        draw_sitting_cat(draw, rng, c, pal)
    return (ImageOps.mirror(layer) if rng.random() < 0.5 else layer), pal


# --- fish ------------------------------------------------------------------------

def draw_fish_pattern(rng, c, cx, cy, rx, ry, pal):
    """Stripes, spots or scales on a separate layer (clipped to the body later)."""
    pattern = Image.new("RGBA", (c, c), (0, 0, 0, 0))
    draw = ImageDraw.Draw(pattern)
    kind = rng.choice(["stripes", "spots", "scales", "plain"])
    if kind == "stripes":
        n = rng.randint(2, 4)
        w = rx * rng.uniform(0.1, 0.2)
        for k in range(n):
            x = cx - rx * 0.6 + k * (rx * 1.1 / max(1, n - 1))
            draw.rectangle((x - w / 2, cy - ry, x + w / 2, cy + ry), fill=pal["accent"])
    elif kind == "spots":
        for _ in range(rng.randint(5, 10)):
            r = ry * rng.uniform(0.08, 0.16)
            ellipse(draw, cx + rx * rng.uniform(-0.7, 0.3), cy + ry * rng.uniform(-0.7, 0.7),
                    r, r, pal["accent"])
    elif kind == "scales":
        s = ry * 0.22
        for row in range(-3, 4):
            for col in range(-4, 3):
                x = cx + col * s * 1.6 + (row % 2) * s * 0.8
                y = cy + row * s * 1.1
                draw.arc((x - s, y - s, x + s, y + s), 270, 90, fill=pal["accent"],
                         width=max(2, round(s / 5)))
    return pattern


def draw_fish(rng, c):
    """Return an RGBA layer (c x c) with a fish facing left or right."""
    pal = random_palette(rng)
    fin = pal["accent"] if rng.random() < 0.6 else pal["body"]
    layer = Image.new("RGBA", (c, c), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    rx = c * rng.uniform(0.26, 0.32)
    ry = rx * rng.uniform(0.4, 0.65)
    cx, cy = c * 0.56, c * 0.5
    ow = max(2, round(c / 160))

    # Fins and tail first so the body hides their bases.
    spread = ry * rng.uniform(0.7, 1.1)
    tail = [(cx - rx * 0.85, cy), (cx - rx * 1.55, cy - spread)]
    if rng.random() < 0.5:  # forked tail
        tail.append((cx - rx * 1.3, cy))
    tail.append((cx - rx * 1.55, cy + spread))
    draw.polygon(tail, fill=fin, outline=pal["outline"], width=ow)
    dorsal = [(cx - rx * 0.5, cy - ry * 0.8),
              (cx - rx * rng.uniform(0.3, 0.0), cy - ry * rng.uniform(1.4, 1.8)),
              (cx + rx * 0.3, cy - ry * 0.9)]
    draw.polygon(dorsal, fill=fin, outline=pal["outline"], width=ow)
    anal = [(cx - rx * 0.4, cy + ry * 0.85), (cx - rx * 0.35, cy + ry * 1.35),
            (cx - rx * 0.05, cy + ry * 0.95)]
    draw.polygon(anal, fill=fin, outline=pal["outline"], width=ow)

    ellipse(draw, cx, cy, rx, ry, pal["body"])
    clip_to_ellipse(layer, draw_fish_pattern(rng, c, cx, cy, rx, ry, pal), cx, cy, rx, ry)
    draw = ImageDraw.Draw(layer)
    ellipse(draw, cx, cy, rx, ry, None, pal["outline"], ow)

    gr = ry * 0.7  # gill line: left half of a circle near the head
    draw.arc((cx + rx * 0.45 - gr, cy - gr, cx + rx * 0.45 + gr, cy + gr), 125, 235,
             fill=pal["outline"], width=ow)
    draw.polygon([(cx + rx * 0.05, cy + ry * 0.15), (cx - rx * 0.3, cy + ry * 0.45),
                  (cx - rx * 0.25, cy - ry * 0.05)], fill=fin, outline=pal["outline"], width=ow)
    er = ry * rng.uniform(0.13, 0.2)
    ex, ey = cx + rx * 0.62, cy - ry * 0.22
    ellipse(draw, ex, ey, er, er, (255, 255, 255), (20, 20, 20), ow)
    ellipse(draw, ex + er * 0.2, ey, er * 0.55, er * 0.55, (10, 10, 10))
    draw.line([(cx + rx * 0.98, cy + ry * 0.12), (cx + rx * 0.82, cy + ry * 0.2)],
              fill=pal["outline"], width=ow)
    return (ImageOps.mirror(layer) if rng.random() < 0.5 else layer), pal


# --- composition -----------------------------------------------------------------

def gradient_background(rng, size, c1, c2):
    """Soft linear gradient in a random direction (rotate a 2x gradient and
    crop the middle so no empty corners show)."""
    grad = Image.linear_gradient("L").resize((size * 2, size * 2))
    grad = grad.rotate(rng.uniform(0, 360), resample=Image.BICUBIC)
    grad = grad.crop((size // 2, size // 2, size // 2 + size, size // 2 + size))
    return Image.composite(Image.new("RGB", (size, size), c1),
                           Image.new("RGB", (size, size), c2), grad)


def paste_subject(img, layer, size_px, center, angle):
    """Rotate the supersampled subject layer, shrink it to size_px (antialiasing
    for free) and paste it over img with its alpha; may overhang the edges.
    Returns the subject's bounding box in img, (x0, y0, x1, y1) with x1, y1
    exclusive, from its drawn (non-transparent) pixels, clipped to img."""
    c = layer.width
    rotated = layer.rotate(angle, resample=Image.BICUBIC, expand=True)
    k = size_px / c
    small = rotated.resize((max(1, round(rotated.width * k)), max(1, round(rotated.height * k))),
                           Image.LANCZOS)
    x, y = round(center[0] - small.width / 2), round(center[1] - small.height / 2)
    img.paste(small, (x, y), small)
    bx0, by0, bx1, by1 = small.getchannel("A").getbbox()
    return (max(0, x + bx0), max(0, y + by0), min(img.width, x + bx1), min(img.height, y + by1))


def add_clutter(img, rng):
    """Random shapes and lines behind the subject, so the background is not a giveaway."""
    draw = ImageDraw.Draw(img)
    s = img.width
    for _ in range(rng.randint(8, 18)):
        color = hsv(rng.random(), rng.uniform(0.2, 1.0), rng.uniform(0.2, 1.0))
        x, y = rng.uniform(0, s), rng.uniform(0, s)
        r = rng.uniform(0.04, 0.18) * s
        kind = rng.choice(["ellipse", "rect", "line", "polygon"])
        if kind == "ellipse":
            ellipse(draw, x, y, r, r * rng.uniform(0.4, 1.0), color)
        elif kind == "rect":
            draw.rectangle((x - r, y - r / 2, x + r, y + r / 2), fill=color)
        elif kind == "line":
            draw.line([(x, y), (rng.uniform(0, s), rng.uniform(0, s))], fill=color,
                      width=rng.randint(2, 6))
        else:
            n = rng.randint(3, 5)
            draw.polygon([(x + rng.uniform(-r, r), y + rng.uniform(-r, r)) for _ in range(n)],
                         fill=color)


def add_occlusion(img, rng, center, size_px):
    """Cover one side of the subject with an opaque blob/box (partial occlusion)."""
    draw = ImageDraw.Draw(img)
    a = rng.uniform(0, 2 * math.pi)
    d = size_px * rng.uniform(0.25, 0.35)
    x, y = center[0] + math.cos(a) * d, center[1] + math.sin(a) * d
    r = size_px * rng.uniform(0.12, 0.2)
    color = hsv(rng.random(), rng.uniform(0.0, 0.8), rng.uniform(0.2, 0.9))
    if rng.random() < 0.5:
        draw.rectangle((x - r, y - r, x + r, y + r), fill=color)
    else:
        ellipse(draw, x, y, r, r * rng.uniform(0.6, 1.0), color)


def recolor(img, rng):
    """Unusual colour rendering: grayscale, inverted, channel-swapped, duotone or posterised."""
    kind = rng.choice(["grayscale", "grayscale", "invert", "swap", "duotone", "posterize"])
    if kind == "grayscale":
        return ImageOps.grayscale(img).convert("RGB")
    if kind == "invert":
        return ImageOps.invert(img)
    if kind == "swap":
        r, g, b = img.split()
        return Image.merge("RGB", (b, r, g) if rng.random() < 0.5 else (g, b, r))
    if kind == "duotone":
        return ImageOps.colorize(ImageOps.grayscale(img), hsv(rng.random(), 0.8, 0.25),
                                 hsv(rng.random(), 0.4, 1.0))
    return ImageOps.posterize(img, 2)


def add_noise(img, rng):
    """Blend with seeded uniform noise (PIL's effect_noise is not seedable)."""
    noise = Image.frombytes("RGB", img.size, rng.randbytes(img.width * img.height * 3))
    return Image.blend(img, noise, rng.uniform(0.1, 0.22))


def draw_subject(cls, rng, c):
    return draw_cat(rng, c) if cls == "cat" else draw_fish(rng, c)


def make_clean_image(cls, rng, size):
    """Plain/gradient background, large roughly centred subject, mild rotation."""
    layer, pal = draw_subject(cls, rng, size * 2)
    img = gradient_background(rng, size, *background_colors(rng, pal["body"]))
    center = (size * rng.uniform(0.42, 0.58), size * rng.uniform(0.42, 0.58))
    box = paste_subject(img, layer, size * rng.uniform(0.8, 1.05), center, rng.uniform(-20, 20))
    return img, box


def make_challenge_image(cls, rng, size):
    """Smaller, off-centre subject plus 2-3 random degradations."""
    effects = rng.sample(["clutter", "recolor", "occlusion", "noise", "blur"], rng.randint(2, 3))
    layer, pal = draw_subject(cls, rng, size * 2)
    img = gradient_background(rng, size, *background_colors(rng, pal["body"]))
    if "clutter" in effects:
        add_clutter(img, rng)
    size_px = size * rng.uniform(0.45, 0.75)
    center = (size * rng.uniform(0.3, 0.7), size * rng.uniform(0.3, 0.7))
    box = paste_subject(img, layer, size_px, center, rng.uniform(-45, 45))
    if "occlusion" in effects:
        add_occlusion(img, rng, center, size_px)
    if "recolor" in effects:
        img = recolor(img, rng)
    if "blur" in effects:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(1.2, 2.5)))
    if "noise" in effects:
        img = add_noise(img, rng)
    return img, box


# --- output ----------------------------------------------------------------------

def jpeg_bytes(img):
    # Fixed encoder settings and no metadata -> identical bytes on every run.
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=JPEG_QUALITY, subsampling=2, optimize=True)
    return buf.getvalue()


def find_foreign_files(out):
    """Paths under OUT/train, OUT/val (plus OUT/README.md) not made by this script."""
    foreign = []
    for split in SPLITS:
        split_dir = out / split
        if not split_dir.is_dir():
            continue
        for entry in split_dir.iterdir():
            if entry.name not in CLASSES or not entry.is_dir():
                foreign.append(entry)
                continue
            foreign += [f for f in entry.iterdir()
                        if not (GENERATED_NAME.match(f.name)
                                and f.name.startswith(entry.name + "_"))]
    readme = out / "README.md"
    if readme.exists() and not readme.read_text(errors="replace").startswith(README_MARKER):
        foreign.append(readme)
    boxes = out / BOXES_NAME
    if boxes.exists() and not boxes.read_text(errors="replace").startswith(BOXES_MARKER):
        foreign.append(boxes)
    return foreign


def readme_text(seed, train_per_class, val_per_class, size):
    flags = (f"--seed {seed} --train-per-class {train_per_class} "
             f"--val-per-class {val_per_class} --size {size}")
    return f"""{README_MARKER}

Procedurally drawn cartoon **cats** and **fish** for trying out the training
pipeline without downloading photos. Generated by `scripts/make_demo_data.py`
with `{flags}`.

- `train/cat`, `train/fish`: clean drawings (soft background, centred subject).
- `val/cat`, `val/fish`: harder drawings (clutter, odd colours/grayscale,
  occlusion, small or off-centre subjects, noise, blur).
- `boxes.json`: each drawn animal's bounding box, `[x0, y0, x1, y1]` in pixels
  (used to check where Grad-CAM looks: README "Grad-CAM").

Regenerate (byte-identical for the same seed):

    python scripts/make_demo_data.py --out data {flags}

To use real photos instead, put them in the same layout
(`<split>/<class>/<any name>.jpg`) in a separate folder, or delete the
generated files here first; the script refuses to write into split folders
that contain files it did not generate unless `--force` is given.
"""


def boxes_json(boxes, size):
    """The boxes file: one line per image, so a diff shows which image changed."""
    lines = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(boxes.items())]
    return (f'{{\n  "about": "bounding box of the drawn animal in each {size}x{size} image: [x0, y0, x1, y1] in '
            f'pixels, x1 and y1 exclusive, clipped to the image",\n  "boxes": {{\n  '
            + ",\n  ".join(lines) + "\n  }\n}\n")


def generate(out, seed=0, train_per_class=20, val_per_class=16, size=256, force=False):
    """Write the dataset and README; return {split: total bytes written}."""
    out = Path(out)
    foreign = find_foreign_files(out)
    if foreign and not force:
        raise ForeignFilesError(
            f"{out} contains files not made by this script (e.g. {foreign[0]}); "
            "use another --out or pass --force")
    counts = {"train": train_per_class, "val": val_per_class}
    makers = {"train": make_clean_image, "val": make_challenge_image}
    written, boxes = {}, {}
    for split in SPLITS:
        written[split] = 0
        for cls in CLASSES:
            folder = out / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            # Drop generated files from an earlier, larger run so counts match the flags.
            for old in folder.glob(f"{cls}_*.jpg"):
                if GENERATED_NAME.match(old.name):
                    old.unlink()
            for i in range(counts[split]):
                # Per-image seed: changing one count doesn't reshuffle the other images.
                rng = random.Random(f"{seed}:{split}:{cls}:{i}")
                img, box = makers[split](cls, rng, size)
                data = jpeg_bytes(img)
                (folder / f"{cls}_{i:03d}.jpg").write_bytes(data)
                written[split] += len(data)
                boxes[f"{split}/{cls}/{cls}_{i:03d}.jpg"] = list(box)
    if out / BOXES_NAME not in foreign:  # like the README: a user's own file is never replaced
        (out / BOXES_NAME).write_text(boxes_json(boxes, size))
    readme = out / "README.md"
    if readme not in foreign:  # --force never replaces a user's own README
        readme.write_text(readme_text(seed, train_per_class, val_per_class, size))
    return written


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="data", help="output folder (default: data)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-per-class", type=int, default=20)
    p.add_argument("--val-per-class", type=int, default=16)
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--force", action="store_true",
                   help="write even if the output holds other files (they are left in place)")
    args = p.parse_args(argv)
    for name, value, low in (("--train-per-class", args.train_per_class, 1), ("--val-per-class", args.val_per_class, 1),
                             ("--size", args.size, 32)):
        if not low <= value <= 4096:
            print(f"error: {name} must be from {low} to 4096 (got {value})", file=sys.stderr)
            return 2
    try:
        written = generate(args.out, args.seed, args.train_per_class, args.val_per_class,
                           args.size, args.force)
    except ForeignFilesError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write {e.filename or args.out}: {e.strerror or e}; pass a writable --out folder",
              file=sys.stderr)
        return 2
    counts = {"train": args.train_per_class, "val": args.val_per_class}
    for split, nbytes in written.items():
        print(f"{split}: {counts[split]} cat + {counts[split]} fish -> "
              f"{Path(args.out) / split} ({nbytes / 1024:.0f} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
