"""Issue 15, items 2, 5 and part of 6: a model file is data from a stranger.
- Zip bombs and other files that ask for more memory than their size are
  refused from the zip directory alone, before torch.load runs.
- What a checkpoint asks for (image sizes, head size) is bounded.
- Corrupt or malformed checkpoints are refused at load with an error naming
  the field, and a prediction is never a non-finite probability.
- A failed save (full disk, file size limit) is an OSError naming the file."""
from __future__ import annotations

import collections
import io
import os
import pickle
import resource
import signal
import struct
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

from cli.common import say
from conftest import ROOT, make_image_dataset, train_config, train_run
from core import checkpoint as ck, fileio
from core.errors import CheckpointError, UserError

PY = sys.executable


# ---------------------------------------------------------------- files

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A real 1-epoch MobileNetV2 run (random init): its latest.pt, the dict in
    it, a state_dict and a full-model pickle of the same model, an image."""
    tmp = tmp_path_factory.mktemp("saved")
    data = make_image_dataset(tmp / "ds")
    _, _, end = train_run(train_config(data, tmp / "out", arch="mobilenet_v2", epochs=1, device="cpu"))
    latest = Path(end.run_dir) / "latest.pt"
    ckpt = torch.load(latest, weights_only=True)
    model = ck.model_from_checkpoint(ck.read_checkpoint(latest))
    ck.export_state_dict(model, tmp / "state_dict.pt")
    ck.export_full_model(model, ckpt["class_names"], tmp / "full.pt")
    return {"tmp": tmp, "data": data, "latest": latest, "ckpt": ckpt, "state_dict": tmp / "state_dict.pt",
            "full": tmp / "full.pt", "image": next((data / "val" / "cat").iterdir())}


def load_paths():
    from core.models import read_weights_file
    from core.predict import Predictor
    return {"load_file": fileio.load_file, "read_checkpoint": ck.read_checkpoint, "read_weights_file": read_weights_file,
            "Predictor.load": Predictor.load}


class _Storage:
    pass


class _Tensor:
    def __init__(self, n):
        self.n = n

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, (_Storage(), 0, (self.n,), (1,), False, collections.OrderedDict())


def torch_pickle(floats: int) -> bytes:
    """data.pkl as torch.save writes it for {'w': a float32 tensor of `floats`}
    whose storage is the record data/0 (built without allocating the tensor)."""
    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", floats) if isinstance(obj, _Storage) else None
    b = io.BytesIO()
    Pickler(b, protocol=2).dump({"w": _Tensor(floats)})
    return b.getvalue()


def zip_bomb(path: Path, inflated: int) -> Path:
    """A torch-format file whose one tensor record is deflated zeros: ~1/1000 of
    `inflated` bytes on disk, `inflated` bytes in memory once torch.load reads it."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", torch_pickle(inflated // 4))
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
        info = zipfile.ZipInfo("archive/data/0")
        info.compress_type = zipfile.ZIP_DEFLATED
        with z.open(info, "w", force_zip64=True) as f:
            chunk = bytes(1 << 20)
            for _ in range(inflated // len(chunk)):
                f.write(chunk)
    return path


def rezipped(src: Path, dst: Path) -> Path:
    """The same checkpoint, every entry deflated (what a zip tool makes of it)."""
    buf = io.BytesIO()  # with torch's CRC32s, which zipfile checks (latest.pt is written without)
    torch.save(torch.load(src, weights_only=True), buf)
    with zipfile.ZipFile(buf) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info))
    return dst


def patched_directory(src: Path, dst: Path, entries: int = 0, offset: int = 0, zip64: bool = True) -> Path:
    """src with its directory's entry count and offset changed in the end record
    and (zip64) in the zip64 end record that torch also writes."""
    data = bytearray(src.read_bytes())
    at = data.rfind(b"PK\x05\x06")
    v = list(struct.unpack_from("<4s4H2LH", data, at))
    v[3], v[4], v[6] = v[3] + entries, v[4] + entries, v[6] + offset
    struct.pack_into("<4s4H2LH", data, at, *v)
    if zip64:
        at = data.rfind(b"PK\x06\x06")
        v = list(struct.unpack_from("<4sQ2H2L4Q", data, at))
        v[6], v[7], v[9] = v[6] + entries, v[7] + entries, v[9] + offset
        struct.pack_into("<4sQ2H2L4Q", data, at, *v)
    dst.write_bytes(bytes(data))
    return dst


def many_entries(path: Path, n: int) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"epoch": 1}, protocol=2))
        for i in range(n):
            z.writestr(f"archive/data/{i}", b"")
    return path


def big_pickle(path: Path, legacy: bool) -> Path:
    obj = {"note": "x" * (17 * 2**20)}
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


def no_torch_load(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("torch.load was called on a file that should have been refused first")
    monkeypatch.setattr(torch, "load", refuse)


# ---------------------------------------------------------------- item 2: zip bombs

def test_zip_bombs_are_refused_from_the_directory_before_torch_load(saved, tmp_path, monkeypatch):
    t = tmp_path
    cases = {
        "compressed": (zip_bomb(t / "bomb.pt", 50 * 2**20), "compressed"),
        "rezipped": (rezipped(saved["latest"], t / "rezipped.pt"), "re-zipped"),
        "moved-directory": (patched_directory(saved["latest"], t / "moved.pt", offset=-1),
                            "zip directory is not where its end record says"),
        "entry-count-lie": (patched_directory(saved["latest"], t / "count.pt", entries=1), "end record says"),
        "records-disagree": (patched_directory(saved["latest"], t / "disagree.pt", offset=-1, zip64=False),
                             "two zip end records disagree"),
        "too-many-entries": (many_entries(t / "many.pt", 10_001), "10,002 entries"),
        "big-pickle": (big_pickle(t / "pkl.pt", legacy=False), "pickle"),
        "big-legacy-pickle": (big_pickle(t / "legacy.pt", legacy=True), "pickle over"),
    }
    huge = t / "huge.pt"
    with open(huge, "wb") as f:  # sparse: 3 GiB that use no disk
        f.write(saved["latest"].read_bytes()[:4096])
        f.truncate(3 * 2**30)
    cases["huge-file"] = (huge, "model files over 2.0 GiB are refused")
    no_torch_load(monkeypatch)
    for name, (path, needle) in cases.items():
        for where, load in load_paths().items():
            with pytest.raises(UserError) as e:
                load(path)
            msg = str(e.value)
            assert needle in msg and path.name in msg and "\n" not in msg, (name, where, msg)
        assert ck.saved_epoch(path) is None, name  # peeking at a run folder's files is guarded too


def test_a_zip_bomb_never_inflates(tmp_path):
    """Memory, measured: the process that reads a 300 MB bomb (0.3 MB on disk)
    grows by far less than 300 MB (torch.load alone inflates all of it)."""
    bomb = zip_bomb(tmp_path / "bomb.pt", 300 * 2**20)
    assert bomb.stat().st_size < 2 * 2**20
    code = textwrap.dedent(f"""
        import resource, sys
        sys.path.insert(0, {str(ROOT)!r})
        import torch, predict
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        code = predict.main(["--image", {str(tmp_path)!r}, "--checkpoint", {str(bomb)!r}, "--device", "cpu"])
        grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print("EXIT", code, "GREW_KB", grew)
    """)
    (tmp_path / "x.png").write_bytes(b"")  # the image folder is checked first; the load must not matter
    from PIL import Image
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, TL_OFFLINE="1"))
    exit_code, grew_kb = r.stdout.split()[1], int(r.stdout.split()[3])
    assert exit_code == "2" and "zip bomb" in r.stderr, (r.stdout, r.stderr)
    assert grew_kb < 100 * 1024, f"grew by {grew_kb / 1024:.0f} MB while refusing a 300 MB bomb"


def test_a_checkpoint_cannot_ask_for_huge_images_or_heads(saved, tmp_path):
    from core.predict import Predictor
    good = saved["ckpt"]
    bad = {
        "preprocess.resize": dict(good, preprocess={**good["preprocess"], "resize": 20000}),
        "preprocess.crop": dict(good, preprocess={**good["preprocess"], "crop": 8}),
        "preprocess.crop ": dict(good, preprocess={**good["preprocess"], "crop": 300}),  # > resize 256
        "preprocess.resize  ": dict(good, preprocess={**good["preprocess"], "resize": "256"}),
        "preprocess": dict(good, preprocess=[256, 224]),
        "head.num_classes": dict(good, head={**good["head"], "num_classes": 10**6}),
        "head.num_classes ": dict(good, head={**good["head"], "num_classes": 3}),  # the state has 2
        "head.dropout": dict(good, head={**good["head"], "dropout": 7.0}),
    }
    for field, obj in bad.items():
        torch.save(obj, tmp_path / "bad.pt")
        for load in (Predictor.load, ck.read_checkpoint):
            with pytest.raises(CheckpointError) as e:
                load(tmp_path / "bad.pt")
            msg = str(e.value)
            assert field.strip() in msg and "allowed" in msg and "\n" not in msg, (field, msg)


def test_large_crops_predict_in_smaller_batches(saved, tmp_path):
    """A legal but large crop (1024) keeps the memory of a default batch near a 224 one's."""
    from core.predict import Predictor
    torch.save(dict(saved["ckpt"], preprocess={"resize": 1024, "crop": 1024}), tmp_path / "big.pt")
    assert Predictor.load(tmp_path / "big.pt").default_batch_size() == 1
    assert Predictor.load(saved["latest"]).default_batch_size() == 8


def test_cached_imagenet_weights_are_checked_before_torchvision_loads_them(tmp_path, offline_torch_home, monkeypatch):
    from core.errors import WeightsError
    from core.models import imagenet_cache_path, imagenet_state_dict
    cached = imagenet_cache_path("mobilenet_v2")
    cached.parent.mkdir(parents=True, exist_ok=True)
    zip_bomb(cached, 20 * 2**20)
    no_torch_load(monkeypatch)
    with pytest.raises(WeightsError, match="cached ImageNet weights for mobilenet_v2 cannot be used: .*zip bomb"):
        imagenet_state_dict("mobilenet_v2")

# ---------------------------------------------------------------- item 5: corrupt checkpoints

def with_state(ckpt: dict, key: str, fn) -> dict:
    state = {k: v.clone() for k, v in ckpt["model_state"].items()}
    fn(state[key])
    return dict(ckpt, model_state=state)


def test_negative_batchnorm_variance_is_refused_in_every_format(saved, tmp_path):
    from core.predict import Predictor
    key = "features.1.conv.0.1.running_var"
    bad = with_state(saved["ckpt"], key, lambda t: t.__setitem__(0, -1.0))
    torch.save(bad, tmp_path / "ckpt.pt")
    torch.save(bad["model_state"], tmp_path / "sd.pt")
    full = torch.load(saved["full"], weights_only=False)
    dict(full.named_buffers())[key][0] = -1.0
    torch.save(full, tmp_path / "full.pt")
    for path, kw in ((tmp_path / "ckpt.pt", {}), (tmp_path / "sd.pt", {"arch": "mobilenet_v2"}),
                     (tmp_path / "full.pt", {"trust_pickle": True})):
        with pytest.raises(CheckpointError, match=rf"{path.name} holds a negative BatchNorm variance in {key}"):
            Predictor.load(path, **kw)


def test_class_names_must_be_unique_non_empty_strings_matching_the_head(saved, tmp_path, capsys):
    import predict
    from core.predict import Predictor
    good = saved["ckpt"]
    for names in ("ab", [1, 2], ["cat", "cat"], [["cat"], ["fish"]], ["cat", ""], ["cat"], ["a", "b", "c"],
                  {"cat": 0, "fish": 1}, ["cat", "fi\x00sh"]):
        torch.save(dict(good, class_names=names), tmp_path / "bad.pt")
        for load in (Predictor.load, ck.read_checkpoint):
            with pytest.raises(CheckpointError, match="class_names") as e:
                load(tmp_path / "bad.pt")
            assert "\n" not in str(e.value)
    # none recorded: numbered, and said so
    torch.save(dict(good, class_names=None), tmp_path / "none.pt")
    pred = Predictor.load(tmp_path / "none.pt")
    assert pred.class_names == ["class_0", "class_1"] and pred.info["class_names_recorded"] is False
    assert predict.main(["--image", str(saved["image"]), "--checkpoint", str(tmp_path / "none.pt"), "--device", "cpu"]) == 0
    assert "NOTE: the checkpoint dict records no class names, so they are numbered" in capsys.readouterr().err
    # --classes is held to the same rules
    for classes in (["cat", "cat"], ["cat", ""]):
        with pytest.raises(UserError) as e:
            Predictor.load(saved["state_dict"], arch="mobilenet_v2", classes=classes)
        assert "--classes" in say(e.value.message, e.value.field), e.value.message


ODD_FIELDS = [
    ("epoch", "3"), ("epoch", -1), ("epoch", True), ("epoch", 2**2000), ("epoch", 2.5),
    ("best_epoch", 9), ("best_loss_epoch", "1"),
    ("best_val_acc", float("nan")), ("best_val_acc", 1.5), ("best_val_acc", "0.9"),
    ("best_val_loss", float("nan")), ("best_val_loss", -1.0),
    ("format_version", "1"), ("format_version", -2),
    ("arch", 5), ("arch", ["resnet18"]), ("policy", "most"),
    ("weights", 3), ("args", "lr=0.1"), ("args", {"dropout": "half"}), ("args", {"epochs": float("inf")}),
    ("args", {"seed": 2**2000}), ("args", {"freeze_backbone": "yes"}),
    ("history", "epoch 1"), ("history", [{"epoch": "one", "val_acc": 0.5}]), ("history", [{"val_acc": [1]}]),
    ("history", {"val_acc": [0.5, "x"]}),
    ("head", 2), ("head", {"num_classes": 2.0, "dropout": 0.0}),
    ("temperature", 0.0), ("temperature", float("inf")), ("temperature", "1"),
    ("optimizer_state", "adam"), ("optimizer_state", {"state": {}, "param_groups": "x"}),
    ("scaler_state", [1]),
]


@pytest.mark.parametrize("field,value", ODD_FIELDS, ids=[f"{f}-{i}" for i, (f, _) in enumerate(ODD_FIELDS)])
def test_malformed_metadata_is_refused_naming_the_field(saved, tmp_path, field, value):
    from core.predict import Predictor
    torch.save(dict(saved["ckpt"], **{field: value}), tmp_path / "odd.pt")
    loads = [ck.read_checkpoint]
    if field not in ("optimizer_state", "scaler_state"):  # prediction never reads the training state
        loads.append(Predictor.load)
    for load in loads:
        with pytest.raises(CheckpointError) as e:
            load(tmp_path / "odd.pt")
        msg = str(e.value)
        assert field in msg and "odd.pt" in msg and "\n" not in msg and len(msg) < 600, msg


def test_non_finite_tensors_anywhere_are_refused_on_resume(saved, tmp_path):
    opt = saved["ckpt"]["optimizer_state"]
    first = next(iter(opt["state"]))
    state = {k: (v.clone().fill_(float("nan")) if k == "exp_avg" else v) for k, v in opt["state"][first].items()}
    bad = dict(saved["ckpt"], optimizer_state={**opt, "state": {**opt["state"], first: state}})
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=rf"optimizer_state.state.{first}.exp_avg holds NaN or infinite values"):
        ck.read_checkpoint(tmp_path / "bad.pt")


def test_weights_files_with_damaged_tensors_are_refused(saved, tmp_path):
    from core.models import read_weights_file
    state = torch.load(saved["state_dict"], weights_only=True)
    for key, value in (("features.0.0.weight", float("nan")), ("features.0.1.running_var", -1.0)):
        bad = dict(state, **{key: state[key].clone().fill_(value)})
        torch.save(bad, tmp_path / "w.pt")
        with pytest.raises(CheckpointError, match=rf"w.pt: \['{key}'\] holds (NaN or infinite|negative) values"):
            read_weights_file(tmp_path / "w.pt")


def test_per_class_counts_past_any_real_count_are_dropped():
    from core.metrics import clean_confusion
    assert clean_confusion([[0, 0, 2**60], [0, 1, 3]], 2) == [[0, 1, 3]]

def test_a_prediction_is_never_a_non_finite_probability(saved, tmp_path):
    """Finite weights whose outputs overflow float32: an error, not p=nan."""
    from core.predict import Predictor
    bad = with_state(saved["ckpt"], "classifier.1.weight", lambda t: t.fill_(3e38))  # finite...
    bad = with_state(bad, "features.18.1.bias", lambda t: t.fill_(10.0))  # ...but 1280 features of 6 overflow
    torch.save(bad, tmp_path / "overflow.pt")
    pred = Predictor.load(tmp_path / "overflow.pt")
    with pytest.raises(CheckpointError, match="overflow.pt gives non-finite outputs"):
        pred.predict_image(saved["image"])
    with pytest.raises(CheckpointError, match="non-finite"):
        list(pred.predict_paths([saved["image"]]))


def test_cli_refuses_corrupt_checkpoints_with_one_line(saved, tmp_path, capsys):
    import predict
    import train
    bad = with_state(saved["ckpt"], "features.1.conv.0.1.running_var", lambda t: t.__setitem__(0, -1.0))
    torch.save(bad, tmp_path / "negvar.pt")
    torch.save(dict(saved["ckpt"], class_names="ab"), tmp_path / "names.pt")
    torch.save(dict(saved["ckpt"], epoch="7"), tmp_path / "epoch.pt")
    for name in ("negvar.pt", "names.pt", "epoch.pt"):
        assert predict.main(["--image", str(saved["image"]), "--checkpoint", str(tmp_path / name),
                             "--device", "cpu"]) == 2, name
        captured = capsys.readouterr()
        assert "TOPK" not in captured.out and "p=nan" not in captured.out
        assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
        assert train.main(["--data-dir", str(saved["data"]), "--resume", str(tmp_path / name), "--epochs", "3",
                           "--device", "cpu", "--output-dir", str(tmp_path / "out")]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "internal error" not in err, err


# ---------------------------------------------------------------- item 6: clear errors

SIZE_LIMITED = textwrap.dedent("""
    import resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, like a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))
    sys.path.insert(0, {root!r})
""")


def test_a_failed_checkpoint_write_is_an_oserror_naming_the_file(tmp_path):
    code = SIZE_LIMITED.format(root=str(ROOT)) + textwrap.dedent(f"""
        import errno, os, torch
        from core import fileio
        target = {str(tmp_path / "latest.pt")!r}
        fileio.atomic_torch_save({{"epoch": 1}}, target)
        for crc in (False, True):
            try:
                fileio.atomic_torch_save({{"epoch": 2, "w": torch.zeros(2**20)}}, target, crc=crc)
            except OSError as e:
                print("OSError", errno.errorcode[e.errno], e.filename == target, e.strerror)
        print("KEPT", torch.load(target, weights_only=True)["epoch"], sorted(os.listdir({str(tmp_path)!r})))
    """)
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.count("OSError EFBIG True") == 2, (r.stdout, r.stderr)
    assert "KEPT 1 ['latest.pt']" in r.stdout


def test_train_with_a_full_disk_says_so(tmp_path):
    # In-process decoding: the file-size limit that stands in for a full disk would
    # also hit DataLoader workers' shared-memory files (/dev/shm), which a full
    # checkpoint disk does not.
    data = make_image_dataset(tmp_path / "ds")
    code = SIZE_LIMITED.format(root=str(ROOT)) + textwrap.dedent(f"""
        import train
        sys.exit(train.main(["--data-dir", {str(data)!r}, "--weights", "none", "--epochs", "1", "--batch-size", "4",
                             "--device", "cpu", "--output-dir", {str(tmp_path / "out")!r}, "--num-workers", "0"]))
    """)
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, TL_OFFLINE="1"))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "internal error" not in r.stderr and "inline_container" not in r.stderr, r.stderr
    assert "could not write checkpoints" in r.stderr and "File too large" in r.stderr, r.stderr


def test_a_worker_that_cannot_hand_over_its_batch_stops_the_run_with_advice(tmp_path):
    # The same file-size limit makes a DataLoader worker's shared-memory batch file
    # fail to grow; torch's queue feeder would drop that error and the run would wait
    # forever. A hang shows here as TimeoutExpired. (A batch of 8 crops is 1.2 MB.)
    data = make_image_dataset(tmp_path / "ds", n_train=8, size=(480, 400))
    code = SIZE_LIMITED.format(root=str(ROOT)) + textwrap.dedent(f"""
        import train
        sys.exit(train.main(["--data-dir", {str(data)!r}, "--weights", "none", "--epochs", "1", "--batch-size", "8",
                             "--policy", "full", "--cache-budget-mb", "1", "--num-workers", "1",
                             "--device", "cpu", "--output-dir", {str(tmp_path / "out")!r}]))
    """)
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=240,
                       env=dict(os.environ, TL_OFFLINE="1"))
    assert r.returncode == 2, (r.stdout, r.stderr)
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the image-decoding worker process(es) stopped delivering batches"), r.stderr
    assert "rerun with --num-workers 0" in last and "Traceback" not in r.stderr, r.stderr


def test_a_device_file_is_not_called_missing(tmp_path):
    with pytest.raises(CheckpointError, match="/dev/zero is not a regular file"):
        fileio.check_model_file("/dev/zero", "weights file")
    with pytest.raises(CheckpointError, match="does not exist"):
        fileio.check_model_file(tmp_path / "nope.pth", "weights file")
    with pytest.raises(CheckpointError, match="is a folder"):
        fileio.check_model_file(tmp_path, "weights file")


def test_csv_under_a_file_says_the_file_is_not_a_folder(saved, tmp_path, capsys):
    import predict
    (tmp_path / "afile").write_text("x")
    for csv in ("afile/x.csv", "afile/deeper/x.csv"):
        assert predict.main(["--image", str(saved["image"]), "--checkpoint", str(saved["latest"]),
                             "--csv", str(tmp_path / csv), "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert f"{tmp_path / 'afile'} is a file, not a folder" in err and "does not exist" not in err, err


@pytest.mark.parametrize("image_size,resize_size", [(224, 1025), (1025, 1025), (16, 256)])
def test_training_refuses_sides_its_own_checkpoint_would_be_refused_for(image_size, resize_size):
    """A run trained at a size past the checkpoint rules would save files its own predict.py refuses."""
    from core.config import TrainConfig
    from core.errors import ConfigError
    with pytest.raises(ConfigError) as e:
        TrainConfig(image_size=image_size, resize_size=resize_size).validate()
    assert e.value.field == "image_size" and "1024" in str(e.value)
