"""Issue 5.6: time-bounded fuzzing of the two parsers that take files from
strangers. load_rgb: random bytes and mutated valid images of every supported
format -> an RGB image or ImageLoadError, nothing else. extract_dataset_zip:
random member names (.., absolute, backslashes, drive letters, links) and
mutated zip bytes -> a dataset folder inside the destination or DatasetError,
and nothing is ever written outside the destination."""
from __future__ import annotations

import io
import os
import stat
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from core.errors import DatasetError, ImageLoadError
from core.images import load_rgb
from core.zipimport import extract_dataset_zip

BUDGET_S = 20  # per fuzz test; examples after the budget return at once
FUZZ = dict(deadline=None, database=None, derandomize=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FUZZ_IMAGES = settings(max_examples=1500, **FUZZ)
FUZZ_ZIPS = settings(max_examples=500, **FUZZ)
COUNTS: dict[str, int] = {}


class Budget:
    def __init__(self, name):
        self.name, self.end = name, None

    def spent(self) -> bool:
        if self.end is None:
            self.end = time.monotonic() + BUDGET_S
        if time.monotonic() > self.end:
            return True
        COUNTS[self.name] = COUNTS.get(self.name, 0) + 1
        return False


def _seed_images() -> list[bytes]:
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 255, (6, 7, 3), dtype=np.uint8))
    out = []
    for fmt, img, kw in [("PNG", rgb, {}), ("JPEG", rgb, {"quality": 80}), ("GIF", rgb.convert("P"), {}),
                         ("BMP", rgb, {}), ("TIFF", rgb, {}), ("WEBP", rgb, {"lossless": True}),
                         ("PNG", rgb.convert("RGBA"), {}), ("PNG", Image.new("I;16", (4, 3), 4000), {}),
                         ("JPEG", rgb.convert("CMYK"), {}), ("PPM", rgb, {}), ("ICO", rgb, {})]:
        b = io.BytesIO()
        img.save(b, fmt, **kw)
        out.append(b.getvalue())
    b = io.BytesIO()
    rgb.save(b, "GIF", save_all=True, append_images=[rgb.rotate(90)])
    out.append(b.getvalue())
    return out


SEEDS = _seed_images()


def mutate(data: bytes, edits, cut) -> bytes:
    buf = bytearray(data)
    for pos, val, op in edits:
        if not buf:
            break
        i = pos % len(buf)
        if op == 0:
            buf[i] = val
        elif op == 1:
            buf.insert(i, val)
        else:
            del buf[i]
    return bytes(buf[: cut % (len(buf) + 1)] if cut is not None else buf)


def check_image_result(source):
    try:
        img = load_rgb(source)
    except ImageLoadError as e:
        assert "\n" not in str(e) and e.reason
        return
    assert img.mode == "RGB" and img.size[0] >= 1 and img.size[1] >= 1
    img.getpixel((0, 0))


edits = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255), st.integers(0, 2)), max_size=6)


IMG_BUDGET_RANDOM = Budget("load_rgb random bytes")
IMG_BUDGET_MUTATED = Budget("load_rgb mutated images")


@FUZZ_IMAGES
@given(data=st.binary(max_size=3000), magic=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff",
                                                             b"GIF89a", b"BM", b"II*\x00", b"RIFF"]))
def test_fuzz_load_rgb_random_bytes(data, magic):
    if IMG_BUDGET_RANDOM.spent():
        return
    check_image_result(io.BytesIO(magic + data))


@FUZZ_IMAGES
@given(seed=st.sampled_from(range(len(SEEDS))), edits=edits, cut=st.none() | st.integers(0, 10**6),
       as_path=st.booleans())
def test_fuzz_load_rgb_mutated_images(seed, edits, cut, as_path):
    if IMG_BUDGET_MUTATED.spent():
        return
    data = mutate(SEEDS[seed], edits, cut)
    if as_path:
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / "img.bin"
            p.write_bytes(data)
            check_image_result(p)
    else:
        check_image_result(io.BytesIO(data))


# ---------------------------------------------------------------- zips

def snapshot(root: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            st_ = p.lstat()
            out[str(p.relative_to(root))] = (stat.S_IFMT(st_.st_mode), st_.st_size, st_.st_mtime_ns)
    return out


def check_zip_result(zip_bytes: bytes):
    """Extract into box/uploads; box/outside and everything else stay as they were."""
    with tempfile.TemporaryDirectory() as d:
        box = Path(d)
        (box / "outside" / "deep").mkdir(parents=True)
        (box / "outside" / "victim.txt").write_text("precious")
        z = box / "upload.zip"
        z.write_bytes(zip_bytes)
        before = snapshot(box)
        try:
            root = extract_dataset_zip(z, box / "uploads")
        except DatasetError as e:
            assert "\n" not in str(e)
            root = None
        after = snapshot(box)
        outside_after = {k: v for k, v in after.items() if not k.startswith("uploads")}
        assert outside_after == before, sorted(set(outside_after) ^ set(before))
        uploads = box / "uploads"
        if root is None:
            assert not uploads.exists() or not any(uploads.iterdir()), "a refused zip left files behind"
        else:
            assert uploads.resolve() in root.resolve().parents and (root / "train").is_dir()
            for dirpath, dirnames, filenames in os.walk(uploads):
                for n in dirnames + filenames:
                    p = Path(dirpath) / n
                    assert not p.is_symlink()
                    assert uploads.resolve() in Path(os.path.realpath(p)).parents


part = st.sampled_from(["..", ".", "", "train", "val", "cat", "fish", "x.jpg", "..\\..", "C:", "c:\\x", "~",
                        "\\", "a\\..\\..\\b", "ü.png", "x" * 300, " ", "...", "train\\cat"])
member = st.tuples(st.booleans(), st.lists(part, min_size=1, max_size=5), st.sampled_from(["/", "\\"])).map(
    lambda t: ("/" if t[0] else "") + t[2].join(t[1]))
entry = st.tuples(member, st.binary(max_size=64), st.sampled_from(["file", "dir", "symlink"]))

ZIP_BUDGET_NAMES = Budget("zip random member names")
ZIP_BUDGET_MUTATED = Budget("zip mutated bytes")


def build_zip(entries, good_prefix: bool) -> bytes:
    b = io.BytesIO()
    with zipfile.ZipFile(b, "w", zipfile.ZIP_DEFLATED) as zf:
        if good_prefix:
            for name in ("train/cat/1.jpg", "train/fish/1.jpg"):
                zf.writestr(name, b"jpeg-ish")
        for name, data, kind in entries:
            info = zipfile.ZipInfo(name + ("/" if kind == "dir" and not name.endswith("/") else ""))
            if kind == "symlink":
                info.create_system = 3
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, data)
    return b.getvalue()


@FUZZ_ZIPS
@given(entries=st.lists(entry, min_size=1, max_size=6), good_prefix=st.booleans())
def test_fuzz_zip_member_names(entries, good_prefix):
    if ZIP_BUDGET_NAMES.spent():
        return
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about duplicate names
        data = build_zip(entries, good_prefix)
    check_zip_result(data)


BASE_ZIP = build_zip([("val/cat/1.jpg", b"\xff\xd8\xff" + bytes(range(200)), "file"),
                      ("val/fish/1.jpg", b"z" * 3000, "file")], good_prefix=True)


@FUZZ_ZIPS
@given(edits=edits, cut=st.none() | st.integers(0, 10**6))
def test_fuzz_zip_mutated_bytes(edits, cut):
    if ZIP_BUDGET_MUTATED.spent():
        return
    check_zip_result(mutate(BASE_ZIP, edits, cut))


def test_fuzz_counts_report():
    """Runs last in this file: prints how many inputs each fuzz test tried."""
    print("\nRELIABILITY fuzz examples: " + ", ".join(f"{k}: {v}" for k, v in COUNTS.items()))
    assert sum(COUNTS.values()) > 0
