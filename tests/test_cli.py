"""The command-line tools end to end, as a user types them."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT

EPOCH_RE = re.compile(r"^EPOCH (\d+)/(\d+)  train_loss=(\d+\.\d{4}) train_acc=(\d\.\d{4})  "
                      r"val_loss=(\d+\.\d{4}) val_acc=(\d\.\d{4})  lr=([\d.e-]+)$")


def cli(*args, timeout=600, env=None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def run_dir_of(out: str) -> Path:
    return Path(re.search(r"^RUN_DIR: (.+)$", out, re.M).group(1))


@pytest.mark.slow
def test_train_mobilenet_imagenet_features_on_real_photos(catfish_mini, mobilenet_weights, tmp_path):
    """Real ImageNet features + head-only training on real photos must reach >= 0.95 val acc in 5 epochs."""
    r = cli("train.py", "--data-dir", str(catfish_mini), "--device", "cpu", "--epochs", "5", "--batch-size", "16",
            "--lr", "0.001", "--weight-decay", "0.0001", "--freeze-backbone", "1", "--unfreeze-last", "0",
            "--unfreeze-all", "0", "--seed", "1337", "--num-workers", "0", "--amp", "0",
            "--arch", "mobilenet_v2", "--weights", str(mobilenet_weights), "--output-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "DATASET:" in out and "train: 40 images | classes=['cat', 'fish'] | per_class={'cat': 20, 'fish': 20}" in out
    epochs = [EPOCH_RE.match(line) for line in out.splitlines() if line.startswith("EPOCH")]
    assert len(epochs) == 5 and all(epochs), out
    accs = [float(m.group(6)) for m in epochs]
    assert max(accs) >= 0.95, accs
    assert "BEST:" in out and re.search(r"best_acc=(\d\.\d{4}) \(epoch (\d+)\) -> .*best_acc\.pt", out)
    run_dir = run_dir_of(out)
    assert {p.name for p in run_dir.iterdir()} >= {"latest.pt", "best_acc.pt", "best_loss.pt", "args.json", "metrics.csv"}

    # predict with the best checkpoint: the reference's header and TOPK lines
    img = sorted((catfish_mini / "val" / "fish").iterdir())[0]
    p = cli("predict.py", "--image", str(img), "--checkpoint", str(run_dir / "best_acc.pt"), "--device", "cpu", "--topk", "2")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == f"CHECKPOINT: {run_dir / 'best_acc.pt'}"
    assert any(line.startswith("best_epoch: ") for line in lines) and "class_names: ['cat', 'fish']" in lines
    probs = re.findall(r"^  [12]\) (cat|fish)  p=(\d\.\d{4})$", p.stdout, re.M)
    assert len(probs) == 2 and abs(sum(float(x) for _, x in probs) - 1) < 2e-3
    assert probs[0][0] == "fish"


def test_print_model_and_policy_flags(tiny_dataset, tmp_path):
    r = cli("train.py", "--data-dir", str(tiny_dataset), "--device", "cpu", "--epochs", "1", "--weights", "none",
            "--unfreeze-last", "1", "--print-model", "1", "--output-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "BASE MODEL (resnet18, ImageNet head with 1000 outputs)" in out
    assert "(fc): Linear(in_features=512, out_features=1000, bias=True)" in out
    assert "(fc): Linear(in_features=512, out_features=2, bias=True)" in out
    for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc"):
        assert f"\n  {name}: " in out
    assert "policy=last" in out
    assert re.search(r"head  trainable=1,026 / total=11,177,538", out)
    assert re.search(r"last  trainable=8,394,754 / total=11,177,538", out)
    assert re.search(r"full  trainable=11,177,538 / total=11,177,538", out)


def test_exports_and_every_load_path(tiny_dataset, tmp_path):
    r = cli("train.py", "--data-dir", str(tiny_dataset), "--device", "cpu", "--epochs", "2", "--weights", "none",
            "--export-state-dict", "1", "--export-full-model", "1", "--output-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    run_dir = run_dir_of(r.stdout)
    img = str(tiny_dataset / "val" / "fish" / "fish_0.jpg")

    def top(args):
        p = cli("predict.py", "--image", img, "--device", "cpu", "--topk", "2", *args)
        return p, re.findall(r"^  1\) (\w+)  p=(\d\.\d{4})$", p.stdout, re.M)

    _, ref = top(["--checkpoint", str(run_dir / "best_acc.pt")])
    # A bare state_dict or pickled model carries no fitted temperature: the same
    # logits, read at T=1 (the checkpoint's own answer with its temperature set aside).
    from core.predict import Predictor
    uncalibrated = Predictor.load(run_dir / "best_acc.pt")
    assert ref[0][1] == f"{uncalibrated.predict_image(img, 1)[0][1]:.4f}"  # the CLI shows the calibrated p
    uncalibrated.temperature = 1.0
    ref = [(label, f"{p:.4f}") for label, p in uncalibrated.predict_image(img, 1)]
    p, sd = top(["--checkpoint", str(run_dir / "state_dict.pt"), "--arch", "resnet18", "--classes", "cat,fish"])
    assert p.returncode == 0 and sd == ref, p.stderr
    assert "NOTE: a state_dict keeps no fitted temperature" in p.stderr  # the user is told p is uncalibrated
    assert "temperature" not in top(["--checkpoint", str(run_dir / "best_acc.pt")])[0].stderr
    p, refused = top(["--checkpoint", str(run_dir / "full_model.pt")])
    assert p.returncode == 2 and "--trust-pickle 1" in p.stderr and "Traceback" not in p.stderr
    p, full = top(["--checkpoint", str(run_dir / "full_model.pt"), "--trust-pickle", "1"])
    assert p.returncode == 0 and full == ref and "NOTE: a full model (pickle) keeps no fitted temperature" in p.stderr
    # --classes must fit the model's outputs for a full model too, as for a state_dict
    for f in ("state_dict.pt", "full_model.pt"):
        p, _ = top(["--checkpoint", str(run_dir / f), "--trust-pickle", "1", "--arch", "resnet18", "--classes", "a,b,c"])
        assert p.returncode == 2 and "--classes lists 3 names" in p.stderr and "2 outputs" in p.stderr, (f, p.stderr)


def test_reference_written_checkpoint_loads_and_predicts(tmp_path, tiny_dataset):
    """A checkpoint shaped like the reference's own (no arch, no version, history as lists)."""
    torch.manual_seed(0)
    import torchvision
    from torch import nn
    model = torchvision.models.resnet18(weights=None)
    model.fc = nn.Sequential(nn.Dropout(0.2), nn.Linear(512, 2))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ckpt = {"epoch": 3, "model_state": model.state_dict(), "optimizer_state": opt.state_dict(),
            "best_val_acc": 0.8125, "best_val_loss": 0.41, "class_names": ["cat", "fish"],
            "weights": "IMAGENET1K_V1", "args": {"dropout": 0.2, "epochs": 10, "lr": 0.001},
            "history": {"train_loss": [0.6, 0.5, 0.4], "val_acc": [0.7, 0.8, 0.8125]}, "best_epoch": 3}
    path = tmp_path / "ref_best.pt"
    torch.save(ckpt, path)
    p = cli("predict.py", "--image", str(tiny_dataset / "val"), "--checkpoint", str(path), "--device", "cpu", "--topk", "2")
    assert p.returncode == 0, p.stderr
    assert "best_epoch: 3" in p.stdout and "best_val_acc: 0.8125" in p.stdout
    model.eval()
    from core.predict import Predictor
    pred = Predictor.load(path)
    from PIL import Image
    img = Image.open(sorted((tiny_dataset / "val" / "cat").iterdir())[0])
    from torchvision import transforms as T  # the reference's own eval pipeline, independent of core/
    x = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                   T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])(img.convert("RGB")).unsqueeze(0)
    with torch.no_grad():
        expected = torch.softmax(model(x), 1)[0]
    got = pred.probabilities([img])[0]
    assert torch.allclose(got, expected, atol=1e-5)

    # ...and --resume continues it: its history (a dict of lists) becomes epochs 1-3 of metrics.csv, in a
    # new run folder under --output-dir (the checkpoint's folder is no run folder of this tool)
    run = tmp_path / "ref_run"
    run.mkdir()
    torch.save(ckpt, run / "ref_best.pt")
    r = cli("train.py", "--data-dir", str(tiny_dataset), "--device", "cpu", "--epochs", "4", "--policy", "full",
            "--resume", str(run / "ref_best.pt"), "--output-dir", str(tmp_path / "out"))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "RESUME: continuing at epoch 4/4" in r.stdout and "EPOCH 4/4" in r.stdout
    assert f"NOTE: --resume: {run} is not a run folder (it has no args.json)" in r.stdout, r.stdout
    assert sorted(p.name for p in run.iterdir()) == ["ref_best.pt"] and run_dir_of(r.stdout).parent == tmp_path / "out"
    import csv
    with (run_dir_of(r.stdout) / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2", "3", "4"] and rows[2]["val_acc"] == "0.8125"
    assert rows[0]["val_loss"] == "" and float(rows[3]["val_loss"]) >= 0  # a column the reference did not keep


def test_predict_folder_modes_and_csv(tiny_dataset, tmp_path):
    r = cli("train.py", "--data-dir", str(tiny_dataset), "--device", "cpu", "--epochs", "1", "--weights", "none",
            "--output-dir", str(tmp_path))
    ckpt = str(run_dir_of(r.stdout) / "best_acc.pt")
    first = cli("predict.py", "--image", str(tiny_dataset / "val"), "--checkpoint", ckpt)
    assert first.stdout.count("IMAGE: ") == 1 and "val/cat/cat_0.jpg" in first.stdout
    a = cli("predict.py", "--image", str(tiny_dataset / "train"), "--checkpoint", ckpt, "--random", "1", "--n", "3", "--seed", "5")
    b = cli("predict.py", "--image", str(tiny_dataset / "train"), "--checkpoint", ckpt, "--random", "1", "--n", "3", "--seed", "5")
    assert a.stdout.count("IMAGE: ") == 3 and a.stdout == b.stdout
    csv_path = tmp_path / "preds.csv"
    c = cli("predict.py", "--image", str(tiny_dataset), "--checkpoint", ckpt, "--all", "1", "--csv", str(csv_path))
    assert c.returncode == 0 and c.stdout.count("IMAGE: ") == 12
    rows = csv_path.read_text().splitlines()
    assert rows[0] == "file,label,p,topk" and len(rows) == 13


def test_dataset_counts_script(tiny_dataset, tmp_path):
    r = cli("scripts/dataset_counts.py", "--data-dir", str(tiny_dataset))
    assert r.stdout.splitlines() == [
        "train: 8 images | classes=['cat', 'fish'] | per_class={'cat': 4, 'fish': 4}",
        "val: 4 images | classes=['cat', 'fish'] | per_class={'cat': 2, 'fish': 2}"]
    (tmp_path / "noval" / "train" / "a").mkdir(parents=True)
    r = cli("scripts/dataset_counts.py", "--data-dir", str(tmp_path / "noval"))
    assert "val: MISSING" in r.stdout
    assert "WARNING:" in r.stderr and "at least 2 are needed" in r.stderr
    (tmp_path / "noval" / "train" / "b").mkdir()
    r = cli("scripts/dataset_counts.py", "--data-dir", str(tmp_path / "noval"))  # advice for train.py, named so
    assert "WARNING: train.py would refuse this folder:" in r.stderr and "--val-split 0.2" in r.stderr, r.stderr
    # what train.py would refuse is said too: images loose in train/, class folders that differ
    import shutil
    loose = tmp_path / "loose"
    (loose / "train").mkdir(parents=True)
    shutil.copytree(tiny_dataset / "val", loose / "val")
    for p in sorted((tiny_dataset / "train").rglob("*.jpg")):
        shutil.copy(p, loose / "train" / f"{p.parent.name}_{p.name}")
    r = cli("scripts/dataset_counts.py", "--data-dir", str(loose))
    assert r.returncode == 0 and "train: 0 images" in r.stdout
    assert "WARNING:" in r.stderr and "8 image(s) lie directly in" in r.stderr, r.stderr
    other = tmp_path / "other"
    shutil.copytree(tiny_dataset, other)
    (other / "val" / "fish").rename(other / "val" / "fishes")
    r = cli("scripts/dataset_counts.py", "--data-dir", str(other))
    assert "class folders differ" in r.stderr and "only in val: ['fishes']" in r.stderr, r.stderr
    (other / "val" / "fishes").rename(other / "val" / "fish")
    shutil.copy(sorted((tiny_dataset / "train" / "cat").glob("*.jpg"))[0], other / "train" / "stray.jpg")
    (other / "train" / "._stray.jpg").write_bytes(b"macOS metadata")  # hidden files are not images of anyone's
    r = cli("scripts/dataset_counts.py", "--data-dir", str(other))  # beside class folders: not used, and said
    assert "1 image(s) lie directly in" in r.stderr and "not used, e.g. stray.jpg" in r.stderr, r.stderr


def test_offline_imagenet_weights_fail_fast_with_instructions(tiny_dataset, tmp_path):
    r = cli("train.py", "--data-dir", str(tiny_dataset), "--device", "cpu", "--epochs", "1",
            "--output-dir", str(tmp_path / "out"), timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "resnet18-f37072fd.pth" in r.stderr and "--weights none" in r.stderr
    assert not (tmp_path / "out").exists()  # nothing half-made


def test_cached_imagenet_file_is_used_without_network(tiny_dataset, tmp_path, offline_torch_home):
    """torchvision loads a file already in TORCH_HOME's cache; we place a random one there."""
    import torchvision
    from core.models import imagenet_cache_path
    torch.manual_seed(3)
    path = imagenet_cache_path("resnet18")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(state, path)
    r = cli("train.py", "--data-dir", str(tiny_dataset), "--device", "cpu", "--epochs", "1", "--weights", "imagenet",
            "--output-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    saved = torch.load(run_dir_of(r.stdout) / "latest.pt", weights_only=True)
    assert torch.equal(saved["model_state"]["layer1.0.conv1.weight"], state["layer1.0.conv1.weight"])
    assert saved["weights"] == "imagenet"


def test_bad_flags_and_absent_device_are_clear(tiny_dataset, tmp_path):
    cases = [(["--device", "cuda"], "CUDA is not available"),
             (["--policy", "everything"], "invalid choice"),
             (["--epochs", "0"], "--epochs must be"),
             (["--arch", "vgg16"], "not supported"),
             (["--weights", str(tmp_path / "missing.pth")], f"--weights file {tmp_path / 'missing.pth'} does not exist")]
    for extra, msg in cases:
        if "cuda" in extra and torch.cuda.is_available():
            continue
        r = cli("train.py", "--data-dir", str(tiny_dataset), "--output-dir", str(tmp_path / "o"), *extra)
        assert r.returncode == 2, (extra, r.stdout, r.stderr)
        assert msg in r.stderr and "Traceback" not in r.stderr, (extra, r.stderr)


def test_exit_fast_keeps_the_exit_code_and_takes_module_objects_out_of_the_final_gc():
    import gc

    from cli.common import exit_fast
    try:
        with pytest.raises(SystemExit) as e:
            exit_fast(3)
        assert e.value.code == 3
        assert gc.get_freeze_count() > 10_000  # torch's modules among them: the final collection skips them
    finally:
        gc.unfreeze()  # this test session keeps its normal collector


def test_resume_continues_the_saved_runs_settings_unless_given_again(tiny_dataset, tmp_path):
    """`--resume RUN/latest.pt` alone continues on the run's own dataset with its
    own batch size, learning rate and epoch total; a flag typed again wins, and a
    different --data-dir is pointed out."""
    r = cli("train.py", "--data-dir", str(tiny_dataset), "--device", "cpu", "--weights", "none", "--epochs", "3",
            "--batch-size", "2", "--lr", "0.002", "--output-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    run = run_dir_of(r.stdout)
    half = ck_with_epochs(run / "latest.pt", 1, tmp_path / "epoch1.pt")  # (in no run folder: new ones under --output-dir)
    r = cli("train.py", "--device", "cpu", "--resume", str(half), "--output-dir", str(tmp_path / "cont"))
    assert r.returncode == 0, r.stderr
    assert f"  root: {tiny_dataset}" in r.stdout and "RESUME: continuing at epoch 2/3" in r.stdout
    assert "NOTE: --resume: continuing the run's" in r.stdout and "epochs=3" in r.stdout and "batch_size=2" in r.stdout
    cont = run_dir_of(r.stdout)
    latest = torch.load(cont / "latest.pt", weights_only=True)
    assert latest["args"]["batch_size"] == 2 and latest["args"]["lr"] == 0.002 and latest["epoch"] == 3
    other = tmp_path / "other"
    import shutil
    shutil.copytree(tiny_dataset, other)
    r = cli("train.py", "--device", "cpu", "--resume", str(half), "--batch-size", "4", "--data-dir", str(other),
            "--output-dir", str(tmp_path / "forks"))
    assert r.returncode == 0, r.stderr
    assert f"training on {other}; the saved run trained on {tiny_dataset}" in r.stdout
    assert run_dir_of(r.stdout) != cont and torch.load(cont / "latest.pt", weights_only=True)["epoch"] == 3
    assert torch.load(run_dir_of(r.stdout) / "latest.pt", weights_only=True)["args"]["batch_size"] == 4
    assert run_dir_of(r.stdout).parent == tmp_path / "forks"
    r = cli("train.py", "--device", "cpu", "--resume", str(half), "--data-dir", str(tiny_dataset) + "/", "--epochs", "2",
            "--output-dir", str(tmp_path / "forks"))
    assert r.returncode == 0 and "training on" not in r.stdout, r.stdout  # the same folder, spelled differently


def test_resume_from_another_folder_finds_a_relatively_given_dataset(tiny_dataset, tmp_path):
    import shutil
    shutil.copytree(tiny_dataset, tmp_path / "photos")
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--data-dir", "photos", "--device", "cpu", "--weights", "none",
                        "--epochs", "1", "--output-dir", "out"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    latest = tmp_path / run_dir_of(r.stdout) / "latest.pt"
    r = cli("train.py", "--device", "cpu", "--resume", str(latest), "--epochs", "2")  # run from the repository root
    assert r.returncode == 0 and f"  root: {tmp_path / 'photos'}" in r.stdout, r.stderr
    shutil.rmtree(tmp_path / "photos")
    r = cli("train.py", "--device", "cpu", "--resume", str(latest), "--epochs", "3")
    assert r.returncode == 2 and f"the saved run's data folder {tmp_path / 'photos'} does not exist here; pass --data-dir" in r.stderr


def test_resumed_settings_are_taken_only_when_unambiguous():
    from core.config import TrainConfig
    from core.resume import resumed_settings
    saved = {"amp": "False", "export_state_dict": 1, "epochs": 7.9, "batch_size": 8.0, "data_dir": ["a"],
             "lr": "0.1", "weight_decay": 0.5, "run_name": "cats", "cache": True}
    assert resumed_settings(saved, set(), TrainConfig()) == {"export_state_dict": True, "batch_size": 8,
                                                           "weight_decay": 0.5, "run_name": "cats"}
    assert resumed_settings({"amp": "true", "epochs": 20}, {"epochs"}, TrainConfig()) == {"amp": True}


def ck_with_epochs(src: Path, epoch: int, dst: Path) -> Path:
    """A copy of checkpoint `src` cut back to `epoch` (as if the run had stopped there)."""
    c = torch.load(src, weights_only=True)
    c.update(epoch=epoch, history=c["history"][:epoch], best_epoch=1, best_loss_epoch=1)
    torch.save(c, dst)
    return dst


def test_a_missing_package_is_named_not_called_a_bug(capsys, monkeypatch):
    """`python train.py` with a Python that lacks the project's packages (no venv):
    every missing one is named, by the name pip knows it by."""
    import importlib.util

    from cli.common import run_cli

    def needs_a_package():
        import no_such_package_xyz.sub  # noqa: F401

    assert run_cli(needs_a_package) == 1
    err = capsys.readouterr().err
    assert "'no_such_package_xyz' is not installed" in err and "scripts/setup.sh" in err and "bug" not in err
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("PIL", "gradio") else real(name, *a))
    assert run_cli(needs_a_package) == 1
    assert "the packages 'no_such_package_xyz', 'pillow', 'gradio' are not installed for" in capsys.readouterr().err


def test_predict_flag_mistakes_are_caught_before_any_work(tiny_dataset, tmp_path):
    r = cli("train.py", "--data-dir", str(tiny_dataset), "--device", "cpu", "--epochs", "1", "--weights", "None",
            "--export-state-dict", "1", "--output-dir", str(tmp_path))
    assert r.returncode == 0 and "weights=none" in r.stdout, r.stderr  # keywords in any case
    run = run_dir_of(r.stdout)
    val = str(tiny_dataset / "val")

    def predict(*args):
        return cli("predict.py", "--device", "cpu", "--checkpoint", str(run / "best_acc.pt"), *args)

    for args, message in ((["--image", val, "--all", "1", "--csv", str(tmp_path / "nodir" / "x.csv")],
                           f"--csv {tmp_path / 'nodir' / 'x.csv'}: the folder {tmp_path / 'nodir'} does not exist"),
                          (["--image", val, "--all", "1", "--csv", str(tmp_path)], "is a folder; give a file name"),
                          (["--image", val, "--all", "1", "--random", "1"], "exclude each other"),
                          (["--image", ""], "--image is empty")):
        p = predict(*args)
        assert p.returncode == 2 and message in p.stderr and "IMAGE:" not in p.stdout, (args, p.stderr)
        assert "Traceback" not in p.stderr
    # --csv never replaces a file that is not a CSV: an input image, the checkpoint itself, a source file
    image = sorted((tiny_dataset / "val").rglob("*.jpg"))[0]
    for target in (image, run / "best_acc.pt", tmp_path / "notes.txt"):
        if not target.exists():
            target.write_text("my notes")
        before = target.read_bytes()
        p = predict("--image", val, "--all", "1", "--csv", str(target))
        assert p.returncode == 2 and "already exists and is not a .csv file; it was left alone" in p.stderr, p.stderr
        assert target.read_bytes() == before
    fifo = tmp_path / "pipe.csv"  # not a regular file (like /dev/null): never replaced, never opened
    os.mkfifo(fifo)
    p = predict("--image", val, "--all", "1", "--csv", str(fifo))
    assert p.returncode == 2 and "is not a regular file" in p.stderr and fifo.is_fifo(), p.stderr
    old_csv = tmp_path / "old.csv"
    old_csv.write_text("file,label\n")
    assert predict("--image", val, "--all", "1", "--csv", str(old_csv)).returncode == 0  # a CSV is replaced
    assert len(old_csv.read_text().splitlines()) > 2
    own = tmp_path / "preds.txt"  # ...and so is this tool's own earlier output, whatever its name
    for _ in range(2):
        assert predict("--image", val, "--all", "1", "--csv", str(own)).returncode == 0
    empty = tmp_path / "empty.out"  # (a run whose every image failed wrote it without rows)
    empty.write_bytes(b"")
    assert predict("--image", val, "--all", "1", "--csv", str(empty)).returncode == 0
    p = predict("--image", val, "--random", "1", "--n", "500", "--classes", "a,b", "--arch", "mobilenet_v2")
    assert p.returncode == 0 and "fewer than --n 500: predicting all of them" in p.stderr
    assert "--arch mobilenet_v2 ignored: the checkpoint is a resnet18 model" in p.stderr
    assert "--classes ignored: the checkpoint names its classes ['cat', 'fish']" in p.stderr
    p = cli("predict.py", "--device", "cpu", "--checkpoint", str(run / "state_dict.pt"), "--image", val)
    assert p.returncode == 0 and "pass --classes" in p.stderr and "class_0" in p.stdout
    unnamed = torch.load(run / "best_acc.pt", weights_only=True)
    del unnamed["class_names"]
    torch.save(unnamed, tmp_path / "unnamed.pt")
    p = cli("predict.py", "--device", "cpu", "--checkpoint", str(tmp_path / "unnamed.pt"), "--image", val, "--classes", "a,b")
    assert p.returncode == 0 and "class_names: ['a', 'b']" in p.stdout and "ignored" not in p.stderr, p.stderr


def test_print_model_highlights_every_architecture():
    """--print-model's HIGHLIGHTS block was empty for MobileNetV2 (a ResNet-only name list)."""
    from core.models import build_model
    from core.summary import print_model_report
    for arch, parts in (("resnet18", ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4",
                                      "avgpool", "fc"]), ("mobilenet_v2", ["features", "classifier"])):
        lines = print_model_report(arch, build_model(arch, 3, 0.0, "none"), 3, 0.0)
        block = lines[lines.index("HIGHLIGHTS:") + 1:lines.index("PARAMETERS (trainable / total) per policy:") - 1]
        assert [line.split(":")[0].strip() for line in block] == parts, block
        assert "out_features=3" in block[-1]


def test_resume_refuses_a_typed_change_of_the_runs_fixed_settings(tiny_dataset, tmp_path):
    """--policy/--arch/--seed/... typed with --resume used to be overridden by the
    checkpoint's value with only a NOTE, training something other than what was
    typed. Now it is an error; typing the saved value again is fine. A resume
    that needs a new folder puts it beside the resumed run, not in ./checkpoints."""
    r = cli("train.py", "--data-dir", str(tiny_dataset), "--device", "cpu", "--weights", "none", "--epochs", "2",
            "--policy", "last", "--output-dir", str(tmp_path / "runs"))
    assert r.returncode == 0, r.stderr
    run = run_dir_of(r.stdout)
    # a reference-style checkpoint (no arch/policy/args recorded: the arch comes from its keys) is held to it too
    ref = {k: v for k, v in torch.load(run / "latest.pt", weights_only=True).items() if k not in ("arch", "policy", "args")}
    torch.save(ref, run / "reference.pt")
    for resume, flags, said in (
            ("latest.pt", ["--policy", "head"], "--policy head cannot change on --resume: the saved run used last"),
            ("latest.pt", ["--freeze-backbone", "1"], "i.e. --policy head cannot change on --resume"),
            ("latest.pt", ["--arch", "mobilenet_v2"], "--arch mobilenet_v2 cannot change on --resume"),
            ("latest.pt", ["--seed", "5"], "--seed 5 cannot change on --resume: the saved run used 1337"),
            ("reference.pt", ["--arch", "mobilenet_v2"], "--arch mobilenet_v2 cannot change on --resume: the saved run "
                                                         "used resnet18")):
        p = cli("train.py", "--device", "cpu", "--resume", str(run / resume), "--epochs", "3", *flags)
        assert p.returncode == 2 and said in p.stderr and "start a new run" in p.stderr, (flags, p.stderr)
        assert torch.load(run / "latest.pt", weights_only=True)["epoch"] == 2  # nothing trained
    (run / "reference.pt").unlink()
    older = ck_with_epochs(run / "latest.pt", 1, run / "epoch1.pt")  # behind latest.pt: continues in a new folder
    # typing the saved values again is fine, 'light' included (what 'auto' means under 'last')
    p = cli("train.py", "--device", "cpu", "--resume", str(older), "--epochs", "3", "--policy", "last",
            "--augment", "light", "--seed", "1337")
    assert p.returncode == 0, p.stderr
    assert run_dir_of(p.stdout).parent == run.parent, p.stdout  # beside the resumed run


def test_flag_typos_are_one_line_and_keywords_take_any_case(tiny_dataset, tmp_path):
    """argparse printed its whole usage block above the error; the error is now
    the one line. Keywords work in any case (--arch ResNet18, --device CPU)."""
    for script, args, said in (("train.py", ["--epochs", "three"], "argument --epochs: invalid int value: 'three'"),
                               ("train.py", ["--freeze-backbone", "2"], "expected 0 or 1, got '2'"),
                               ("predict.py", ["--image", "x.jpg"], "the following arguments are required: --checkpoint")):
        r = cli(script, *args)
        assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
        assert said in r.stderr and r.stderr.startswith("error: ") and "--help" in r.stderr
    r = cli("train.py", "--data-dir", str(tiny_dataset), "--device", "CPU", "--arch", "ResNet18", "--policy", "Head",
            "--weights", "none", "--epochs", "1", "--output-dir", str(tmp_path))
    assert r.returncode == 0 and "arch=resnet18" in r.stdout and "policy=head" in r.stdout, r.stderr
    r = cli("predict.py", "--image", str(tiny_dataset / "val"), "--checkpoint", str(run_dir_of(r.stdout) / "best_acc.pt"),
            "--device", "CPU", "--topk", "0")
    assert r.returncode == 2 and "--topk must be >= 1 (got 0)" in r.stderr, r.stderr


def test_resume_of_a_reference_checkpoint_with_freeze_flags_and_an_unrecorded_dropout(tiny_dataset, tmp_path):
    """The reference records its three 0/1 freeze flags, not a policy, and may not
    record the head's dropout rate: the policy comes from those flags (a typed
    other policy is refused; not typing it works), and a typed dropout rate is
    accepted where only a guess (0.5) existed."""
    r = cli("train.py", "--data-dir", str(tiny_dataset), "--device", "cpu", "--weights", "none", "--epochs", "1",
            "--policy", "last", "--dropout", "0.2", "--output-dir", str(tmp_path / "runs"))
    assert r.returncode == 0, r.stderr
    ours = torch.load(run_dir_of(r.stdout) / "latest.pt", weights_only=True)
    ref = {k: v for k, v in ours.items() if k not in ("arch", "policy", "head", "args")}
    ref["args"] = {"data_dir": str(tiny_dataset), "epochs": 1, "freeze_backbone": 1, "unfreeze_last": 1, "unfreeze_all": 0}
    torch.save(ref, tmp_path / "ref.pt")
    out = ["--output-dir", str(tmp_path / "out")]
    p = cli("train.py", "--device", "cpu", "--resume", str(tmp_path / "ref.pt"), "--epochs", "2", "--policy", "full", *out)
    assert p.returncode == 2 and "--policy full cannot change on --resume: the saved run used last" in p.stderr, p.stderr
    p = cli("train.py", "--device", "cpu", "--resume", str(tmp_path / "ref.pt"), "--epochs", "2", "--dropout", "0.2", *out)
    assert p.returncode == 0 and "EPOCH 2/2" in p.stdout and "policy=last" in p.stdout, p.stderr


def test_resume_reads_the_checkpoint_once(tiny_dataset, tmp_path, monkeypatch):
    """train.py --resume checks the typed flags against the checkpoint and hands that
    same dict to the engine: a 45-135 MB file is read once, not once per check."""
    import train
    from core import checkpoint as ck, fileio
    assert train.main(["--data-dir", str(tiny_dataset), "--device", "cpu", "--weights", "none", "--epochs", "1",
                       "--batch-size", "4", "--output-dir", str(tmp_path)]) == 0
    latest = next(tmp_path.glob("*/latest.pt"))
    reads, real = [], fileio.check_model_file  # the first step of every load_file
    monkeypatch.setattr(fileio, "check_model_file", lambda path, *a, **kw: reads.append(Path(path)) or real(path, *a, **kw))
    assert train.main(["--resume", str(latest), "--epochs", "2", "--device", "cpu", "--policy", "head"]) == 0
    assert reads == [latest]
    assert ck.read_checkpoint(latest)["epoch"] == 2
