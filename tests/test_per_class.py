"""Per-class validation results: counted from the real predictions of a run,
kept in its checkpoints, printed by train.py and carried across --resume."""
from __future__ import annotations

import re

import torch

from conftest import make_image_dataset, train_config, train_run
from test_cli import cli, run_dir_of


def test_per_class_rows_from_prediction_pairs():
    from core.metrics import confusion_pairs, per_class, per_class_lines, per_class_summary
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    predicted = torch.tensor([0, 1, 1, 1, 1, 2, 0, 2, 1])
    pairs = confusion_pairs(labels, predicted)
    assert pairs == [[0, 0, 1], [0, 1, 2], [1, 1, 2], [2, 0, 1], [2, 1, 1], [2, 2, 2]]
    rows = per_class(pairs, ["cat", "dog", "fish"])
    assert [(r["class"], r["images"], r["correct"]) for r in rows] == [("cat", 3, 1), ("dog", 2, 2), ("fish", 4, 2)]
    assert rows[0]["taken_for"] == "dog" and rows[0]["taken_count"] == 2
    assert rows[1]["taken_for"] is None  # all right
    assert rows[2]["taken_for"] == "cat" and rows[2]["taken_count"] == 1  # a tie names the first class
    assert per_class_lines(rows) == ["  cat: 1/3 = 0.3333 (2 taken for dog)", "  dog: 2/2 = 1.0000",
                                     "  fish: 2/4 = 0.5000 (1 taken for cat)"]
    assert per_class_summary(rows) == "cat 1/3 (2 taken for dog) · dog 2/2 · fish 2/4 (1 taken for cat)"
    # many classes: the worst ones, and how many more
    many = per_class([[i, i if i % 3 else (i + 1) % 30, 1] for i in range(30)], [f"c{i:02d}" for i in range(30)])
    lines = per_class_lines(many, limit=10)  # the 10 wrong ones (every third class), then the rest
    assert len(lines) == 11 and lines[0].startswith("  c00: 0/1") and lines[9].startswith("  c27: 0/1")
    assert lines[-1] == "  ... 20 more classes, each at 1.0000 or better"
    assert per_class_summary(many, limit=2).endswith("· … 28 more classes, each at 0% or better")
    # from a file: junk entries and out-of-range classes are skipped, not fatal
    assert per_class([["x"], [0, 5, 1], None, [1, 1, -2], [0, 0, 2]], ["a", "b"]) == [
        {"class": "a", "images": 2, "correct": 2, "acc": 1.0, "taken_for": None, "taken_count": 0}]
    assert per_class("not a list", ["a"]) == [] and confusion_pairs(torch.tensor([]), torch.tensor([])) == []
    from core.metrics import clean_confusion
    assert clean_confusion([[0, 0, float("inf")], [0, 0, True], [0, 1, 2]], 2) == [[0, 1, 2]]
    assert clean_confusion(torch.tensor([[0, 0, 1]]), 2) is None and clean_confusion([[5, 0, 1]], 2) is None


def test_each_checkpoint_holds_its_epochs_per_class_counts(tmp_path):
    data = make_image_dataset(tmp_path / "ds")
    _, epochs, end = train_run(train_config(data, tmp_path / "out", epochs=3))
    classes = sorted(p.name for p in (data / "val").iterdir())
    val_counts = [len(list((data / "val" / c).iterdir())) for c in classes]
    from core.metrics import per_class
    for ev in epochs:  # every epoch's counts agree with its own val_acc and the val folders
        rows = per_class(ev.confusion, classes)
        assert [r["images"] for r in rows] == val_counts
        assert sum(r["correct"] for r in rows) / sum(val_counts) == ev.val_acc
    best = torch.load(end.best_acc_path, weights_only=True)
    latest = torch.load(tmp_path / "out" / end.run_dir.split("/")[-1] / "latest.pt", weights_only=True)
    by_epoch = {ev.epoch: ev.confusion for ev in epochs}
    assert best["val_confusion"] == by_epoch[best["epoch"]] == end.best_confusion == latest["best_val_confusion"]
    assert latest["val_confusion"] == by_epoch[3]
    assert end.per_class_lines()[0] == f"PER_CLASS: val accuracy by class at the best_acc epoch ({best['epoch']})"


def test_train_prints_per_class_results_and_resume_keeps_them(tmp_path):
    data = make_image_dataset(tmp_path / "ds")
    args = ["--data-dir", str(data), "--device", "cpu", "--weights", "none", "--batch-size", "4", "--seed", "7",
            "--output-dir", str(tmp_path / "out")]
    r = cli("train.py", *args, "--epochs", "2")
    assert r.returncode == 0, r.stderr
    block = r.stdout.split("PER_CLASS: ", 1)[1].splitlines()
    best_epoch = int(re.search(r"best_acc=\d\.\d{4} \(epoch (\d+)\)", r.stdout).group(1))
    assert block[0] == f"val accuracy by class at the best_acc epoch ({best_epoch})"
    counts = [re.fullmatch(r"  (\w+): (\d+)/(\d+) = (\d\.\d{4})( \(\d+ taken for \w+\))?", line) for line in block[1:]]
    assert counts and all(counts), block
    per_class_in_dataset = dict(re.findall(r"'(\w+)': (\d+)", re.search(r"  val: .*", r.stdout).group(0)))
    assert {m.group(1): m.group(3) for m in counts} == per_class_in_dataset
    best_acc = float(re.search(r"best_acc=(\d\.\d{4})", r.stdout).group(1))
    assert round(sum(int(m.group(2)) for m in counts) / sum(int(m.group(3)) for m in counts), 4) == best_acc

    # --resume for one more epoch: the best epoch's counts come along, whether or not epoch 3 beats it
    run = run_dir_of(r.stdout)
    again = cli("train.py", *args, "--epochs", "3", "--resume", str(run / "latest.pt"))
    assert again.returncode == 0, again.stderr
    best_now = int(re.search(r"best_acc=\d\.\d{4} \(epoch (\d+)\)", again.stdout).group(1))
    resumed_block = again.stdout.split("PER_CLASS: ", 1)[1].splitlines()[:len(block)]
    assert resumed_block[0] == f"val accuracy by class at the best_acc epoch ({best_now})"
    if best_now == best_epoch:
        assert resumed_block == block


def test_predict_checks_a_labelled_folder_like_validation_did(tmp_path):
    """predict.py on val/<class>/ compares each prediction with its folder's class;
    the Predictor must agree with the engine's own validation of that checkpoint."""
    data = make_image_dataset(tmp_path / "ds")
    r = cli("train.py", "--data-dir", str(data), "--device", "cpu", "--weights", "none", "--batch-size", "4",
            "--seed", "7", "--epochs", "2", "--output-dir", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    best = run_dir_of(r.stdout) / "best_acc.pt"
    p = cli("predict.py", "--image", str(data / "val"), "--all", "1", "--checkpoint", str(best), "--device", "cpu")
    assert p.returncode == 0, p.stderr
    m = re.search(r"^CHECK: (\d+)/(\d+) = (\d\.\d{4}) right against the folder names \((\d+) of (\d+) images", p.stdout,
                  re.M)
    assert m, p.stdout
    right, checked = int(m.group(1)), int(m.group(2))
    from core.metrics import per_class
    ckpt = torch.load(best, weights_only=True)
    rows = per_class(ckpt["val_confusion"], ckpt["class_names"])
    assert (right, checked) == (sum(r["correct"] for r in rows), sum(r["images"] for r in rows))
    wrong = re.findall(r"^  WRONG: (.+) \(predicted (\w+), folder (\w+)\)$", p.stdout, re.M)
    assert len(wrong) == min(checked - right, 20) and all(pred != folder for _, pred, folder in wrong)
    assert all(f"/{folder}/" in path for path, _, folder in wrong)
    # an unreadable file in a class folder is counted as such, not as checked
    (data / "val" / "cat" / "broken.jpg").write_bytes(b"not a jpeg")
    q = cli("predict.py", "--image", str(data / "val"), "--all", "1", "--checkpoint", str(best), "--device", "cpu")
    assert q.returncode == 0 and (f"CHECK: {right}/{checked} = " in q.stdout), q.stdout
    assert f"({checked + 1} of {checked + 1} images are in folders named after classes, 1 of them unreadable)" in q.stdout
    # a folder not named after a class is not checked; nor is a single image
    flat = tmp_path / "flat"
    flat.mkdir()
    for f in sorted((data / "val" / "fish").glob("*.jpg"))[:3]:
        (flat / f.name).write_bytes(f.read_bytes())
    for image in (flat, sorted((data / "val" / "fish").glob("*.jpg"))[0]):
        q = cli("predict.py", "--image", str(image), "--all", "1", "--checkpoint", str(best), "--device", "cpu")
        assert q.returncode == 0 and "CHECK:" not in q.stdout, q.stdout


def test_resume_carries_the_best_epochs_counts_and_survives_odd_values(tmp_path):
    """A resume stopped before its first epoch reports the counts it read from
    the checkpoint; values a checkpoint from elsewhere may hold are dropped, not fatal."""
    import threading

    from core.metrics import per_class
    data = make_image_dataset(tmp_path / "ds")
    _, _, first = train_run(train_config(data, tmp_path / "out", epochs=2))
    latest = tmp_path / "out" / first.run_dir.split("/")[-1] / "latest.pt"
    saved = torch.load(latest, weights_only=True)
    for value, expected in ((saved["best_val_confusion"], saved["best_val_confusion"]), (None, None),
                            ([[0, 0, float("inf")]], None), (torch.tensor([[0, 0, 1]]), None)):
        odd = tmp_path / "resume.pt"
        torch.save({**saved, "best_val_confusion": value, "val_confusion": value}, odd)
        stop = threading.Event()
        stop.set()
        _, _, end = train_run(train_config(data, tmp_path / "out2", epochs=3, resume=str(odd)), stop)
        assert end.status == "stopped" and end.best_confusion == expected
        assert end.end_lines()  # printable whatever the file held
        assert bool(end.per_class_lines()) == (expected is not None)
        if expected:
            rows = per_class(expected, first.classes)
            assert end.per_class_lines()[1:] == [f"  {r['class']}: {r['correct']}/{r['images']} = {r['acc']:.4f}"
                                                 + (f" ({r['taken_count']} taken for {r['taken_for']})"
                                                    if r["taken_for"] else "") for r in rows]
        from core.predict import Predictor
        from demo_app.inference import describe
        assert ("val by class" in describe(Predictor.load(str(odd), "cpu"), str(odd))) == (expected is not None)
