"""Grad-CAM on a real model: MobileNetV2 with its real ImageNet features
(../shared), head trained on the shipped drawings. The pointing game on the
drawings' recorded boxes (data/boxes.json), then `predict.py --cam` for every
model-file format, name clashes, an EXIF-rotated photo and bad flags.
Needs ../shared (skipped where absent, a failure under CI)."""
from __future__ import annotations

import copy
import functools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, need_shared, train_config, train_run

DATA = ROOT / "data"
BOXES = json.loads((DATA / "boxes.json").read_text())["boxes"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Head-only MobileNetV2 on data/ (real features, feature cache): ~20 s."""
    weights = need_shared("weights/mobilenet_v2_imagenet_features.pth")
    tmp = tmp_path_factory.mktemp("cam_run")
    cfg = train_config(DATA, tmp / "ck", arch="mobilenet_v2", weights=str(weights), policy="head", cache="auto",
                       augment="none", epochs=5, lr=0.01, batch_size=16, seed=0)
    _, epochs, end = train_run(cfg)
    assert end.status == "completed"
    from core.checkpoint import export_full_model, export_state_dict
    from core.predict import Predictor
    best = Path(end.run_dir) / "best_acc.pt"
    pred = Predictor.load(best)
    assert pred.info["arch"] == "mobilenet_v2" and pred.class_names == ["cat", "fish"]
    export_state_dict(pred.model, tmp / "weights.pt")
    export_full_model(copy.deepcopy(pred.model), pred.class_names, tmp / "full.pt")
    return {"dict": best, "state_dict": tmp / "weights.pt", "full": tmp / "full.pt", "pred": pred, "tmp": tmp}


def pointing(pred, names):
    """(hits, random-point rate): the CAM's maximum for the true class inside the
    animal's box, against a uniformly random point's chance (the box's area share)."""
    from core.cam import cam_for_image
    from core.images import load_rgb
    crops = torch.stack([pred.preprocess(DATA / n) for n in names])
    classes = [pred.class_names.index(n.split("/")[1]) for n in names]
    maps = np.concatenate([pred.cam(crops[i:i + 16], classes[i:i + 16]) for i in range(0, len(names), 16)])
    hits, share = 0, []
    for name, m in zip(names, maps):
        cam = cam_for_image(m, load_rgb(DATA / name), pred.resize, pred.crop)
        y, x = np.unravel_index(cam.argmax(), cam.shape)
        x0, y0, x1, y1 = BOXES[name]
        hits += bool(x0 <= x < x1 and y0 <= y < y1)
        share.append((x1 - x0) * (y1 - y0) / cam.size)
    return hits, float(np.mean(share))


def test_pointing_game_on_the_drawings(trained):
    """val/ drawings (small, off-centre animals among clutter): the CAM's peak
    falls inside the animal's box far more often than a random point would."""
    names = sorted(n for n in BOXES if n.startswith("val/"))
    hits, chance = pointing(trained["pred"], names)
    rate = hits / len(names)
    print(f"\nPOINTING: {hits}/{len(names)} = {rate:.3f} (random point: {chance:.3f})")
    assert rate >= 2 * chance, (hits, chance)


@pytest.fixture
def predict(capsys):
    """predict.py's main() with these flags: (exit code, stdout, stderr)."""
    import predict as cli

    def run(*args):
        capsys.readouterr()
        rc = cli.main(["--device", "cpu", *map(str, args)])
        out = capsys.readouterr()
        return rc, out.out, out.err
    return run


def load_cam(folder, stem):
    npy = np.load(folder / f"{stem}_cam.npy", allow_pickle=False)
    png = Image.open(folder / f"{stem}_cam.png")
    return npy, png


@functools.lru_cache(maxsize=None)
def expected_cam(pred, path, class_name=None):
    """The map computed in-process from the checkpoint dict's model."""
    from core.cam import cam_for_image
    from core.images import load_rgb
    label = class_name or pred.predict_image(path, 1)[0][0]
    m = pred.cam(pred.preprocess(path)[None], [pred.class_names.index(label)])[0]
    return cam_for_image(m, load_rgb(path), pred.resize, pred.crop)


def test_cam_files_for_every_format_and_mode(trained, tmp_path, predict):
    """The same weights in three file formats give the same maps, in the files'
    promised shape and range; the PNG is the blend at the image's own size."""
    pred = trained["pred"]
    folder = tmp_path / "imgs"
    # two images with the same stem in different folders (--all must keep both), one non-square
    (folder / "cat").mkdir(parents=True)
    (folder / "fish").mkdir()
    Image.open(DATA / "val/cat/cat_003.jpg").save(folder / "cat" / "x.jpg", quality=95)
    Image.open(DATA / "val/fish/fish_005.jpg").save(folder / "fish" / "x.jpg", quality=95)
    Image.open(DATA / "val/cat/cat_010.jpg").resize((300, 200)).save(folder / "wide.png")
    other = next(c for c in pred.class_names if c != pred.predict_image(folder / "wide.png", 1)[0][0])
    runs = {
        "dict": ["--checkpoint", trained["dict"], "--image", folder, "--all", "1"],
        "state_dict": ["--checkpoint", trained["state_dict"], "--arch", "mobilenet_v2", "--classes", "cat,fish",
                       "--image", folder / "wide.png", "--cam-class", other],
        "full": ["--checkpoint", trained["full"], "--trust-pickle", "1", "--image", folder, "--random", "1",
                 "--n", "3", "--seed", "1"],
    }
    for fmt, args in runs.items():
        out = tmp_path / f"cam_{fmt}"
        rc, stdout, stderr = predict(*args, "--cam", out)
        assert rc == 0, stdout + stderr
        written = sorted(p.name for p in out.iterdir())
        if fmt == "state_dict":
            stems = {"wide": (folder / "wide.png", other)}
        else:  # the clash: cat/x.jpg and fish/x.jpg get their folder's name in front
            stems = {"cat_x": (folder / "cat/x.jpg", None), "fish_x": (folder / "fish/x.jpg", None),
                     "wide": (folder / "wide.png", None)}
        assert written == sorted(f"{s}_cam.{e}" for s in stems for e in ("npy", "png")), written
        assert f"CAMS: {len(stems)} written to {out}" in stdout
        for stem, (src, cls) in stems.items():
            npy, png = load_cam(out, stem)
            w, h = Image.open(src).size
            assert npy.dtype == np.float32 and npy.shape == (h, w) and png.size == (w, h)
            assert npy.min() >= 0 and npy.max() <= 1 and npy.max() > 0.5
            # alignment: the file's map is the in-process map of the same image (same weights, same crop)
            assert np.abs(npy - expected_cam(pred, src, cls)).max() < 1e-3, (fmt, stem)
            # the PNG is the blend of that map over the image
            from core.cam import blend_cam
            blend = np.asarray(blend_cam(Image.open(src).convert("RGB"), npy, 0.5), np.int16)
            assert np.abs(np.asarray(png.convert("RGB"), np.int16) - blend).max() <= 1
    # --cam-class: another class's map
    top1 = expected_cam(pred, folder / "wide.png")
    assert not np.allclose(load_cam(tmp_path / "cam_state_dict", "wide")[0], top1, atol=1e-2)


def test_exif_rotated_photo(trained, tmp_path, predict):
    """A photo stored sideways with EXIF Orientation=6 (as phones save them):
    the .npy has the upright image's height x width, and its peak lies on the animal."""
    pred = trained["pred"]
    name = "val/fish/fish_005.jpg"  # a fish left of centre
    drawing = Image.open(DATA / name).convert("RGB")
    upright = Image.new("RGB", (256, 320), drawing.getpixel((0, 0)))  # portrait: 256 wide, 320 tall
    upright.paste(drawing, (0, 32))
    x0, y0, x1, y1 = BOXES[name]
    y0, y1 = y0 + 32, y1 + 32
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what the sensor wrote: 320 wide, 256 tall
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
    photo = tmp_path / "phone.jpg"
    stored.save(photo, quality=95, exif=exif)
    upright.save(tmp_path / "upright.jpg", quality=95)
    out = tmp_path / "cams"
    rc, stdout, stderr = predict("--checkpoint", trained["dict"], "--image", photo, "--cam", out, "--cam-class", "fish")
    assert rc == 0, stdout + stderr
    npy, png = load_cam(out, "phone")
    assert npy.shape == (320, 256) and png.size == (256, 320)
    y, x = np.unravel_index(npy.argmax(), npy.shape)
    assert x0 <= x < x1 and y0 <= y < y1, ((x, y), (x0, y0, x1, y1))
    # and it is the map of the upright picture (up to JPEG's re-encoding)
    upright_cam = expected_cam(pred, tmp_path / "upright.jpg", "fish")
    assert np.corrcoef(npy.ravel(), upright_cam.ravel())[0, 1] > 0.95


def test_cam_flag_mistakes_are_caught_before_any_work(trained, tmp_path, predict):
    img = DATA / "val/cat/cat_003.jpg"
    rc, _, err = predict("--checkpoint", trained["dict"], "--image", img, "--cam", tmp_path / "c", "--cam-class", "dog")
    assert rc == 2 and "--cam-class 'dog' is not one of the model's classes; choose one of cat, fish" in err, err
    assert not list((tmp_path / "c").iterdir())
    rc, _, err = predict("--checkpoint", trained["dict"], "--image", img, "--cam-class", "cat")
    assert rc == 2 and "--cam-class needs --cam" in err, err
    (tmp_path / "file").write_text("x")
    rc, _, err = predict("--checkpoint", trained["dict"], "--image", img, "--cam", tmp_path / "file")
    assert rc == 2 and "--cam" in err and "is a file, not a folder" in err, err


def test_without_cam_prediction_does_no_cam_work(trained):
    """Plain prediction never imports Captum nor computes a gradient."""
    code = ("import sys, torch, predict\n"
            "calls = []\n"
            "from core.predict import Predictor\n"
            "Predictor.cam = lambda *a, **k: calls.append(1)\n"
            f"rc = predict.main(['--checkpoint', {str(trained['dict'])!r}, '--image', {str(DATA / 'val' / 'cat')!r}, '--all', '1'])\n"
            "print('RESULT', rc, 'captum' in sys.modules, calls)\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "RESULT 0 False []" in p.stdout, p.stdout + p.stderr


def test_a_model_without_a_cam_layer_is_refused_before_any_work(tmp_path, predict):
    """A full pickled model of another shape predicts, but --cam names the reason at once."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 2)).eval()
    torch.save(model, tmp_path / "other.pt")
    img = DATA / "val/cat/cat_003.jpg"
    args = ["--checkpoint", tmp_path / "other.pt", "--trust-pickle", "1", "--image", img]
    assert predict(*args)[0] == 0
    rc, out, err = predict(*args, "--cam", tmp_path / "cams")
    assert rc == 2 and "Grad-CAM needs a ResNet-18 or MobileNetV2 model; this Sequential has neither" in err, err
    assert "IMAGE:" not in out and not list((tmp_path / "cams").iterdir())
