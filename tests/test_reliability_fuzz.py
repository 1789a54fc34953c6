"""Issue 5.6: time-bounded fuzzing of the parsers that take files from
strangers. load_rgb: random bytes and mutated valid images of every supported
format -> an RGB image or ImageLoadError, nothing else. extract_dataset_zip:
random member names (.., absolute, backslashes, drive letters, links) and
mutated zip bytes -> a dataset folder inside the destination or DatasetError,
and nothing is ever written outside the destination. Issue 15: checkpoint
dicts of a real run with mutated fields, types, shapes and values -> a
prediction with finite probabilities summing to 1 (and a resumable state), or
the tool's own UserError, nothing else."""
from __future__ import annotations

import io
import os
import stat
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from core.errors import DatasetError, ImageLoadError, UserError
from core.images import load_rgb
from core.zipimport import extract_dataset_zip

BUDGET_S = 20  # per fuzz test; examples after the budget return at once
FUZZ = dict(deadline=None, database=None, derandomize=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FUZZ_IMAGES = settings(max_examples=1500, **FUZZ)
FUZZ_ZIPS = settings(max_examples=500, **FUZZ)
COUNTS: dict[str, int] = {}


class Budget:
    def __init__(self, name, seconds=BUDGET_S):
        self.name, self.seconds, self.end = name, seconds, None

    def spent(self) -> bool:
        if self.end is None:
            self.end = time.monotonic() + self.seconds
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


# ---------------------------------------------------------------- checkpoints

# Each example saves, loads, predicts and restores a whole model (~0.1-0.5 s): a larger
# budget than the parsers'. TL_FUZZ_SECONDS / TL_FUZZ_EXAMPLES run it longer by hand.
FUZZ_CHECKPOINTS = settings(max_examples=int(os.environ.get("TL_FUZZ_EXAMPLES", 400)), **FUZZ)
CKPT_BUDGET = Budget("checkpoint dicts", float(os.environ.get("TL_FUZZ_SECONDS", 30)))


@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory):
    """latest.pt of a real 1-epoch MobileNetV2 run (random init, 32-pixel images:
    more examples in the budget) and an image. One torch thread meanwhile: the
    hundreds of small per-tensor checks are faster without a thread pool."""
    from conftest import make_image_dataset, train_config, train_run
    tmp = tmp_path_factory.mktemp("fuzz_ckpt")
    data = make_image_dataset(tmp / "ds")
    _, _, end = train_run(train_config(data, tmp / "out", arch="mobilenet_v2", epochs=1, device="cpu",
                                       image_size=32, resize_size=32))
    ckpt = torch.load(Path(end.run_dir) / "latest.pt", weights_only=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield {"ckpt": ckpt, "data": data, "image": Image.open(next((data / "val" / "cat").iterdir())).convert("RGB"),
           "file": tmp / "fuzzed.pt"}
    torch.set_num_threads(threads)


scalar = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats()
          | st.sampled_from([0, 1, 2, -1, 31, 32, 224, 256, 1024, 1025, 10**4, 10**6, 2**63, 2**2000, 0.5, 1.5])
          | st.text(max_size=6))
tensor = st.builds(lambda shape, dtype, fill: torch.full(shape, fill).to(dtype),
                   st.lists(st.integers(0, 4), max_size=3),
                   st.sampled_from([torch.float32, torch.float16, torch.float64, torch.int64, torch.bool, torch.uint8]),
                   st.sampled_from([0.0, 1.0, -1.0, 0.5, float("nan"), float("inf"), 3e38]))
value = st.recursive(scalar | tensor, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3)
                     | st.tuples(c, c), max_leaves=6)
FIELDS = ["epoch", "best_epoch", "best_loss_epoch", "best_val_acc", "best_val_loss", "class_names", "weights", "args",
          "history", "arch", "policy", "head", "preprocess", "format_version", "temperature", "val_confusion",
          "optimizer_state", "scaler_state", "model_state", "unknown",
          "preprocess.resize", "preprocess.crop", "preprocess.mean", "head.num_classes", "head.dropout",
          "class_names.0", "class_names.1", "args.dropout", "args.arch", "args.policy", "args.image_size",
          "args.resize_size", "args.epochs", "args.seed", "args.val_split", "args.freeze_backbone", "args.data_dir",
          "history.0", "history.0.epoch", "history.0.val_loss", "val_confusion.0", "scaler_state.scale",
          "optimizer_state.state", "optimizer_state.param_groups.0.lr", "optimizer_state.param_groups.0.betas",
          "optimizer_state.param_groups.0.eps", "optimizer_state.param_groups.0.params",
          "optimizer_state.state.0.exp_avg", "optimizer_state.state.0.exp_avg_sq", "optimizer_state.state.0.step"]
field_edit = st.tuples(st.just("field"), st.sampled_from(FIELDS), st.sampled_from(["set", "delete"]), value)
tensor_edit = st.tuples(st.just("tensor"), st.integers(0, 10**6),
                        st.sampled_from(["delete", "fill", "one", "flatten", "transpose", "half", "int", "bool",
                                         "scale", "replace", "extra"]),
                        st.sampled_from([float("nan"), float("inf"), -1.0, 0.0, 1e38, 3e38, 1e-30]) | tensor)


def edit(obj, dotted: str, op: str, new):
    """obj with the value at a dotted path (dict keys, list indices) set or removed; copies along the path."""
    head, _, rest = dotted.partition(".")
    if isinstance(obj, dict):
        key = int(head) if head.isdigit() and int(head) in obj else head  # optimizer state is keyed by ints
        out = dict(obj)
        if rest:
            if key in out:
                out[key] = edit(out[key], rest, op, new)
        elif op == "delete":
            out.pop(key, None)
        else:
            out[key] = new
        return out
    if isinstance(obj, (list, tuple)) and head.isdigit() and int(head) < len(obj):
        out = list(obj)
        i = int(head)
        if rest:
            out[i] = edit(out[i], rest, op, new)
        elif op == "delete":
            del out[i]
        else:
            out[i] = new
        return type(obj)(out) if isinstance(obj, list) else tuple(out)
    return obj


def edit_tensor(ckpt: dict, keys: list, pick: int, op: str, arg) -> dict:
    state = dict(ckpt["model_state"])
    key = keys[pick % len(keys)]
    t = state[key]
    if not torch.is_tensor(t):  # an earlier edit put something else there
        return ckpt
    number = arg if isinstance(arg, float) else 1.0
    if op == "delete":
        del state[key]
    elif op == "extra":
        state[key + "_extra"] = t.clone()
    elif op == "replace":
        state[key] = arg if torch.is_tensor(arg) else torch.tensor(arg)
    elif op == "fill":
        state[key] = torch.full_like(t, number) if t.is_floating_point() else t.clone().fill_(int(number) if
                                                                                                abs(number) < 1e9 else 0)
    elif op == "one" and t.numel() and t.is_floating_point():
        state[key] = t.clone(memory_format=torch.contiguous_format)
        state[key].view(-1)[pick % t.numel()] = number
    elif op == "flatten":
        state[key] = t.reshape(-1)
    elif op == "transpose" and t.dim() >= 2:
        state[key] = t.transpose(0, 1).contiguous()
    elif op == "half":
        state[key] = t.half()
    elif op == "int":
        state[key] = t.long()
    elif op == "bool":
        state[key] = t.bool()
    elif op == "scale" and t.is_floating_point():
        state[key] = t * number
    return dict(ckpt, model_state=state)


def check_checkpoint_result(path: Path, real: dict):
    """Predict: finite probabilities summing to 1, or a UserError. Resume
    (the checkpoint read, the run's settings, model, optimizer and loss
    scaler restored): done, or a UserError."""
    from core import checkpoint as ck
    from core.config import TrainConfig
    from core.engine import make_grad_scaler, make_optimizer
    from core.resume import read_resume, restore_optimizer
    from core.models import apply_policy
    from core.predict import Predictor
    try:
        pred = Predictor.load(path)
        probs = pred.probabilities([real["image"]])
        assert probs.shape == (1, len(pred.class_names)) and bool(torch.isfinite(probs).all())
        assert abs(float(probs.sum()) - 1) < 1e-3
        top = pred.predict_image(real["image"], 3)
        assert top and all(isinstance(label, str) and 0 <= p <= 1 for label, p in top)
    except UserError as e:
        assert str(e) and "\n" not in str(e), str(e)
    try:
        ckpt = ck.read_checkpoint(path)
        cfg = TrainConfig(data_dir=str(real["data"]), resume=str(path), epochs=10_000, weights="none", device="cpu")
        ckpt, _ = read_resume(cfg, ckpt)
        model = ck.model_from_checkpoint(ckpt, path)
        apply_policy(model, cfg.arch, cfg.policy)
        optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg, torch.device("cpu"))
        if ckpt.get("optimizer_state"):
            restore_optimizer(optimizer, ckpt["optimizer_state"], cfg)
        cfg.amp = True
        make_grad_scaler(cfg, torch.device("cpu"), ckpt.get("scaler_state"), kind="cpu")
    except UserError as e:
        assert str(e) and "\n" not in str(e), str(e)


@FUZZ_CHECKPOINTS
@given(edits=st.lists(field_edit | tensor_edit, min_size=1, max_size=3))
def test_fuzz_checkpoint_dicts(real_checkpoint, edits):
    if CKPT_BUDGET.spent():
        return
    real = real_checkpoint
    ckpt = real["ckpt"]
    for kind, where, op, arg in edits:
        if kind == "field":
            ckpt = edit(ckpt, where, op, arg)
        elif isinstance(ckpt.get("model_state"), dict) and ckpt["model_state"]:
            ckpt = edit_tensor(ckpt, list(ckpt["model_state"]), where, op, arg)
    torch.save(ckpt, real["file"])
    check_checkpoint_result(real["file"], real)


def test_fuzz_counts_report():
    """Runs last in this file: prints how many inputs each fuzz test tried."""
    print("\nRELIABILITY fuzz examples: " + ", ".join(f"{k}: {v}" for k, v in COUNTS.items()))
    assert sum(COUNTS.values()) > 0
