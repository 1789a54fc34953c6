"""Exports (export.py, core/export.py, deploy/predict_onnx.py): checkpoints of real
1-epoch train.py runs, exported and compared with the PyTorch model on real images."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, SHARED, absent

# name -> train.py flags beyond the common ones; each freeze policy of ResNet-18, and MobileNetV2
RUNS = {
    "resnet18-head": ["--policy", "head"],
    "resnet18-last": ["--policy", "last"],
    "resnet18-full": ["--policy", "full"],
    "mobilenet_v2-head": ["--arch", "mobilenet_v2", "--policy", "head"],  # real ImageNet features, catfish-mini
    "mobilenet_v2-last": ["--arch", "mobilenet_v2", "--policy", "last"],
    "mobilenet_v2-full": ["--arch", "mobilenet_v2", "--policy", "full"],
}
MOBILENET_WEIGHTS = SHARED / "weights" / "mobilenet_v2_imagenet_features.pth"
CATFISH_MINI = SHARED / "data" / "catfish-mini"
TOLERANCE = 1e-4  # max |logit difference| in float32 allowed against the PyTorch model


def cli(*args, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def main_of(script: str, *args) -> subprocess.CompletedProcess:
    """train.py / predict.py / export.py run in this process (their main(argv), as
    `python script.py` runs it, without paying for another `import torch`)."""
    import importlib
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = importlib.import_module(script.removesuffix(".py")).main([str(a) for a in args])
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())


def real_images() -> list[Path]:
    """Photos when ../shared has them, else the shipped drawings."""
    root = CATFISH_MINI / "val" if CATFISH_MINI.is_dir() else ROOT / "data" / "val"
    return sorted(root.rglob("*.jpg"))


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """name -> (best_acc.pt of a real 1-epoch train.py run, its export folder with all
    three formats), for each entry of RUNS (each arch x each freeze policy).
    MobileNetV2 head (on catfish-mini's photos with real ImageNet features, when
    ../shared has them) is trained and exported with `export.py --quantize int8`
    as separate processes, in the background while the other runs (random init,
    the shipped drawings) train and export in this one (both cores busy)."""
    from core.export import export_formats, load_source
    root = tmp_path_factory.mktemp("export_runs")
    env = {"TORCH_HOME": str(root / "torch_home"), "TL_OFFLINE": "1"}
    background = None
    if MOBILENET_WEIGHTS.is_file() and CATFISH_MINI.is_dir():
        chain = ('"$0" train.py --data-dir "$1" --weights "$2" --arch mobilenet_v2 --policy head --epochs 1 '
                 '--device cpu --output-dir "$3" --run-name mobilenet && '
                 '"$0" export.py --checkpoint "$3"/mobilenet_*/best_acc.pt --quantize int8')
        background = subprocess.Popen(["bash", "-c", chain, sys.executable, CATFISH_MINI, MOBILENET_WEIGHTS,
                                       root / "mobilenet"], cwd=ROOT, env={**os.environ, **env},
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    data = root / "data"  # a slice of the shipped drawings: 6 + 4 per class keeps three ResNet-18 runs cheap
    for split, n in (("train", 6), ("val", 4)):
        for cls in ("cat", "fish"):
            (data / split / cls).mkdir(parents=True)
            for p in sorted((ROOT / "data" / split / cls).glob("*.jpg"))[:n]:
                shutil.copy(p, data / split / cls / p.name)
    out = {}
    try:
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            for name, flags in RUNS.items():
                if name == "mobilenet_v2-head":  # the background run
                    continue
                extra = ["--export-state-dict", "1", "--export-full-model", "1"] if name == "resnet18-head" else []
                r = main_of("train.py", "--data-dir", data, "--weights", "none", "--epochs", "1",
                            "--device", "cpu", "--output-dir", root, "--run-name", name, *flags, *extra)
                assert r.returncode == 0, r.stderr
                ckpt = Path(re.search(r"^RUN_DIR: (.+)$", r.stdout, re.M).group(1)) / "best_acc.pt"
                if name == "resnet18-head" and background is None:  # the int8 run, here
                    r = main_of("export.py", "--checkpoint", ckpt, "--quantize", "int8")
                    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
                    (ckpt.parent / "export" / "cli_stdout.txt").write_text(r.stdout)
                    out[name] = (ckpt, ckpt.parent / "export")
                else:
                    list(export_formats(load_source(ckpt), ckpt.parent / "export"))
                    out[name] = (ckpt, ckpt.parent / "export")
        if background is not None:
            stdout, stderr = background.communicate(timeout=900)
            assert background.returncode == 0 and "Traceback" not in stderr, stderr
            ckpt = next((root / "mobilenet").glob("mobilenet_*/best_acc.pt"))
            (ckpt.parent / "export" / "cli_stdout.txt").write_text(stdout[stdout.index("CHECKPOINT: "):])
            out["mobilenet_v2-head"] = (ckpt, ckpt.parent / "export")
    finally:
        if background is not None and background.poll() is None:
            background.kill()
            background.communicate()
    return out


@pytest.fixture(scope="module")
def runs(made) -> dict[str, Path]:
    return {name: ckpt for name, (ckpt, _) in made.items()}


@pytest.fixture(scope="module")
def exports(made) -> dict[str, Path]:
    return {name: folder for name, (_, folder) in made.items()}


def run_or_skip(runs, name) -> Path:
    if name not in runs:
        absent(f"{name} needs ../shared's MobileNetV2 weights and catfish-mini photos, which are absent",
               "put them at ../shared or point TL_SHARED_DIR at a copy")
    return runs[name]


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_export_cli_writes_every_format_with_its_sidecar(runs, exports):
    name = "mobilenet_v2-head" if "mobilenet_v2-head" in runs else "resnet18-head"
    ckpt, out = runs[name], exports[name]
    assert out == ckpt.parent / "export"  # the default --out
    stdout = (out / "cli_stdout.txt").read_text()
    assert stdout.startswith(f"CHECKPOINT: {ckpt}\nformat: checkpoint dict\narch: {name.split('-')[0]}\n")
    for fmt, file in (("onnx", "model.onnx"), ("pt2", "model.pt2"), ("safetensors", "model.safetensors"),
                      ("json", "model.json")):
        assert f"  {fmt}: {out / file} (" in stdout, stdout
    diffs = [float(d) for d in re.findall(r"max \|logit diff\| vs PyTorch (\S+)\)", stdout)]
    assert len(diffs) == 2 and max(diffs) <= TOLERANCE, stdout

    saved = torch.load(ckpt, weights_only=True)
    meta = json.loads((out / "model.json").read_text())
    epoch_row = next(h for h in saved["history"] if h["epoch"] == saved["epoch"])
    assert meta["class_names"] == saved["class_names"] == ["cat", "fish"]
    assert meta["arch"] == name.split("-")[0] and meta["policy"] == "head"
    assert (meta["mean"], meta["std"]) == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert (meta["resize"], meta["crop"]) == (256, 224)
    assert (meta["input_name"], meta["output_name"]) == ("image", "logits")
    assert meta["input_shape"] == ["N", 3, 224, 224] and meta["output_shape"] == ["N", 2]
    assert meta["source"] == {"file": "best_acc.pt", "sha256": sha256(ckpt), "format": "checkpoint dict"}
    assert meta["best_epoch"] == saved["best_epoch"] and meta["best_val_acc"] == saved["best_val_acc"]
    assert meta["val_acc"] == epoch_row["val_acc"] and meta["val_loss"] == epoch_row["val_loss"]
    assert meta.get("temperature") == saved["temperature"]  # fitted on that epoch's val logits (issue 17)
    assert meta["files"] == {f: sha256(out / f) for f in
                             ("model.int8.onnx", "model.onnx", "model.pt2", "model.safetensors")}
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temp files

    import onnx
    model = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    (inp,), (outp,) = model.graph.input, model.graph.output
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert (inp.name, dims(inp), outp.name, dims(outp)) == ("image", ["batch", 3, 224, 224], "logits", ["batch", 2])
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT


@pytest.mark.parametrize("name", list(RUNS))
def test_onnx_and_pt2_match_pytorch_on_real_images(runs, exports, name):
    """ONNX Runtime and the .pt2 program loaded from disk against the PyTorch model:
    same top-1, max |logit difference| <= 1e-4, at batch sizes 1 and 7; and the
    safetensors export loads into the same model."""
    from core.data import normalize
    from core.export import load_pt2, onnx_session, read_safetensors_export
    from core.predict import Predictor

    ckpt = run_or_skip(runs, name)
    out = exports[name]
    pred = Predictor.load(ckpt)
    torch_model = pred.model.eval()
    session = onnx_session(out / "model.onnx")
    program = load_pt2(out / "model.pt2").module()
    paths = real_images()
    picked = [paths[i * len(paths) // 7] for i in range(7)]  # both classes
    x = normalize(torch.stack([pred.preprocess(p) for p in picked]))
    for batch in (x[:1], x):
        with torch.inference_mode():
            want = torch_model(batch)
            got_pt2 = program(batch)
        got_onnx = torch.from_numpy(session.run(["logits"], {"image": batch.numpy()})[0])
        for what, got in (("onnx", got_onnx), ("pt2", got_pt2)):
            assert got.shape == want.shape == (len(batch), 2)
            diff = float((got - want).abs().max())
            assert diff <= TOLERANCE, (name, what, len(batch), diff)
            assert torch.equal(got.argmax(1), want.argmax(1)), (name, what)

    loaded = read_safetensors_export(out / "model.safetensors")
    assert loaded.class_names == pred.class_names and (loaded.resize, loaded.crop) == (256, 224)
    assert loaded.info["arch"] == name.split("-")[0] and loaded.info["best_epoch"] == pred.info["best_epoch"]
    again = Predictor(loaded.model, loaded.class_names, "cpu", loaded.info, loaded.resize, loaded.crop)
    assert torch.equal(again.probabilities([Image.open(p) for p in picked]),
                       pred.probabilities([Image.open(p) for p in picked]))


def odd_images(folder: Path) -> Path:
    """Real photos plus the inputs whose decoding differs most: EXIF rotation, alpha,
    palette with transparency, grayscale, 16-bit, CMYK, a JPEG large enough for
    reduced-scale decoding, one smaller than the crop, and a damaged file."""
    folder.mkdir(parents=True)
    photos = real_images()
    for p in photos[::4]:
        shutil.copy(p, folder / p.name)
    base = Image.open(photos[1]).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    base.save(folder / "rotated.jpg", exif=exif.tobytes(), quality=92)
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(base.size))
    rgba.save(folder / "alpha.png")
    base.convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png", transparency=0)
    base.convert("L").save(folder / "gray.jpg")
    Image.fromarray((np.asarray(base.convert("L"), np.uint16) * 257)).save(folder / "deep16.png")
    base.convert("CMYK").save(folder / "cmyk.jpg")
    base.resize((base.width * 3, base.height * 3)).save(folder / "large.jpg", quality=90)
    base.resize((150, 100)).save(folder / "small.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return folder


@pytest.mark.parametrize("name", ["resnet18-full", "mobilenet_v2-head"])
def test_predict_onnx_without_torch_prints_what_predict_py_prints(runs, exports, name, tmp_path):
    ckpt = run_or_skip(runs, name)
    folder = odd_images(tmp_path / "images")
    blocker = tmp_path / "no_torch" / "torch"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('torch is blocked in this test')\n")
    check = cli("-c", "import torch", env={"PYTHONPATH": str(blocker.parent)})
    assert check.returncode != 0 and "torch is blocked" in check.stderr  # the block works

    ours = cli("deploy/predict_onnx.py", "--model", exports[name] / "model.onnx", "--image", folder, "--topk", "2",
               env={"PYTHONPATH": str(blocker.parent)})
    theirs = main_of("predict.py", "--checkpoint", ckpt, "--image", folder, "--all", "1", "--topk", "2",
                     "--device", "cpu")
    assert ours.returncode == 0 and "Traceback" not in ours.stderr, ours.stderr
    assert theirs.returncode == 0, theirs.stderr

    def lines(out):  # IMAGE, TOPK and p lines; an unreadable image's ERROR line without its wording
        return [("ERROR:" if s.startswith("ERROR:") else s) for s in out.splitlines()
                if s.startswith(("IMAGE:", "TOPK:", "ERROR:", "  1)", "  2)"))]
    assert lines(ours.stdout) == lines(theirs.stdout)
    assert lines(ours.stdout).count("TOPK:") == len(list(folder.iterdir())) - 1
    assert "ERROR:" in lines(ours.stdout) and "1 of" in ours.stderr


def test_int8_is_scored_against_float32_and_a_bad_one_is_flagged(runs, exports, tmp_path):
    """The CLI's INT8 numbers are those the files give on the val images; an int8
    model calibrated on unrepresentative images loses accuracy and says so loudly."""
    sys.path.insert(0, str(ROOT / "deploy"))
    from predict_onnx import OnnxClassifier

    from core.export import load_source, quantize_int8

    name = "mobilenet_v2-head" if "mobilenet_v2-head" in runs else "resnet18-head"
    out = exports[name]
    stdout = (out / "cli_stdout.txt").read_text()
    m = re.search(r"^  val accuracy on (\d+) image\(s\): float32 (\S+), int8 (\S+); top-1 agreement (\S+)$",
                  stdout, re.M)
    assert m and re.search(r"^INT8: .*model\.int8\.onnx .* calibrated on (\d+) training image", stdout, re.M), stdout
    val = sorted((CATFISH_MINI / "val" if name.startswith("mobilenet") else runs[name].parent.parent / "data" / "val")
                 .rglob("*.jpg"))
    labels = [p.parent.name for p in val]
    top = {}
    for model in ("model.onnx", "model.int8.onnx"):
        clf = OnnxClassifier(out / model)
        top[model] = [t[0][0] for _, t, _ in clf.predict_paths([str(p) for p in val], 1)]
    acc = {k: np.mean([a == b for a, b in zip(v, labels)]) for k, v in top.items()}
    agree = np.mean([a == b for a, b in zip(top["model.onnx"], top["model.int8.onnx"])])
    assert int(m.group(1)) == len(val)
    assert (m.group(2), m.group(3), m.group(4)) == (f"{acc['model.onnx']:.4f}", f"{acc['model.int8.onnx']:.4f}",
                                                    f"{agree:.4f}")
    assert "WARNING" not in stdout or acc["model.onnx"] - acc["model.int8.onnx"] > 0.01
    meta = json.loads((out / "model.json").read_text())
    assert meta["int8"]["val_acc_int8"] == pytest.approx(acc["model.int8.onnx"])

    if not name.startswith("mobilenet"):
        absent("the accuracy-drop half needs a model that is right on val (MobileNetV2 features from ../shared)",
               "put ../shared beside the checkout or point TL_SHARED_DIR at a copy")
    bad = tmp_path / "bad_calibration"  # all-black training images: activation ranges fit nothing real
    for c in ("cat", "fish"):
        (bad / "train" / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (300, 300)).save(bad / "train" / c / f"{i}.jpg")
    shutil.copytree(CATFISH_MINI / "val", bad / "val")
    report = quantize_int8(load_source(runs[name]), out / "model.onnx", tmp_path / "bad.int8.onnx", data_dir=bad)
    assert report.calibration_images == 4 and report.float_val_acc - report.int8_val_acc > 0.01
    assert not report.acceptable
    assert any(line.startswith("WARNING: int8 LOSES ACCURACY") for line in report.lines())


def test_corrupt_or_incomplete_exports_give_clear_errors(runs, exports, tmp_path):
    from core.errors import CheckpointError
    from core.export import load_pt2, onnx_session, read_safetensors_export

    src = exports["resnet18-head"]
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in ("model.onnx", "model.pt2", "model.safetensors", "model.json"):
        shutil.copy(src / f, bad / f)
    for f in ("model.onnx", "model.pt2", "model.safetensors"):
        data = (bad / f).read_bytes()
        (bad / f).write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match="not a loadable ONNX model"):
        onnx_session(bad / "model.onnx")
    with pytest.raises(CheckpointError, match="not a loadable torch.export program"):
        load_pt2(bad / "model.pt2")
    with pytest.raises(CheckpointError, match="describes another model.safetensors"):  # the JSON lists its SHA-256
        read_safetensors_export(bad / "model.safetensors")
    meta = json.loads((bad / "model.json").read_text())
    del meta["files"]
    (bad / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        read_safetensors_export(bad / "model.safetensors")

    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(src / "model.safetensors", alone / "model.safetensors")
    # ours carries a copy of its model.json (an upload to the app is one file); a foreign one does not
    loaded = read_safetensors_export(alone / "model.safetensors")
    assert loaded.class_names == ["cat", "fish"] and loaded.info["sidecar"].endswith("embedded model.json")
    from safetensors.torch import load_file, save_file
    save_file(load_file(alone / "model.safetensors"), alone / "foreign.safetensors")
    with pytest.raises(CheckpointError, match="foreign.json beside it, which is missing"):
        read_safetensors_export(alone / "foreign.safetensors")
    (alone / "model.json").write_text(json.dumps({**meta, "class_names": ["cat", "fish", "bird"]}))
    with pytest.raises(CheckpointError, match="names 3 classes but .* has 2 outputs"):
        read_safetensors_export(alone / "model.safetensors")
    (alone / "model.json").write_text(json.dumps({**meta, "arch": "mobilenet_v2"}))
    with pytest.raises(CheckpointError, match="mobilenet_v2"):
        read_safetensors_export(alone / "model.safetensors")

    # the command-line tools: one error line, exit 2, no traceback
    r = cli("deploy/predict_onnx.py", "--model", bad / "model.onnx", "--image", real_images()[0])
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "not a loadable ONNX model" in r.stderr
    assert "Traceback" not in r.stderr
    shutil.copy(src / "model.onnx", alone / "model.onnx")
    (alone / "model.json").unlink()
    r = cli("deploy/predict_onnx.py", "--model", alone / "model.onnx", "--image", real_images()[0])
    assert r.returncode == 2 and "model.json is missing" in r.stderr and "Traceback" not in r.stderr
    # a model.onnx left beside another checkpoint's model.json (two exports into one folder): refused, not run
    # with the other model's classes, preprocessing and temperature; a renamed file of the JSON's export runs
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(src / "model.onnx", mixed / "model.onnx")
    shutil.copy(exports["resnet18-last"] / "model.json", mixed / "model.json")
    r = cli("deploy/predict_onnx.py", "--model", mixed / "model.onnx", "--image", real_images()[0])
    assert r.returncode == 2 and "describes another export" in r.stderr and "Traceback" not in r.stderr, r.stderr
    shutil.copy(exports["resnet18-last"] / "model.onnx", mixed / "renamed.onnx")
    r = cli("deploy/predict_onnx.py", "--model", mixed / "renamed.onnx", "--image", real_images()[0])
    assert r.returncode == 0 and "TOPK:" in r.stdout, r.stderr
    r = main_of("export.py", "--checkpoint", bad / "model.safetensors", "--format", "onnx", "--out", tmp_path / "o")
    assert r.returncode == 2 and "not a readable safetensors file" in r.stderr and "Traceback" not in r.stderr
    r = main_of("export.py", "--checkpoint", runs["resnet18-head"], "--format", "onnx,tflite")
    assert r.returncode == 2 and "'tflite' is not an export format" in r.stderr and "Traceback" not in r.stderr


def test_state_dict_and_full_model_export(runs, tmp_path):
    """The other checkpoint kinds predict.py accepts: a bare state_dict with
    --arch/--classes, a full pickled model only with --trust-pickle 1."""
    from core.export import export_checkpoint, load_pt2, read_safetensors_export

    run = runs["resnet18-head"].parent
    r = main_of("export.py", "--checkpoint", run / "state_dict.pt", "--arch", "resnet18", "--classes",
                "kitten,trout", "--format", "safetensors", "--out", tmp_path / "sd")
    assert r.returncode == 0, r.stderr
    assert "format: state_dict" in r.stdout and "class_names: ['kitten', 'trout']" in r.stdout
    loaded = read_safetensors_export(tmp_path / "sd" / "model.safetensors")
    assert loaded.class_names == ["kitten", "trout"]
    want = torch.load(run / "state_dict.pt", weights_only=True)
    assert all(torch.equal(v, want[k]) for k, v in loaded.model.state_dict().items())

    r = main_of("export.py", "--checkpoint", run / "full_model.pt", "--format", "pt2", "--out", tmp_path / "full")
    assert r.returncode == 2 and "--trust-pickle 1" in r.stderr and not (tmp_path / "full").exists()
    found, report = export_checkpoint(run / "full_model.pt", tmp_path / "full", ["pt2"], trust_pickle=True)
    files = {f.format: f for f in found}
    assert list(files) == ["pt2", "json"] and report is None and files["pt2"].max_abs_diff <= TOLERANCE
    x = torch.randn(3, 3, 224, 224)
    with torch.inference_mode():
        want = torch.load(run / "full_model.pt", weights_only=False).eval()(x)
        assert torch.allclose(load_pt2(files["pt2"].path).module()(x), want, atol=TOLERANCE)
    assert json.loads(files["json"].path.read_text())["source"]["format"] == "full model (pickle)"


def test_temperature_is_carried_into_model_json_and_applied(runs, exports, tmp_path):
    """A checkpoint with a temperature (issue 17's calibration): model.json records it
    and predict_onnx.py divides the logits by it before the softmax."""
    from core.data import normalize
    from core.export import export_formats, load_source
    from core.predict import Predictor

    saved = torch.load(runs["resnet18-head"], weights_only=True)
    ckpt = tmp_path / "calibrated.pt"
    torch.save({**saved, "temperature": 0.05}, ckpt)
    source = load_source(ckpt)
    assert source.meta["temperature"] == 0.05 and source.meta["probabilities"] == "softmax(logits / temperature)"
    files = {f.format: f.path for f in export_formats(source, tmp_path / "export", ["safetensors"])}
    assert json.loads(files["json"].read_text())["temperature"] == 0.05
    shutil.copy(exports["resnet18-head"] / "model.onnx", tmp_path / "export" / "model.onnx")  # the same weights
    meta = json.loads(files["json"].read_text())
    del meta["files"]  # (their ONNX copied, not exported again: the JSON's SHA-256 list would refuse it)
    files["json"].write_text(json.dumps(meta))

    image = real_images()[0]
    r = cli("deploy/predict_onnx.py", "--model", tmp_path / "export" / "model.onnx", "--image", image)
    assert r.returncode == 0, r.stderr
    pred = Predictor.load(ckpt)
    with torch.inference_mode():
        logits = pred.model(normalize(pred.preprocess(image)[None]))
    p = torch.softmax(logits / 0.05, 1)[0]  # small T: sharp, unlike the plain softmax of these weights
    top = int(p.argmax())
    assert f"{float(torch.softmax(logits, 1)[0][top]):.4f}" != f"{float(p[top]):.4f}"  # T makes a difference here
    assert f"  1) {pred.class_names[top]}  p={float(p[top]):.4f}" in r.stdout.splitlines(), r.stdout


def test_predict_py_takes_an_exported_model_safetensors(runs, exports, tmp_path):
    """predict.py --checkpoint model.safetensors: architecture, classes and
    preprocessing from its model.json; the same lines as its checkpoint gives;
    one clear error line (exit 2) when the JSON is missing or is another model's."""
    ckpt, out = runs["resnet18-last"], exports["resnet18-last"]
    folder = real_images()[0].parent.parent
    flags = ["--image", folder, "--all", "1", "--topk", "2", "--device", "cpu"]
    ours = main_of("predict.py", "--checkpoint", out / "model.safetensors", *flags, "--classes", "a,b")
    theirs = main_of("predict.py", "--checkpoint", ckpt, *flags)
    assert ours.returncode == 0 and theirs.returncode == 0, ours.stderr + theirs.stderr
    assert "format: safetensors export" in ours.stdout and "class_names: ['cat', 'fish']" in ours.stdout
    assert "--classes ignored" in ours.stderr

    def lines(text):
        return [s for s in text.splitlines() if s.startswith(("IMAGE:", "TOPK:", "  1)", "  2)"))]
    assert lines(ours.stdout) == lines(theirs.stdout) and len(lines(ours.stdout)) > 8

    from safetensors.torch import load_file, save_file
    save_file(load_file(out / "model.safetensors"), tmp_path / "weights.safetensors")  # no model.json anywhere
    r = main_of("predict.py", "--checkpoint", tmp_path / "weights.safetensors", *flags)
    assert r.returncode == 2 and "weights.json beside it, which is missing" in r.stderr and "Traceback" not in r.stderr
    shutil.copy(out / "model.safetensors", tmp_path / "model.safetensors")
    meta = json.loads((out / "model.json").read_text())
    (tmp_path / "model.json").write_text(json.dumps({**meta, "class_names": ["cat", "fish", "bird"]}))
    r = main_of("predict.py", "--checkpoint", tmp_path / "model.safetensors", *flags)
    assert r.returncode == 2 and "names 3 classes but" in r.stderr and "Traceback" not in r.stderr, r.stderr
    (tmp_path / "model.json").write_text(json.dumps({**meta, "arch": "mobilenet_v2"}))
    r = main_of("predict.py", "--checkpoint", tmp_path / "model.safetensors", *flags)
    assert r.returncode == 2 and "says mobilenet_v2 but" in r.stderr and "resnet18 weights" in r.stderr, r.stderr


def test_the_readme_snippet_runs_and_agrees_with_predict_onnx(runs, exports, tmp_path):
    """The README's plain-Python snippet (model.onnx + model.json), run as written
    from a folder holding export/ and photo.jpg: the class it names has, by
    deploy/predict_onnx.py's exact preprocessing, the probability it prints (±0.02)."""
    text = (ROOT / "README.md").read_text()
    snippet = re.search(r"<!-- export-snippet -->\n```python\n(.*?)```", text, re.S).group(1)
    assert len(snippet.strip().splitlines()) <= 10
    name = "mobilenet_v2-head" if "mobilenet_v2-head" in runs else "resnet18-head"
    (tmp_path / "export").mkdir()
    for f in ("model.onnx", "model.json"):
        shutil.copy(exports[name] / f, tmp_path / "export" / f)
    photo = real_images()[-1]
    shutil.copy(photo, tmp_path / "photo.jpg")
    r = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    label, p = r.stdout.split()
    ref = cli("deploy/predict_onnx.py", "--model", tmp_path / "export" / "model.onnx", "--image", photo, "--topk", "2")
    ref_p = dict(re.findall(r"^  \d\) (\S+)  p=(\S+)$", ref.stdout, re.M))
    assert abs(float(p) - float(ref_p[label])) <= 0.02, (r.stdout, ref.stdout)
