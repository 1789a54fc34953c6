"""Evaluate a model on a labelled folder: accuracy, per-class precision / recall
/ F1, the confusion matrix, calibration (ECE, reliability bins) and the abstain
rule's risk-coverage trade-off. Images go through the same Predictor as
predict.py (one preprocessing path, the checkpoint's temperature applied)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import calibration as cal
from .data import read_split_folder, scan_dataset, scan_split
from .errors import ConfigError, DatasetError, UserError
from .metrics import confusion_pairs
from .predict import Predictor

DENSE_MAX = 60  # classes up to which a confusion matrix is shown whole (text, heatmap)
TOP_LOSSES = 12  # images per top-losses list


@dataclass
class EvalConfig:
    checkpoint: str
    data: str | None = None  # labelled folder, or a dataset root whose val/ is used; None: the checkpoint's own val
    out: str | None = None
    min_confidence: float | None = None  # below it an answer is "unsure"
    device: str = "auto"
    batch_size: int | None = None
    trust_pickle: bool = False
    arch: str | None = None  # for a bare state_dict
    classes: list[str] | None = None  # for a bare state_dict or a full model

    def validate(self) -> "EvalConfig":
        if not str(self.checkpoint).strip():
            raise ConfigError("{setting} is empty; give a .pt file (e.g. checkpoints/RUN/best_acc.pt)",
                              field="checkpoint")
        check_min_confidence(self.min_confidence)
        if self.batch_size is not None and (type(self.batch_size) is not int or self.batch_size < 1):
            raise ConfigError(f"{{setting}} must be >= 1 (got {self.batch_size})", field="batch_size")
        if self.data is not None and not str(self.data).strip():
            raise ConfigError("{setting} is empty; give a folder of <class>/ sub-folders", field="data")
        return self


def check_min_confidence(value) -> float | None:
    """None (no abstain rule) or a probability from 0 to 1."""
    if value is None:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= float(value) <= 1.0
    if not ok:
        raise ConfigError(f"{{setting}} must be a probability from 0 to 1 (got {value!r}); answers whose top "
                          f"probability is below it are 'unsure'", field="min_confidence", value=value, allowed=(0, 1))
    return float(value)


def is_unsure(p: float | None, min_confidence: float | None) -> bool:
    """The abstain rule: the best guess's probability is below P."""
    return min_confidence is not None and p is not None and p < min_confidence


@dataclass
class Labelled:
    """The images to evaluate and their true classes (indices into the model's classes)."""
    source: str  # the folder, as shown
    samples: list[tuple[str, int]]
    note: str = ""
    warning: str = ""


def default_data(info: dict, checkpoint) -> tuple[Path, float | None, int]:
    """The checkpoint's own dataset: (folder, val_split, seed) from its args. A
    relative data_dir is tried from here and from where training ran (the run
    folder's output_dir, counted back from the checkpoint's location)."""
    args = info.get("args") or {}
    data_dir = args.get("data_dir")
    if not data_dir:
        raise UserError("the checkpoint records no data folder (args.data_dir); pass {setting}", field="data")
    candidates = [Path(data_dir).expanduser()]
    out = args.get("output_dir")
    ck = Path(checkpoint).expanduser().resolve()
    if not candidates[0].is_absolute() and out and not Path(out).is_absolute():
        depth = len(Path(out).parts)  # checkpoints/RUN/best.pt: training ran `depth` folders above RUN's parent
        root = ck.parent.parent
        for _ in range(depth):
            root = root.parent
        candidates.append(root / data_dir)
    for c in candidates:
        if c.is_dir():
            return c, args.get("val_split"), int(args.get("seed") or 0)
    tried = " or ".join(str(c) for c in dict.fromkeys(candidates))
    raise UserError(f"the checkpoint was trained on {data_dir}, which is not there ({tried}); pass {{setting}} "
                    f"with a labelled folder", field="data", value=data_dir)


def held_out_changed(info: dict, ds) -> str:
    """A warning when the val images held out of train/ now are not the ones
    training held out (train/ gained, lost or renamed images since): the
    checkpoint's record of its files differs, or (older checkpoints) the count per
    class its val confusion records."""
    files = info.get("data_files")
    if isinstance(files, dict) and isinstance(files.get("sha256"), str):
        now_files = ds.fingerprint()
        changed = now_files["sha256"] != files["sha256"]
        what = f"{files.get('images')} images then, {now_files['images']} now"
    else:
        recorded = info.get("val_confusion")
        if not recorded:
            return ""
        then = [0] * len(ds.classes)
        for t, _, n in recorded:
            then[t] += n
        now = [0] * len(ds.classes)
        for _, y in ds.val.samples:
            now[y] += 1
        changed = then != now
        what = "held-out val images per class then -> now: " + "; ".join(
            f"{c} {a} -> {b}" for c, a, b in zip(ds.classes, then, now) if a != b)
    return (f"train/ has changed since this model was trained ({what}), so the val images held out now are not "
            f"the ones training held out, and some of them were trained on: these numbers can be too good. For an "
            f"honest score, evaluate a folder of images the model never saw") if changed else ""


def classes_changed(root, now: list[str], classes: list[str]) -> DatasetError:
    return DatasetError(f"{root} now has classes {now}, the model {list(classes)}; pass {{setting}}", field="data")


def labelled_images(data, classes: list[str], info: dict | None = None, checkpoint=None) -> Labelled:
    """The images of `data` (a folder of <class>/ sub-folders, or a dataset
    root with val/) labelled by folder name; data None: the checkpoint's own
    validation split, exactly as training split it. A class folder the model
    does not know is an error (its images could never be right)."""
    if data is None:
        root, val_split, seed = default_data(info or {}, checkpoint)
        now = read_split_folder(root / "train").classes if (root / "train").is_dir() else None
        if now is not None and now != list(classes):  # before the scan, whose complaints would be about the split
            raise classes_changed(root, now, classes)
        ds = scan_dataset(root, val_split, seed)
        if ds.classes != list(classes):
            raise classes_changed(root, ds.classes, classes)
        where = f"{root}/val" if ds.val_from_split is None else f"{root} ({ds.val_from_split:g} of train/ held out, seed {seed})"
        warning = held_out_changed(info or {}, ds) if ds.val_from_split is not None else ""
        return Labelled(where, list(ds.val.samples), warning=warning)
    p = Path(str(data).strip()).expanduser()
    if not p.is_dir():
        raise DatasetError(f"{{setting}} {p} is not a folder; give a folder of <class>/ sub-folders (or a dataset "
                           f"root with val/)", field="data", value=str(p))
    folder = p / "val" if (p / "val").is_dir() else p
    split = read_split_folder(folder)
    unknown = [c for c in split.classes if c not in classes]
    if unknown:
        if (info or {}).get("class_names_recorded") is False:  # numbered: the names were never given
            raise DatasetError(f"the model file records no class names (they are numbered {list(classes)}), so the "
                               f"folders of {folder} cannot be matched; pass {{setting:classes}} in the order "
                               f"the model was trained with, e.g. {','.join(split.classes)}", field="data")
        raise DatasetError(f"{folder} has class folder(s) the model does not know: {unknown}; it knows {list(classes)}. "
                           f"Move those folders out (or point {{setting}} at a folder with only known classes)",
                           field="data", value=str(folder))
    if not split.classes:
        raise DatasetError(f"{folder} has no class sub-folders; give a folder laid out as <class>/<images>",
                           field="data", value=str(folder))
    scanned = scan_split(folder, "eval", split.classes, split)
    index = {c: i for i, c in enumerate(classes)}
    samples = [(path, index[split.classes[y]]) for path, y in scanned.samples]
    if not samples:
        raise DatasetError(f"no images found in the class folders of {folder}", field="data", value=str(folder))
    missing = [c for c in classes if c not in split.classes]
    note = f"no folder for class(es) {missing}: their recall is not measured" if missing else ""
    return Labelled(str(folder), samples, note)


@dataclass
class EvalResult:
    classes: list[str]
    source: str
    rows: list[dict]  # per readable image: path, true, predicted, p, p_true, correct, unsure, topk
    unreadable: list[tuple[str, str]]
    temperature: float
    min_confidence: float | None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # filled by measure():
    accuracy: float = math.nan
    per_class: list[dict] = field(default_factory=list)
    macro: dict = field(default_factory=dict)
    weighted: dict = field(default_factory=dict)
    confusion: list[list[int]] = field(default_factory=list)  # sparse [true, predicted, count]
    ece: float = math.nan
    ece_t1: float = math.nan  # at temperature 1 (before calibration)
    nll: float = math.nan
    nll_t1: float = math.nan
    reliability: list[dict] = field(default_factory=list)
    risk_coverage: list[dict] = field(default_factory=list)
    at_p: dict | None = None

    def dense_confusion(self) -> list[list[int]]:
        n = len(self.classes)
        m = [[0] * n for _ in range(n)]
        for t, p, c in self.confusion:
            m[t][p] += c
        return m

    def cell(self, true: str, predicted: str) -> list[dict]:
        """The rows (images) of one confusion-matrix cell."""
        return [r for r in self.rows if r["true"] == true and r["predicted"] == predicted]

    def top_losses(self, n: int = TOP_LOSSES) -> tuple[list[dict], list[dict]]:
        """(the most confidently wrong, the least confident right)."""
        wrong = sorted((r for r in self.rows if not r["correct"]), key=lambda r: (-r["p"], r["path"]))
        right = sorted((r for r in self.rows if r["correct"]), key=lambda r: (r["p"], r["path"]))
        return wrong[:n], right[:n]

    def csv_rows(self) -> list[dict]:
        return [{"file": r["path"], "true": r["true"], "label": r["predicted"], "p": f"{r['p']:.4f}",
                 "p_true": f"{r['p_true']:.4f}", "correct": int(r["correct"]), "unsure": int(r["unsure"]),
                 "topk": ";".join(f"{lab}:{p:.4f}" for lab, p in r["topk"])} for r in self.rows]


def evaluate(pred: Predictor, labelled: Labelled, min_confidence: float | None = None,
             batch_size: int | None = None, progress=None) -> EvalResult:
    """Predict every image (batched) and measure. progress(done, total) per image, if given."""
    classes = pred.class_names
    paths = [p for p, _ in labelled.samples]
    truth = dict(labelled.samples)
    rows, unreadable, probs, labels = [], [], [], []
    k = min(5, len(classes))
    for i, r in enumerate(pred.predict_paths(paths, k, batch_size, keep_probs=True), 1):
        if progress:
            progress(i, len(paths))
        if r.error:
            unreadable.append((r.path, r.error))
            continue
        y = truth[r.path]
        probs.append(r.probs)
        labels.append(y)
        rows.append({"path": r.path, "true": classes[y], "predicted": r.label, "p": r.p,
                     "p_true": float(r.probs[y]), "correct": r.label == classes[y],
                     "unsure": is_unsure(r.p, min_confidence), "topk": r.topk})
    if not rows:
        raise DatasetError(f"none of the {len(paths)} image(s) in {labelled.source} could be read")
    result = EvalResult(list(classes), labelled.source, rows, unreadable, pred.temperature, min_confidence,
                        [labelled.note] if labelled.note else [], [labelled.warning] if labelled.warning else [])
    return measure(result, torch.stack(probs), torch.tensor(labels))


def measure(res: EvalResult, probs: torch.Tensor, labels: torch.Tensor) -> EvalResult:
    """All metrics from the (N, C) calibrated probabilities and the true labels."""
    n_cls = len(res.classes)
    conf, predicted = probs.max(1)
    correct = predicted == labels
    res.accuracy = float(correct.double().mean())
    res.confusion = confusion_pairs(labels, predicted)
    support = torch.bincount(labels, minlength=n_cls)
    n_pred = torch.bincount(predicted, minlength=n_cls)
    tp = torch.bincount(labels[correct], minlength=n_cls)
    rows = []
    for i, name in enumerate(res.classes):
        precision = tp[i].item() / n_pred[i].item() if n_pred[i] else 0.0
        recall = tp[i].item() / support[i].item() if support[i] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append({"class": name, "precision": precision, "recall": recall, "f1": f1,
                     "support": int(support[i]), "predicted": int(n_pred[i])})
    res.per_class = rows
    present = [r for r in rows if r["support"]]  # as scikit-learn's labels=present classes: absent ones are not scored
    total = sum(r["support"] for r in present)
    for key in ("precision", "recall", "f1"):
        res.macro[key] = sum(r[key] for r in present) / len(present)
        res.weighted[key] = sum(r[key] * r["support"] for r in present) / total
    res.macro["support"] = res.weighted["support"] = total
    res.ece = cal.ece(conf, correct)
    res.reliability = cal.bins(conf, correct)
    res.risk_coverage = cal.risk_coverage(conf, correct)
    logp = torch.log(probs.double().clamp_min(1e-300))
    res.nll = float(torch.nn.functional.nll_loss(logp, labels))
    # softmax(T * log p) = softmax(logits): the uncalibrated probabilities, from the calibrated ones
    raw = torch.log_softmax(logp * res.temperature, 1)
    res.nll_t1 = float(torch.nn.functional.nll_loss(raw, labels))
    res.ece_t1 = cal.ece(raw.exp().max(1).values, correct)
    if res.min_confidence is not None:
        res.at_p = cal.at_threshold(conf, correct, res.min_confidence)
    return res


CAM_ALPHA = 0.45  # heatmap opacity over a top-loss thumbnail
CAM_BATCH = 8  # images per Grad-CAM pass (it keeps activations for the backward pass)


def loss_cams(pred: Predictor, rows: list[dict], alpha: float = CAM_ALPHA) -> dict | None:
    """path -> overlay(image): Grad-CAM of the class the model answered,
    blended over the image at its own size (core.cam). Where the model looked
    when it was wrong is the point of a top-losses sheet. None when core.cam
    is not available."""
    try:
        from .cam import blend_cam, cam_for_image
    except ImportError:
        return None
    out = {}
    for start in range(0, len(rows), CAM_BATCH):
        crops, keep = [], []
        for r in rows[start:start + CAM_BATCH]:
            try:
                crops.append(pred.preprocess(r["path"]))
                keep.append(r)
            except UserError:  # unreadable now: its thumbnail says so
                continue
        if not crops:
            continue
        maps = pred.cam(torch.stack(crops), [pred.class_names.index(r["predicted"]) for r in keep])
        for r, m in zip(keep, maps):
            out[r["path"]] = lambda img, m=m: blend_cam(img, cam_for_image(m, img, pred.resize, pred.crop), alpha)
    return out


def matrix_lines(res: EvalResult) -> list[str]:
    """The confusion matrix as text (rows: true class, columns: predicted); past
    DENSE_MAX classes, the most frequent confusions instead."""
    names = res.classes
    if len(names) > DENSE_MAX:
        off = sorted((c, t, p) for t, p, c in res.confusion if t != p)[::-1][:20]
        return ["CONFUSION: most frequent mistakes (true -> predicted: images)"] + [
            f"  {names[t]} -> {names[p]}: {c}" for c, t, p in off]
    m = res.dense_confusion()
    w = max(5, max(len(n) for n in names) + 1, max(len(str(v)) for row in m for v in row) + 1)
    head = " " * (w + 2) + "".join(f"{n[:w - 1]:>{w}}" for n in names)
    return (["CONFUSION: rows = true class, columns = predicted", head] +
            [f"  {names[i]:<{w}}" + "".join(f"{v:>{w}}" for v in row) for i, row in enumerate(m)])


def report_lines(res: EvalResult) -> list[str]:
    """What evaluate.py prints, after the CHECKPOINT header."""
    n = len(res.rows)
    right = sum(r["correct"] for r in res.rows)
    w = max(12, max(len(c) for c in res.classes) + 2)
    lines = [f"DATA: {res.source} ({n} images" + (f", {len(res.unreadable)} unreadable" if res.unreadable else "") + ")"]
    lines += [f"WARNING: {w}" for w in res.warnings] + [f"NOTE: {note}" for note in res.notes]
    lines += [f"ACCURACY: {res.accuracy:.4f} ({right}/{n})",
              f"PER_CLASS: {'class':<{w}}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}"]
    for r in res.per_class:
        lines.append(f"  {r['class']:<{w}}{r['precision']:>10.4f}{r['recall']:>10.4f}{r['f1']:>10.4f}{r['support']:>9}")
    for name, avg in (("macro avg", res.macro), ("weighted avg", res.weighted)):
        lines.append(f"  {name:<{w}}{avg['precision']:>10.4f}{avg['recall']:>10.4f}{avg['f1']:>10.4f}{avg['support']:>9}")
    lines += matrix_lines(res)
    lines.append(f"CALIBRATION: ECE ({cal.ECE_BINS} bins) {res.ece:.4f}, NLL {res.nll:.4f} at temperature "
                 f"{res.temperature:.4f}" + ("" if res.temperature == 1.0 else
                                              f" (at T=1: ECE {res.ece_t1:.4f}, NLL {res.nll_t1:.4f})"))
    if res.at_p is not None:
        a = res.at_p
        acc = f"{a['accuracy']:.4f}" if a["accuracy"] is not None else "n/a"
        lines.append(f"MIN_CONFIDENCE: {res.min_confidence:g}: {a['kept']}/{a['total']} answered "
                     f"(coverage {a['coverage']:.4f}), accuracy {acc} on those; {a['total'] - a['kept']} unsure")
    return lines
