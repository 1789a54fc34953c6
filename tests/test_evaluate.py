"""Issue 17 §2-§3: evaluate.py and its report, temperature scaling, the abstain
rule ('unsure'), and the Evaluate tab's clickable confusion matrix. One tiny
real run (random ResNet-18 backbone, head trained on colour-coded images)
serves most tests."""
from __future__ import annotations

import csv
import io
import os
import re
import shutil
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import free_port, ROOT, launch_chromium, make_image_dataset, need_chromium, train_config, train_run

SHOTS = (ROOT / "assets" if os.environ.get("UPDATE_SCREENSHOTS") == "1"
         else Path(tempfile.gettempdir()) / "tl-resnet18-screenshots")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 2-epoch run on a tiny dataset: {dir, best (path), ckpt (dict), end (RunEnded), data}."""
    base = tmp_path_factory.mktemp("eval_run")
    data = make_image_dataset(base / "ds", n_train=6, n_val=5)
    _, _, end = train_run(train_config(data, base / "checkpoints"))
    best = Path(end.best_acc_path).resolve()
    return {"dir": best.parent, "best": best, "ckpt": torch.load(best, weights_only=True), "end": end, "data": data,
            "checkpoints": base / "checkpoints"}


def cli(module, argv) -> tuple[int, str, str]:
    """Run a CLI's main() in this process (no interpreter start-up): (exit code, stdout, stderr)."""
    import importlib
    mod = importlib.import_module(module)
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = mod.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- counts agree with training

def test_confusion_on_the_runs_own_val_equals_best_val_confusion(run, tmp_path):
    code, out, err = cli("evaluate", ["--checkpoint", run["best"], "--out", tmp_path / "ev"])
    assert code == 0, err
    rows = read_csv(tmp_path / "ev" / "predictions.csv")
    classes = run["ckpt"]["class_names"]
    counts = {}
    for r in rows:
        key = (classes.index(r["true"]), classes.index(r["label"]))
        counts[key] = counts.get(key, 0) + 1
    assert sorted([t, p, c] for (t, p), c in counts.items()) == run["ckpt"]["best_val_confusion"]
    assert len(rows) == 10 and f"DATA: {run['data'] / 'val'} (10 images)" in out
    # the printed matrix and accuracy are those counts
    right = sum(c for (t, p), c in counts.items() if t == p)
    assert f"ACCURACY: {right / 10:.4f} ({right}/10)" in out
    m = re.search(r"CONFUSION: rows = true class, columns = predicted\n.*\n  cat +(\d+) +(\d+)\n  fish +(\d+) +(\d+)", out)
    assert [int(v) for v in m.groups()] == [counts.get((t, p), 0) for t in (0, 1) for p in (0, 1)]
    # precision / recall / F1 from the same counts
    tp, fn, fp = counts.get((0, 0), 0), counts.get((0, 1), 0), counts.get((1, 0), 0)
    precision, recall = (tp / (tp + fp) if tp + fp else 0.0), tp / (tp + fn)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    assert re.search(rf"^  cat +{precision:.4f} +{recall:.4f} +{f1:.4f} +5$", out, re.M), out


def test_default_data_reproduces_a_held_out_split_and_a_relative_data_dir(tmp_path, monkeypatch):
    """A dataset without val/ (--val-split): the default evaluation set is exactly the
    images training held out; a checkpoint that records its data folder relative to
    where training ran is found from elsewhere too."""
    from core.evaluate import evaluate, labelled_images
    from core.predict import Predictor
    monkeypatch.chdir(tmp_path)
    make_image_dataset(tmp_path / "ds", n_train=8, val=False)
    _, _, end = train_run(train_config("ds", "checkpoints", val_split=0.25, epochs=1))
    ckpt = torch.load(end.best_acc_path, weights_only=True)
    best = Path(end.best_acc_path).resolve()
    ckpt["args"]["data_dir"], ckpt["args"]["output_dir"] = "ds", "checkpoints"  # as an older tool recorded them
    torch.save(ckpt, best)
    monkeypatch.chdir(ROOT)  # elsewhere: "ds" is not here, so it is found from the checkpoint's location
    pred = Predictor.load(best, "cpu")
    labelled = labelled_images(None, pred.class_names, pred.info, best)
    assert len(labelled.samples) == 4 and all("/train/" in p for p, _ in labelled.samples)
    result = evaluate(pred, labelled)
    assert result.confusion == ckpt["best_val_confusion"] and not result.warnings

    # train/ grows after training (the dataset builder invites it): the split rebuilt now holds out other
    # images, some of them trained on, and the report says so instead of scoring them silently
    from core.evaluate import report_lines
    from PIL import Image
    assert ckpt["data_files"]["images"] == 16  # the run records which files it used
    first = sorted((tmp_path / "ds" / "train" / "cat").iterdir())[0]
    first.rename(first.with_name("renamed.jpg"))  # same counts, other files: only the record can tell
    renamed = labelled_images(None, pred.class_names, pred.info, best)
    assert renamed.warning.startswith("train/ has changed since this model was trained (16 images then, 16 now)")
    for i in range(4):
        Image.new("RGB", (48, 40), (40 * i, 90, 200)).save(tmp_path / "ds" / "train" / "cat" / f"new_{i}.jpg")
    grown = evaluate(pred, labelled_images(None, pred.class_names, pred.info, best))
    assert len(grown.warnings) == 1 and "(16 images then, 20 now)" in grown.warnings[0]
    assert "trained on" in grown.warnings[0]
    assert any(line.startswith("WARNING: train/ has changed since this model was trained")
               for line in report_lines(grown))
    older = {k: v for k, v in pred.info.items() if k != "data_files"}  # a checkpoint from before the record
    assert "cat 2 -> 3" in labelled_images(None, pred.class_names, older, best).warning  # per-class counts
    # a class added since, with one image (too few to split): the class mismatch is what is said
    (tmp_path / "ds" / "train" / "bird").mkdir()
    Image.new("RGB", (48, 40)).save(tmp_path / "ds" / "train" / "bird" / "b.jpg")
    from core.errors import UserError
    with pytest.raises(UserError, match=r"now has classes \['bird', 'cat', 'fish'\], the model \['cat', 'fish'\]"):
        labelled_images(None, pred.class_names, pred.info, best)


def test_unknown_class_folders_are_refused_and_missing_ones_noted(run, tmp_path):
    folder = tmp_path / "labelled"
    shutil.copytree(run["data"] / "val" / "cat", folder / "cat")
    code, out, err = cli("evaluate", ["--checkpoint", run["best"], "--data", folder, "--out", tmp_path / "a"])
    assert code == 0, err
    assert "NOTE: no folder for class(es) ['fish']: their recall is not measured" in out
    assert re.search(r"^  macro avg .* 5$", out, re.M)  # averages over the classes that have images
    (folder / "dog").mkdir()
    Image.new("RGB", (40, 40)).save(folder / "dog" / "d.jpg")
    code, out, err = cli("evaluate", ["--checkpoint", run["best"], "--data", folder, "--out", tmp_path / "b"])
    assert code == 2 and out == ""
    assert err.startswith(f"error: {folder} has class folder(s) the model does not know: ['dog']; "
                          f"it knows ['cat', 'fish']. Move those folders out (or point --data at"), err
    code, _, err = cli("evaluate", ["--checkpoint", run["best"], "--min-confidence", "1.5"])
    assert code == 2 and err.startswith("error: --min-confidence must be a probability from 0 to 1 (got 1.5)")
    torch.save(run["ckpt"]["model_state"], tmp_path / "sd.pt")  # a bare state_dict: classes numbered until named
    code, _, err = cli("evaluate", ["--checkpoint", tmp_path / "sd.pt", "--data", run["data"], "--out", tmp_path / "c"])
    assert code == 2 and "records no class names" in err and "pass --classes in the order" in err, err
    code, out, err = cli("evaluate", ["--checkpoint", tmp_path / "sd.pt", "--classes", "cat,fish", "--data", run["data"],
                                      "--out", tmp_path / "c"])
    assert code == 0 and "format: state_dict" in out and "temperature: 1.0000 (none fitted" in out, err
    (tmp_path / "file").write_text("x")
    code, _, err = cli("evaluate", ["--checkpoint", run["best"], "--out", tmp_path / "file"])
    assert code == 2 and "--out" in err and "is a file" in err


# ---------------------------------------------------------------- temperature scaling

def test_fit_temperature_recovers_a_known_temperature():
    """Labels drawn from softmax(z); the model reports 3z (over-confident by T = 3)."""
    from core.calibration import calibrate
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4000, 5, generator=g) * 2
    labels = torch.multinomial(torch.softmax(z, 1), 1, generator=g).squeeze(1)
    c = calibrate(3 * z, labels)
    assert abs(c.temperature - 3) < 0.25 and c.nll_after < c.nll_before and c.ece_after < c.ece_before / 3


def test_temperature_lowers_val_nll_on_an_overconfident_run(tmp_path):
    """Val images in the wrong class folder and a high learning rate: the model is
    confidently wrong on them. The run fits T > 1, stores it, prints it, and the
    probabilities prediction shows (through the Predictor) have the lower NLL."""
    from core.evaluate import evaluate, labelled_images
    from core.events import log_lines
    from core.predict import Predictor
    data = make_image_dataset(tmp_path / "ds", n_train=8, n_val=6)
    for i in range(2):  # red images (cat-coloured) filed as fish: what a confident model gets wrong
        shutil.move(data / "val" / "cat" / f"cat_{i}.jpg", data / "val" / "fish" / f"red_{i}.jpg")
    _, epochs, end = train_run(train_config(data, tmp_path / "out", lr=0.05, epochs=4))
    cal = end.calibration
    assert cal.fitted and cal.temperature > 1.5 and cal.nll_after < cal.nll_before
    line = [x.text for x in log_lines(end) if x.text.startswith("CALIBRATION:")]
    assert line == [f"CALIBRATION: temperature={cal.temperature:.4f} fitted on the best_acc epoch's "
                    f"({end.best['acc_epoch']}) val logits: val NLL {cal.nll_before:.4f} -> {cal.nll_after:.4f}, "
                    f"ECE {cal.ece_before:.4f} -> {cal.ece_after:.4f}"]
    saved = torch.load(end.best_acc_path, weights_only=True)
    assert saved["temperature"] == pytest.approx(cal.temperature)
    best_row = next(e for e in epochs if e.epoch == end.best["acc_epoch"])
    assert cal.nll_before == pytest.approx(best_row.val_loss, rel=1e-4)  # T=1: the val loss training printed
    pred = Predictor.load(end.best_acc_path, "cpu")
    res = evaluate(pred, labelled_images(None, pred.class_names, pred.info, end.best_acc_path))
    assert res.temperature == pytest.approx(cal.temperature)
    assert res.nll == pytest.approx(cal.nll_after, rel=1e-3) and res.nll < res.nll_t1
    top = pred.predict_image(data / "val" / "fish" / "red_0.jpg", 2)[0][1]
    assert top < 0.99  # softmax(logits / T): no longer (near) certain of its mistake


def test_older_checkpoints_have_temperature_1_and_bad_ones_are_refused(run, tmp_path):
    from core.errors import CheckpointError
    from core.predict import Predictor
    old = {k: v for k, v in run["ckpt"].items() if k != "temperature"}
    torch.save(old, tmp_path / "old.pt")
    assert Predictor.load(tmp_path / "old.pt", "cpu").temperature == 1.0
    for bad in (0.0, -2.0, 1e6, float("nan"), "2"):
        torch.save({**old, "temperature": bad}, tmp_path / "bad.pt")
        with pytest.raises(CheckpointError, match="temperature is .*; allowed: a number above 0, at most 100"):
            Predictor.load(tmp_path / "bad.pt", "cpu")
    assert Predictor.load(tmp_path / "old.pt", "cpu").info["data_files"] == run["ckpt"]["data_files"]  # passed on
    for bad, field in (("x", "data_files"), ({"images": -1, "sha256": "0" * 64}, "data_files.images"),
                       ({"images": 3, "sha256": "zz"}, "data_files.sha256")):
        torch.save({**old, "data_files": bad}, tmp_path / "bad.pt")
        with pytest.raises(CheckpointError, match=re.escape(field)):
            Predictor.load(tmp_path / "bad.pt", "cpu")


# ---------------------------------------------------------------- abstain

def test_min_confidence_marks_exactly_the_answers_below_it(run, tmp_path):
    from core.predict import Predictor
    val = run["data"] / "val"
    exact = {r.path: r.p for r in Predictor.load(run["best"], "cpu").predict_paths(sorted(map(str, val.rglob("*.jpg"))))}
    ps = sorted(exact.values())
    p_cut = ps[len(ps) // 2]  # one answer sits exactly at P: answered, not unsure
    assert ps[0] < p_cut
    below = {path for path, p in exact.items() if p < p_cut}
    code, out, err = cli("predict", ["--image", val, "--all", "1", "--checkpoint", run["best"], "--device", "cpu",
                                     "--min-confidence", repr(p_cut), "--csv", tmp_path / "p.csv"])
    assert code == 0, err
    blocks = dict(re.findall(r"^IMAGE: (.+)\n(?:.*\n)*?(ANSWER: .*)$", out, re.M))
    assert set(blocks) == set(exact)
    for path, answer in blocks.items():
        label = next(r["label"] for r in read_csv(tmp_path / "p.csv") if r["file"] == path)
        assert answer == (f"ANSWER: unsure (best guess {label}, p={exact[path]:.4f} is below --min-confidence {p_cut:g})"
                          if path in below else f"ANSWER: {label}")
    assert {r["file"] for r in read_csv(tmp_path / "p.csv") if r["unsure"] == "1"} == below
    code, out, err = cli("evaluate", ["--checkpoint", run["best"], "--min-confidence", repr(p_cut), "--out", tmp_path / "e"])
    assert code == 0, err
    rows = read_csv(tmp_path / "e" / "predictions.csv")
    assert {r["file"] for r in rows if r["unsure"] == "1"} == below
    kept = [r for r in rows if r["unsure"] == "0"]
    acc = sum(r["correct"] == "1" for r in kept) / len(kept)
    assert (f"MIN_CONFIDENCE: {p_cut:g}: {len(kept)}/10 answered (coverage {len(kept) / 10:.4f}), "
            f"accuracy {acc:.4f} on those; {len(below)} unsure") in out


def test_risk_coverage_is_accuracy_of_the_kept_answers():
    from core.calibration import at_threshold, risk_coverage
    conf = [0.9, 0.8, 0.8, 0.6, 0.55]
    ok = [True, False, True, True, False]
    assert risk_coverage(conf, ok) == [{"threshold": 0.9, "coverage": 0.2, "accuracy": 1.0},
                                       {"threshold": 0.8, "coverage": 0.6, "accuracy": 2 / 3},
                                       {"threshold": 0.6, "coverage": 0.8, "accuracy": 0.75},
                                       {"threshold": 0.55, "coverage": 1.0, "accuracy": 0.6}]
    assert at_threshold(conf, ok, 0.8) == {"kept": 3, "total": 5, "coverage": 0.6, "accuracy": 2 / 3}


# ---------------------------------------------------------------- the report, offline, in a real browser

def test_report_is_self_contained_and_shows_the_heatmap_in_a_browser(run, tmp_path):
    sync_api = need_chromium()
    code, out, err = cli("evaluate", ["--checkpoint", run["best"], "--out", tmp_path, "--min-confidence", "0.6"])
    assert code == 0, err
    html = (tmp_path / "report.html").read_text()
    assert not re.search(r"https?://", html) and "<script" not in html and "<link" not in html
    assert len(html) < 2_000_000
    # the top losses carry the Grad-CAM of the answered class (core.cam), blended over each image
    from core.report import thumbnail_uri
    assert "Heatmaps: Grad-CAM of the class the model answered" in html
    first = re.search(r"<figure><img src='(data:image/jpeg;base64,[^']+)' alt='([^']+)'>", html)
    assert first and first.group(1) != thumbnail_uri(first.group(2))
    matrix = {(t, p): c for t, p, c in run["ckpt"]["best_val_confusion"]}
    with sync_api.sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        requests = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto((tmp_path / "report.html").as_uri())
        svg = page.locator("#confusion-svg")
        assert svg.is_visible() and svg.bounding_box()["width"] > 100
        cells = page.locator("#confusion-svg g.cell")
        assert cells.count() == 4
        texts = [cells.nth(i).locator("text").text_content() for i in range(4)]
        assert texts == [str(matrix.get((t, q), 0)) for t in (0, 1) for q in (0, 1)]
        assert page.locator("#reliability-svg").is_visible() and page.locator("#risk-coverage-svg").is_visible()
        imgs = page.locator("figure img")
        assert imgs.count() == 10 and all(page.evaluate("(i) => i.naturalWidth", imgs.nth(k).element_handle()) > 0
                                          for k in range(imgs.count()))
        SHOTS.mkdir(parents=True, exist_ok=True)
        if os.environ.get("UPDATE_SCREENSHOTS") != "1":
            page.screenshot(path=str(SHOTS / "report-tiny.png"), full_page=True)
        browser.close()
    assert all(u.startswith(("file:", "data:")) for u in requests), requests


# ---------------------------------------------------------------- the app

def test_train_tab_heatmap_and_predict_tab_unsure(run, tmp_path):
    """The Train tab's end-of-run heatmap is the best epoch's counts; the Predict
    tab's min-confidence slider says 'unsure' exactly below it."""
    from demo_app.ui import build_app
    h = build_app(run["checkpoints"], run["data"], tmp_path / "up").handlers
    shown = h.train.run.best_confusion(run["end"])[h.train.run.cm_plot]
    fig, matrix = shown["value"], {(t, p): c for t, p, c in run["ckpt"]["best_val_confusion"]}
    assert shown["visible"] and fig.data[0].type == "heatmap"
    assert [list(r) for r in fig.data[0].text] == [[matrix.get((t, p), 0) for p in (0, 1)] for t in (0, 1)]
    image = str(run["data"] / "val" / "cat" / "cat_0.jpg")
    p = max(h.predict.predict(image, 2, str(run["best"]), None, False)[h.predict.label].values())
    for cut, unsure in ((p + 1e-3, True), (p, False), (0, False)):
        said = h.predict.predict_shown(image, 2, str(run["best"]), None, False, cut)[h.predict.pred_time]
        assert said.startswith("**Unsure**: the best guess") == unsure, (cut, said)
    # Classify all: exactly the answers below P are unsure, in the table, the gallery, the CSV and the summary
    import csv
    val = str(run["data"] / "val")
    ps = {Path(r[0]).name: r[2] for r in h.predict.predict_batch(None, val, 2, str(run["best"]), None, False)[
        h.predict.batch_table].data.values.tolist()}
    cut = sorted(ps.values())[len(ps) // 2]  # one answer exactly at P: answered
    below = {n for n, q in ps.items() if q < cut}
    assert below and len(below) < len(ps)
    out = h.predict.predict_batch(None, val, 2, str(run["best"]), None, False, cut)
    rows = out[h.predict.batch_table].data.values.tolist()
    assert {Path(r[0]).name for r in rows if r[1].startswith("unsure (best guess: ")} == below
    assert sum("unsure (best guess: " in c for _, c in out[h.predict.batch_gallery]) == len(below)
    with open(out[h.predict.batch_csv], newline="") as f:
        assert {r["file"].split("/")[-1] for r in csv.DictReader(f) if r["unsure"] == "1"} == below
    assert f"**{len(below)}** unsure (p below {cut:.2f}" in out[h.predict.batch_summary]


def test_evaluate_tab_clicking_a_cell_fills_the_gallery(run, tmp_path):
    sync_api = need_chromium()
    from demo_app.ui import build_app, launch_options
    ckpts, uploads = run["checkpoints"], tmp_path / "uploads"
    demo = build_app(ckpts, run["data"], uploads)
    _, url, _ = demo.queue().launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(),
                                    quiet=True, **launch_options(ckpts, run["data"], uploads))
    counts = {(t, p): c for t, p, c in run["ckpt"]["best_val_confusion"]}
    (t, p), n = max(counts.items(), key=lambda kv: kv[1])
    names = run["ckpt"]["class_names"]
    try:
        with sync_api.sync_playwright() as pw:
            browser = launch_chromium(pw)
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(url)
            page.locator("#tab-evaluate-button, button[role=tab]:has-text('Evaluate')").first.click()
            page.wait_for_function("document.querySelector('#eval-checkpoint input') && "
                                   "document.querySelector('#eval-checkpoint input').value.includes('best_acc')")
            page.locator("#eval-btn").click()
            page.wait_for_function("document.querySelector('#eval-summary').innerText.includes('Accuracy')",
                                   timeout=120_000)
            page.wait_for_selector("#eval-confusion .js-plotly-plot .nsewdrag")
            box = page.locator("#eval-confusion .js-plotly-plot .nsewdrag").first.bounding_box()
            # rows top to bottom: true class; columns: predicted
            page.mouse.click(box["x"] + box["width"] * (p + 0.5) / 2, box["y"] + box["height"] * (t + 0.5) / 2)
            page.wait_for_function(f"document.querySelectorAll('#eval-cell-gallery img').length >= {n}",
                                   timeout=60_000)
            assert page.locator("#eval-cell-gallery img").count() == n
            title = page.locator("#eval-cell-title").inner_text()
            assert f"{n} image(s) of {names[t]} predicted {names[p]}" in title
            if os.environ.get("UPDATE_SCREENSHOTS") == "1":
                page.screenshot(path=str(SHOTS / "evaluate.png"), full_page=True)
            browser.close()
    finally:
        demo.close()


def test_evaluate_tab_reads_only_allowed_folders_when_exposed(run, tmp_path):
    """When others can reach the app, a typed folder (and the checkpoint's own data
    folder, used when the box is empty) must lie under --data-root."""
    import gradio as gr
    from core.access import AccessPolicy
    from demo_app.ui import build_app
    outside = make_image_dataset(tmp_path / "elsewhere")
    demo = build_app(run["checkpoints"], run["data"], tmp_path / "up",
                     policy=AccessPolicy.make(True, [run["checkpoints"]]))
    tab = demo.handlers.evaluate
    for folder in (str(outside / "val"), ""):  # "": the run's data folder, not under the allowed roots either
        with pytest.raises(gr.Error, match="outside the folders this app may read"):
            tab.evaluate(str(run["best"]), folder, 0)
    allowed = build_app(run["checkpoints"], run["data"], tmp_path / "up2",
                        policy=AccessPolicy.make(True, [run["checkpoints"], run["data"]])).handlers.evaluate
    shown = allowed.evaluate(str(run["best"]), "", 0.6)
    assert "Accuracy" in shown[allowed.summary] and "at min confidence 0.6" in shown[allowed.summary]


def test_top_losses_carry_the_grad_cam_of_the_answered_class(run):
    """Each top-loss image gets its own CAM (core.cam through Predictor.cam), blended at the image's size."""
    import numpy as np
    from core.cam import cam_for_image
    from core.evaluate import evaluate, labelled_images, loss_cams
    from core.images import load_rgb
    from core.predict import Predictor
    pred = Predictor.load(run["best"], "cpu")
    res = evaluate(pred, labelled_images(None, pred.class_names, pred.info, run["best"]))
    wrong, right = res.top_losses()
    cams = loss_cams(pred, wrong + right)
    assert set(cams) == {r["path"] for r in wrong + right}
    r = (wrong + right)[0]
    img = load_rgb(r["path"])
    blended = np.asarray(cams[r["path"]](img), np.float32)
    assert blended.shape == (img.height, img.width, 3)
    crop = pred.preprocess(r["path"])[None]
    m = cam_for_image(pred.cam(crop, [pred.class_names.index(r["predicted"])])[0], img, pred.resize, pred.crop)
    plain = np.asarray(img, np.float32)
    assert m.max() == 0 or np.abs(blended - plain).mean() > 1  # the heatmap is there, not the plain image
