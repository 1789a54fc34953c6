"""Issue 5.3: broken and odd images. Each input either loads correctly (the
actual pixels, size and mode are checked) or raises ImageLoadError with a
one-line reason; training skips the bad ones with a listed warning; predict
gives a one-line error and exit code 2, never a traceback."""
from __future__ import annotations

import inspect
import io
import os
import re
import struct
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, make_image_dataset
from core.errors import ImageLoadError
from core.images import MAX_PIXELS, load_rgb

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


# ---------------------------------------------------------------- builders (all tiny, all in memory)

def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def raw_png(width, height, bit_depth, color_type, rows: bytes | None = None) -> bytes:
    """A PNG written by hand: lets a header claim any size (bomb) or any depth."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    idat = zlib.compress(rows if rows is not None else b"\0" * 16)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, fmt, **kw)
    return b.getvalue()


def halves(size=(40, 20), left=RED, right=BLUE) -> Image.Image:
    img = Image.new("RGB", size, left)
    img.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return img


def exif_jpeg(orientation) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(halves(), "JPEG", quality=95, exif=exif.tobytes())


def corrupt_exif_jpeg() -> bytes:
    """An EXIF block whose IFD claims 3 entries but holds 2 (Pillow warns)."""
    data = encode(Image.new("RGB", (8, 8), RED), "JPEG", quality=100)
    tiff = (b"II*\x00\x08\x00\x00\x00" + struct.pack("<H", 3) + struct.pack("<HHII", 0x0112, 3, 1, 6)
            + struct.pack("<HHII", 0x010F, 2, 400, 9999))
    app1 = b"Exif\x00\x00" + tiff
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + data[2:]


def noise_jpeg(size=(64, 64)) -> bytes:
    arr = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    return encode(Image.fromarray(arr), "JPEG", quality=90)


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (8, 8), RED), Image.new("RGB", (8, 8), BLUE)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def palette_with_transparency(fmt="PNG") -> bytes:
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 255, 0] + list(BLUE) + [0] * 762)  # index 0 green (transparent), 1 blue
    img.putpixel((1, 1), 1)
    return encode(img, fmt, transparency=0)


def rgba_png() -> bytes:
    img = Image.new("RGBA", (3, 1))
    img.putdata([(255, 0, 0, 0), (0, 0, 255, 255), (0, 0, 0, 128)])
    return encode(img, "PNG")


def gray16_png() -> bytes:
    arr = np.array([[0, 1000, 32896, 65535]], dtype=np.uint16)
    return encode(Image.fromarray(arr), "PNG")


def rgb16_png() -> bytes:
    row = b"\0" + struct.pack(">HHH", 0xFFFF, 0x8000, 0x0000)  # filter byte + one 16-bit RGB pixel
    return raw_png(1, 1, 16, 2, row)


def bomb_png(w, h) -> bytes:
    return raw_png(w, h, 8, 2)


def bomb_gif(w, h) -> bytes:
    return (b"GIF89a" + struct.pack("<HH", w, h) + b"\x00\x00\x00" + b"," + struct.pack("<HHHH", 0, 0, w, h)
            + b"\x00\x02\x02\x44\x01\x00;")


# ---------------------------------------------------------------- each case: loads correctly, or a clear error

GOOD = {}   # name -> (bytes, check(img))
BAD = {}    # name -> (bytes, words the reason must contain)


def good(name, data, check):
    GOOD[name] = (data, check)


def bad(name, data, *words):
    BAD[name] = (data, words)


def px(img, xy):
    return img.getpixel(xy)


def near(a, b, tol=40):
    return all(abs(x - y) <= tol for x, y in zip(a, b))


good("animated.gif", animated_gif(), lambda im: im.size == (8, 8) and px(im, (4, 4)) == RED)
good("gray16.png", gray16_png(),  # I;16 scaled by 1/257, not clipped at 255
     lambda im: [px(im, (x, 0)) for x in range(4)] == [(0, 0, 0), (4, 4, 4), (128, 128, 128), (255, 255, 255)])
good("rgb16.png", rgb16_png(), lambda im: px(im, (0, 0)) == (255, 128, 0))
good("cmyk.jpg", encode(halves().convert("CMYK"), "JPEG", quality=95),
     lambda im: near(px(im, (2, 10)), RED) and near(px(im, (37, 10)), BLUE))
good("palette-transparent.png", palette_with_transparency("PNG"),
     lambda im: px(im, (0, 0)) == WHITE and px(im, (1, 1)) == BLUE)
good("palette-transparent.gif", palette_with_transparency("GIF"),
     lambda im: px(im, (0, 0)) == WHITE and px(im, (1, 1)) == BLUE)
good("rgba.png", rgba_png(),  # composited on white
     lambda im: [px(im, (x, 0)) for x in range(3)] == [WHITE, BLUE, (127, 127, 127)])
good("la.png", encode(Image.new("LA", (2, 2), (0, 0)), "PNG"), lambda im: px(im, (0, 0)) == WHITE)
# EXIF orientation 6: rotate 90 degrees clockwise to display. Stored 40x20, left red / right blue
# -> shown 20x40 with red on top. 8: counter-clockwise (red at the bottom). 3: 180 (red on the right).
good("exif-6.jpg", exif_jpeg(6), lambda im: im.size == (20, 40) and near(px(im, (10, 2)), RED) and near(px(im, (10, 37)), BLUE))
good("exif-8.jpg", exif_jpeg(8), lambda im: im.size == (20, 40) and near(px(im, (10, 2)), BLUE) and near(px(im, (10, 37)), RED))
good("exif-3.jpg", exif_jpeg(3), lambda im: im.size == (40, 20) and near(px(im, (2, 10)), BLUE) and near(px(im, (37, 10)), RED))
good("exif-bogus-orientation.jpg", exif_jpeg(77), lambda im: im.size == (40, 20) and near(px(im, (2, 10)), RED))
good("1x1.png", encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"), lambda im: im.size == (1, 1) and px(im, (0, 0)) == (10, 20, 30))
good("gray.jpg", encode(Image.new("L", (6, 6), 77), "JPEG", quality=100), lambda im: near(px(im, (3, 3)), (77, 77, 77), 2))
good("bilevel.png", encode(Image.new("1", (4, 4), 1), "PNG"), lambda im: px(im, (0, 0)) == WHITE)
good("float.tif", encode(Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)), "TIFF"),
     lambda im: [px(im, (x, 0))[0] for x in range(3)] == [0, 128, 255])
good("corrupt-exif.jpg", corrupt_exif_jpeg(), lambda im: im.size == (8, 8) and near(px(im, (4, 4)), RED, 3))
good("rgb.bmp", encode(Image.new("RGB", (3, 3), (1, 2, 3)), "BMP"), lambda im: px(im, (1, 1)) == (1, 2, 3))
good("rgba.webp", encode(Image.new("RGBA", (4, 4), (0, 0, 255, 0)), "WEBP", lossless=True), lambda im: px(im, (1, 1)) == WHITE)
good("jpeg-with-trailing-garbage.jpg", encode(Image.new("RGB", (8, 8), RED), "JPEG", quality=100) + os.urandom(100),
     lambda im: near(px(im, (4, 4)), RED, 3))

bad("zero-byte.jpg", b"", "empty")
bad("truncated.jpg", noise_jpeg()[:1200], "cannot decode")
bad("text-renamed.png", b"just some notes, not a picture\n" * 3, "not a supported image")
bad("drawing.svg", b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', "svg")
bad("bomb-20000x20000.png", bomb_png(20000, 20000), "too large", "decompression")
bad("bomb-10000x10000.png", bomb_png(10000, 10000), "too large")  # between Pillow's warning and error limits
bad("bomb-60000x60000.gif", bomb_gif(60000, 60000), "too large")
bad("png-bad-crc.png", raw_png(2, 2, 8, 2)[:-9] + b"XXXX" + raw_png(2, 2, 8, 2)[-5:], "")
bad("png-header-only.png", raw_png(4, 4, 8, 2)[:33], "truncated PNG")
bad("heic.jpg", b"\x00\x00\x00\x18ftypheic" + os.urandom(100), "heic")
bad("html.jpg", b"<!DOCTYPE html><html><body>404 Not Found</body></html>", "not a supported image")


def test_counts():
    assert len(GOOD) >= 19 and len(BAD) >= 11


@pytest.mark.parametrize("name", sorted(GOOD))
def test_odd_images_load_correctly(name, tmp_path):
    data, check = GOOD[name]
    p = tmp_path / name
    p.write_bytes(data)
    with warnings.catch_warnings(record=True) as seen:
        warnings.filterwarnings("always", append=True)  # after the library's own filters
        for source in (p, str(p), io.BytesIO(data)):
            img = load_rgb(source)
            assert img.mode == "RGB" and check(img), (name, img.size, list(img.getdata())[:8])
    assert not [str(w.message) for w in seen], "warnings would be printed on the CLI's stderr"


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_images_give_one_line_error(name, tmp_path):
    data, words = BAD[name]
    p = tmp_path / name
    p.write_bytes(data)
    t0 = time.perf_counter()
    for source in (p, io.BytesIO(data)):
        with pytest.raises(ImageLoadError) as e:
            load_rgb(source)
        msg = str(e.value)
        assert "\n" not in msg and len(msg) < 400, msg
        for w in words:
            assert w.lower() in msg.lower(), (name, msg)
    assert e.value.reason and (name in str(load_error(p)))
    assert time.perf_counter() - t0 < 5  # bombs are refused from the header, never decoded


def load_error(p):
    try:
        load_rgb(p)
    except ImageLoadError as e:
        return e
    raise AssertionError(f"{p} loaded")


def test_bomb_limit_does_not_depend_on_warning_filters(tmp_path):
    """The 1x-2x MAX_PIXELS band is refused by an explicit size check, so it
    holds even where warnings are ignored (filters are process-wide and not
    thread-safe; training decodes in threads)."""
    p = tmp_path / "b.png"
    p.write_bytes(bomb_png(10000, 10000))
    assert 10000 * 10000 > MAX_PIXELS
    orig = warnings.catch_warnings
    try:
        warnings.catch_warnings = lambda *a, **k: _Null()  # what a racing thread can do to the filters
        warnings.simplefilter("ignore")
        with pytest.raises(ImageLoadError, match="too large"):
            load_rgb(p)
    finally:
        warnings.catch_warnings = orig
        warnings.resetwarnings()


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_paths_that_are_not_image_files(tmp_path):
    with pytest.raises(ImageLoadError, match="folder"):
        load_rgb(tmp_path)
    with pytest.raises(ImageLoadError, match="not found"):
        load_rgb(tmp_path / "missing.jpg")
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    with pytest.raises(ImageLoadError, match="not a regular file"):
        load_rgb(fifo)  # would block forever if opened
    with pytest.raises(ImageLoadError, match="<uploaded image>"):
        load_rgb(io.BytesIO(b""))


def test_file_handles_are_closed(tmp_path):
    """Multi-frame files keep Pillow's file open unless closed: the app serves many."""
    p = tmp_path / "a.gif"
    p.write_bytes(animated_gif())
    fd_dir = Path("/proc/self/fd")
    before = len(list(fd_dir.iterdir()))
    imgs = [load_rgb(p) for _ in range(50)]
    assert len(list(fd_dir.iterdir())) <= before + 2
    assert px(imgs[-1], (0, 0)) == RED


# ---------------------------------------------------------------- through the CLI

PY = sys.executable


def cli(script, *args, cwd):
    env = dict(os.environ, TL_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    env.pop("TL_DEBUG", None)
    return subprocess.run([PY, str(ROOT / script), *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def odd_dataset(tmp_path_factory):
    """A tiny dataset with every bad file and every odd-but-valid file mixed in."""
    root = make_image_dataset(tmp_path_factory.mktemp("odd") / "ds")
    placed = {"bad": [], "good": []}
    for i, (name, (data, _)) in enumerate(sorted(BAD.items())):
        p = root / ("train" if i % 3 else "val") / ("cat", "fish")[i % 2] / name
        p.write_bytes(data)
        placed["bad"].append(p)
    for i, (name, (data, _)) in enumerate(sorted(GOOD.items())):
        p = root / "train" / ("cat", "fish")[i % 2] / name
        p.write_bytes(data)
        placed["good"].append(p)
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    return root, placed


@pytest.mark.slow
def test_training_skips_bad_images_with_a_listed_warning(odd_dataset, tmp_path):
    root, placed = odd_dataset
    r = cli("train.py", "--data-dir", root, "--weights", "none", "--epochs", "1", "--batch-size", "8",
            "--output-dir", tmp_path / "out", "--device", "cpu", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "Warning:" not in r.stderr, r.stderr  # no Python warnings either
    warnings = "\n".join(line for line in r.stderr.splitlines() if line.startswith(("WARNING", "  ")))
    for p in placed["bad"] + [Path("notes.txt")]:  # by content, or by name (.svg, .txt)
        assert re.search(rf"^  \S*{re.escape(p.name)}: \S", warnings, re.M), (p.name, r.stderr)
    for p in placed["good"]:
        assert p.name not in warnings, f"{p.name} is a valid image but was skipped"
    assert "EPOCH 1/1" in r.stdout


def test_dataset_skips_bad_images_in_process(odd_dataset):
    """The library side of the above (runs without the CLI change): every bad
    file is skipped with its reason, every odd-but-valid one is decoded."""
    from core.data import decode_split, scan_dataset
    root, placed = odd_dataset
    info = scan_dataset(root)
    for split in (info.train, info.val):
        steps = decode_split(split, 64, keep=False)
        if inspect.isgenerator(steps):  # decode_split yields progress
            for _ in steps:
                pass
    skipped = {Path(p).name: reason for p, reason in info.skipped}
    assert {p.name for p in placed["bad"]} <= set(skipped), skipped
    assert not {p.name for p in placed["good"]} & set(skipped)
    assert "notes.txt" in skipped and ".DS_Store" not in skipped
    assert all("\n" not in r for r in skipped.values())


def test_training_on_only_bad_images_fails_clearly(tmp_path, capsys):
    import train
    root = make_image_dataset(tmp_path / "ds")
    for p in (root / "train" / "cat").iterdir():
        p.write_bytes(b"")  # every training cat is damaged
    code = train.main(["--data-dir", str(root), "--weights", "none", "--epochs", "1", "--device", "cpu",
                       "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    assert "no longer has images for every class" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # no empty run folder


def test_images_found_unreadable_while_decoding_correct_the_dataset_counts(tmp_path, capsys):
    """The DATASET lines count files before decoding; when some turn out unreadable
    the warning says what trains instead of leaving the earlier counts standing."""
    import train
    root = make_image_dataset(tmp_path / "ds")
    (root / "train" / "cat" / "notes.jpg").write_text("not a photo")
    assert train.main(["--data-dir", str(root), "--weights", "none", "--epochs", "1", "--device", "cpu",
                       "--output-dir", str(tmp_path / "out")]) == 0
    out, err = capsys.readouterr()
    assert "train: 9 images" in out
    assert "skipped 1 unreadable or non-image file(s)" in err and "notes.jpg" in err
    assert "train now: 8 images | per_class={'cat': 4, 'fish': 4}" in err
    assert "val now: 4 images | per_class={'cat': 2, 'fish': 2}" in err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import train
    tmp = tmp_path_factory.mktemp("ckpt")
    data = make_image_dataset(tmp / "ds")
    assert train.main(["--data-dir", str(data), "--weights", "none", "--epochs", "1", "--device", "cpu",
                       "--output-dir", str(tmp / "out")]) == 0
    return next((tmp / "out").iterdir()) / "best_acc.pt"


def test_cli_predict_on_a_bad_image_is_one_line_and_exit_2(checkpoint, tmp_path):
    bad_file = tmp_path / "photo.jpg"
    bad_file.write_bytes(BAD["truncated.jpg"][0])
    r = cli("predict.py", "--image", bad_file, "--checkpoint", checkpoint, "--device", "cpu", cwd=tmp_path)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "ERROR: cannot decode image" in r.stdout


def test_cli_predict_on_every_bad_and_odd_image(checkpoint, tmp_path, capsys):
    import predict
    for name, (data, words) in sorted(BAD.items()):
        p = tmp_path / name
        p.write_bytes(data)
        assert predict.main(["--image", str(p), "--checkpoint", str(checkpoint), "--device", "cpu"]) == 2, name
        cap = capsys.readouterr()
        assert "Traceback" not in cap.err and len(cap.err.strip().splitlines()) == 1, (name, cap.err)
        assert "ERROR: " in cap.out
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name, (data, _) in list(GOOD.items()) + list(BAD.items()):
        if name.endswith(".svg"):
            continue
        (folder / name).write_bytes(data)
    assert predict.main(["--image", str(folder), "--all", "1", "--checkpoint", str(checkpoint), "--device", "cpu"]) == 0
    cap = capsys.readouterr()
    assert cap.out.count("TOPK:") == len(GOOD) and cap.out.count("ERROR: ") == len(BAD) - 1
    n = len(GOOD) + len(BAD) - 1
    assert cap.err.strip().splitlines()[-1] == f"{len(BAD) - 1} of {n} image(s) could not be read", cap.err
