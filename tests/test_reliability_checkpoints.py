"""Issue 5.1: checkpoints are data, not code. Every load path (predict
--checkpoint, train --resume, train --weights, the library) refuses pickled
code with a one-line message and the code never runs; damaged files give a
clear error; --trust-pickle 1 is the only way to load a full-model pickle.
Also the atomic-write guarantees of core.fileio."""
from __future__ import annotations

import csv
import errno
import os
import pickle
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, make_image_dataset
from core import checkpoint as ck, fileio
from core.errors import CheckpointError, UserError, WeightsError
from core.run_folder import recover_run_folder

PY = sys.executable


# ---------------------------------------------------------------- helpers

class _ExecPayload:
    """Unpickling runs exec(code): the classic malicious checkpoint."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"import pathlib; pathlib.Path({self.marker!r}).touch()",)


class _SystemPayload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def make_evil(kind: str, path: Path, marker: Path, real_ckpt: Path | None = None) -> Path:
    """Files whose unpickling would create `marker`."""
    if kind == "exec":
        torch.save(_ExecPayload(marker), path)
    elif kind == "os.system":
        torch.save(_SystemPayload(marker), path)
    elif kind == "inside-checkpoint-dict":
        # a real, loadable checkpoint with one poisoned field
        obj = torch.load(real_ckpt, weights_only=True)
        obj["args"] = {"note": _ExecPayload(marker)}
        torch.save(obj, path)
    elif kind == "inside-state-dict":
        obj = torch.load(real_ckpt, weights_only=True)["model_state"]
        obj["fc.weight"] = _ExecPayload(marker)
        torch.save(obj, path)
    elif kind == "legacy-format":
        torch.save(_ExecPayload(marker), path, _use_new_zipfile_serialization=False)
    elif kind == "raw-pickle":
        path.write_bytes(pickle.dumps(_ExecPayload(marker), protocol=2))
    else:
        raise ValueError(kind)
    return path


EVIL_KINDS = ["exec", "os.system", "inside-checkpoint-dict", "inside-state-dict", "legacy-format", "raw-pickle"]


def run_cli(script: str, *args, cwd: Path, timeout=180) -> subprocess.CompletedProcess:
    env = dict(os.environ, TL_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    env.pop("TL_DEBUG", None)
    return subprocess.run([PY, str(ROOT / script), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(stderr: str, *needles: str) -> str:
    """stderr ends in exactly one `error: ...` line naming the problem, and no traceback."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    for n in needles:
        assert n.lower() in errors[0].lower(), (n, errors[0])
    return errors[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One real 1-epoch run with both exports: latest.pt, state_dict.pt, full_model.pt."""
    import train
    tmp = tmp_path_factory.mktemp("trained")
    data = make_image_dataset(tmp / "ds")
    code = train.main(["--data-dir", str(data), "--weights", "none", "--epochs", "1", "--batch-size", "4",
                       "--output-dir", str(tmp / "out"), "--device", "cpu", "--export-full-model", "1",
                       "--export-state-dict", "1"])
    assert code == 0
    run = next((tmp / "out").iterdir())
    img = next((data / "val" / "cat").iterdir())
    return {"tmp": tmp, "data": data, "run": run, "latest": run / "latest.pt", "image": img,
            "full": run / "full_model.pt", "state_dict": run / "state_dict.pt"}


# ---------------------------------------------------------------- malicious pickles

@pytest.mark.parametrize("kind", EVIL_KINDS)
def test_payload_really_runs_code_when_unpickled_unsafely(kind, trained, tmp_path):
    """Control: each payload does create its marker under weights_only=False,
    so the refusals below are meaningful."""
    marker = tmp_path / "PWNED"
    evil = make_evil(kind, tmp_path / "evil.pt", marker, trained["latest"])
    if kind == "raw-pickle":
        pickle.loads(evil.read_bytes())
    else:
        torch.load(evil, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("kind", EVIL_KINDS)
def test_every_library_load_path_refuses_pickled_code(kind, trained, tmp_path):
    from core.models import read_weights_file
    from core.predict import Predictor
    marker = tmp_path / "PWNED"
    evil = make_evil(kind, tmp_path / "evil.pt", marker, trained["latest"])
    for load in (fileio.load_file, ck.read_checkpoint, read_weights_file, Predictor.load):
        with pytest.raises(UserError) as e:
            load(evil)
        msg = str(e.value)
        assert "\n" not in msg
        assert any(m in msg for m in ("arbitrary code", "not a valid PyTorch file", "not a readable",
                                      "not a PyTorch checkpoint")), msg
    assert not marker.exists()


def test_cli_predict_refuses_malicious_checkpoint(trained, tmp_path):
    marker = tmp_path / "PWNED"
    evil = make_evil("os.system", tmp_path / "evil.pt", marker)
    r = run_cli("predict.py", "--image", trained["image"], "--checkpoint", evil, "--device", "cpu", cwd=tmp_path)
    assert r.returncode == 2
    assert_one_line_error(r.stderr, "arbitrary code", "--trust-pickle")
    assert not marker.exists()


def test_cli_train_resume_and_weights_refuse_malicious_checkpoint(trained, tmp_path, capsys):
    import train
    marker = tmp_path / "PWNED"
    evil = make_evil("exec", tmp_path / "evil.pt", marker)
    base = ["--data-dir", str(trained["data"]), "--epochs", "1", "--device", "cpu", "--output-dir", str(tmp_path / "out")]
    for extra in (["--resume", str(evil), "--weights", "none"], ["--weights", str(evil)]):
        assert train.main(base + extra) == 2
        assert_one_line_error(capsys.readouterr().err, "arbitrary code", str(evil))
        assert not marker.exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_trust_pickle_loads_a_real_full_model_export_and_only_then(trained, capsys):
    import predict
    args = ["--image", str(trained["image"]), "--checkpoint", str(trained["full"]), "--device", "cpu"]
    assert predict.main(args) == 2
    assert "arbitrary code" in capsys.readouterr().err
    assert predict.main(args + ["--trust-pickle", "1"]) == 0
    out = capsys.readouterr().out
    assert "format: full model (pickle)" in out and "class_names: ['cat', 'fish']" in out
    assert "TOPK:" in out


# ---------------------------------------------------------------- damaged / wrong files

def damaged_files(real: Path, folder: Path) -> dict[str, Path]:
    data = real.read_bytes()
    files = {
        "truncated-half": data[: len(data) // 2],
        "truncated-10pct": data[: len(data) // 10],
        "truncated-minus-1-byte": data[:-1],
        "header-only": data[:64],
        "random-bytes": os.urandom(4096),
        "random-bytes-zip-magic": b"PK\x03\x04" + os.urandom(2048),
        "text-file": b"this is a README, not a model\n",
        "json": b'{"model_state": {}}',
        "png-renamed": b"\x89PNG\r\n\x1a\n" + os.urandom(200),
        "empty": b"",
    }
    out = {}
    for name, content in files.items():
        p = folder / f"{name}.pt"
        p.write_bytes(content)
        out[name] = p
    (folder / "a-folder.pt").mkdir()
    out["a-folder"] = folder / "a-folder.pt"
    out["missing"] = folder / "missing.pt"
    return out


def test_damaged_checkpoints_give_one_line_errors_on_every_path(trained, tmp_path):
    from core.models import read_weights_file
    from core.predict import Predictor
    files = damaged_files(trained["latest"], tmp_path)
    for name, p in files.items():
        for load in (fileio.load_file, ck.read_checkpoint, read_weights_file, Predictor.load):
            with pytest.raises(UserError) as e:
                load(p)
            assert "\n" not in str(e.value) and str(p.name) in str(e.value), (name, str(e.value))


def test_wrong_content_checkpoints_are_explained(trained, tmp_path):
    from core.models import read_weights_file
    from core.predict import Predictor
    lst = tmp_path / "list.pt"
    torch.save([1, 2, 3], lst)
    with pytest.raises(CheckpointError, match="not a checkpoint dict"):
        Predictor.load(lst)
    with pytest.raises(CheckpointError, match="is a bare state_dict .* Resume from a run's latest.pt"):
        ck.read_checkpoint(trained["state_dict"])  # --resume with a bare state_dict
    run = Path(trained["state_dict"]).parent
    with pytest.raises(CheckpointError, match=f"is a folder, not a .pt file; the file in it is e.g. {run / 'latest.pt'}"):
        ck.read_checkpoint(run)  # --resume RUN/
    with pytest.raises(WeightsError, match="not a state_dict"):
        read_weights_file(lst)
    # files that are no checkpoint at all say what they look like (torch's own
    # message would suggest weights_only=False)
    (tmp_path / "args.json").write_text('{"arch": "resnet18"}')
    (tmp_path / "metrics.csv").write_text("epoch,train_loss\n1,0.5\n")
    for name, kind in (("args.json", "JSON text"), ("metrics.csv", "a text file"), (trained["image"], "a JPEG image")):
        for load in (Predictor.load, read_weights_file):
            with pytest.raises(UserError, match=f"is not a PyTorch checkpoint .* it looks like {kind}") as e:
                load(tmp_path / name)
            assert "weights_only" not in str(e.value)


def test_unusable_models_in_a_checkpoint_are_explained(trained, tmp_path):
    from core.predict import Predictor
    good = torch.load(trained["latest"], weights_only=True)
    foreign = dict(good, arch="resnet34")
    torch.save(foreign, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="'resnet34' model; this tool loads resnet18, mobilenet_v2"):
        Predictor.load(tmp_path / "foreign.pt")
    diverged = dict(good, model_state={k: v.clone() for k, v in good["model_state"].items()})
    diverged["model_state"]["fc.weight"][0, 0] = float("nan")
    torch.save(diverged, tmp_path / "diverged.pt")
    with pytest.raises(CheckpointError, match="diverged.pt holds NaN or infinite weights .* best_acc.pt"):
        Predictor.load(tmp_path / "diverged.pt")
    wrong_arch = {k: v for k, v in good["model_state"].items()}
    torch.save(wrong_arch, tmp_path / "sd.pt")
    with pytest.raises(CheckpointError) as e:
        Predictor.load(tmp_path / "sd.pt", arch="mobilenet_v2")
    from cli.common import say
    assert re.search(r"sd.pt does not fit mobilenet_v2: \d+ missing key\(s\) \[classifier.1.bias"
                     r".*; its keys are resnet18's: pass --arch resnet18$", say(e.value.message, e.value.field))


def test_cli_damaged_checkpoint_is_a_one_line_error(trained, tmp_path, capsys):
    import predict
    import train
    half = tmp_path / "half.pt"
    half.write_bytes(trained["latest"].read_bytes()[:20_000_000])
    assert predict.main(["--image", str(trained["image"]), "--checkpoint", str(half), "--device", "cpu"]) == 2
    assert_one_line_error(capsys.readouterr().err, "half.pt", "not a readable PyTorch checkpoint")
    assert train.main(["--data-dir", str(trained["data"]), "--resume", str(half), "--weights", "none",
                       "--device", "cpu", "--output-dir", str(tmp_path / "out")]) == 2
    assert_one_line_error(capsys.readouterr().err, "half.pt")


def test_in_process_cli_damaged_inputs_never_traceback(trained, tmp_path, capsys):
    import predict
    import train
    files = damaged_files(trained["latest"], tmp_path)
    for name, p in files.items():
        assert predict.main(["--image", str(trained["image"]), "--checkpoint", str(p), "--device", "cpu"]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, (name, err)
    for name in ("truncated-half", "random-bytes", "empty", "a-folder"):
        assert train.main(["--data-dir", str(trained["data"]), "--weights", str(files[name]), "--device", "cpu",
                           "--output-dir", str(tmp_path / "out")]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, (name, err)


# ---------------------------------------------------------------- atomic writes

def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "latest.pt"
    fileio.atomic_torch_save({"epoch": 1}, target)

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError):
        fileio.atomic_torch_save({"epoch": 2, "big": torch.zeros(1000)}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=True) == {"epoch": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.pt"]


def test_checkpoints_skip_the_crc_but_load_exactly_and_leave_the_setting_alone(tmp_path):
    """latest.pt is written without torch's per-record CRC32 (torch.load never
    checks it); tensors must still round-trip bit for bit, and the process-wide
    CRC switch must be back as it was afterwards, also when the write fails."""
    import zipfile
    state = {"w": torch.randn(300, 200), "step": torch.tensor(7), "epoch": 3}
    before = torch.serialization.get_crc32_options()
    fileio.atomic_torch_save(state, tmp_path / "a.pt")
    assert torch.serialization.get_crc32_options() == before
    back = torch.load(tmp_path / "a.pt", weights_only=True)
    assert torch.equal(back["w"], state["w"]) and back["step"].item() == 7 and back["epoch"] == 3
    with zipfile.ZipFile(tmp_path / "a.pt") as z:  # the saving really is skipped
        assert all(i.CRC == 0 for i in z.infolist() if i.file_size)

    import torchvision
    exported = ck.export_state_dict(torchvision.models.resnet18(num_classes=2), tmp_path / "export.pt")
    with zipfile.ZipFile(exported) as z:  # exports, made for use elsewhere, keep the CRC that zip tools check
        assert z.testzip() is None

    with pytest.raises(Exception):  # fails inside torch.save: a lambda cannot be pickled
        fileio.atomic_torch_save({"f": lambda: 0}, tmp_path / "b.pt")
    assert torch.serialization.get_crc32_options() == before and not (tmp_path / "b.pt").exists()


def test_an_epoch_save_fsyncs_its_folder_once_after_all_renames(tmp_path, monkeypatch):
    """save_epoch renames latest.pt, links best_acc/best_loss and renames
    metrics.csv: each file's data is fsynced before its rename, and the folder
    once at the end (not after every rename). A write outside one_dir_sync
    still fsyncs its folder itself, and an error inside still syncs what was done."""
    from core.config import TrainConfig
    from core.best import RunState, empty_best
    from core.run_folder import save_epoch
    calls = []
    real_dir_sync = fileio._fsync_dir
    monkeypatch.setattr(fileio, "_fsync_dir", lambda d: calls.append(("dir", str(d))) or real_dir_sync(d))
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    best = {**empty_best(), "acc": 1.0, "acc_epoch": 1, "loss": 0.1, "loss_epoch": 1}
    cfg = TrainConfig(data_dir=str(tmp_path), weights="none")
    state = RunState(tmp_path, ["a", "b"], [{"epoch": 1, "val_acc": 1.0}], best, improved_acc=True, improved_loss=True)
    save_epoch(state, 1, model, opt, None, cfg)
    assert calls == [("dir", str(tmp_path))]
    assert os.path.samefile(tmp_path / "latest.pt", tmp_path / "best_acc.pt")
    assert os.path.samefile(tmp_path / "latest.pt", tmp_path / "best_loss.pt")
    assert (tmp_path / "metrics.csv").read_text().startswith("epoch,val_acc")

    calls.clear()
    fileio.atomic_write_text(tmp_path / "x.txt", "x")
    assert calls == [("dir", str(tmp_path))]
    calls.clear()
    with pytest.raises(RuntimeError):
        with fileio.one_dir_sync():
            with fileio.one_dir_sync():  # nested: only the outermost syncs
                fileio.atomic_write_text(tmp_path / "y.txt", "y")
            assert calls == []
            raise RuntimeError("boom")
    assert calls == [("dir", str(tmp_path))] and (tmp_path / "y.txt").read_text() == "y"


def test_written_files_get_normal_permissions(tmp_path):
    """mkstemp makes 0600 files; checkpoints must get what open() gives (umask)."""
    umask = os.umask(0o022)
    os.umask(umask)
    for write in (lambda p: fileio.atomic_write_text(p, "x"), lambda p: fileio.atomic_torch_save({"a": 1}, p)):
        p = tmp_path / "f"
        write(p)
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask


def test_temp_files_of_killed_writers_are_cleaned_by_the_next_write(tmp_path):
    dead = subprocess.Popen([PY, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([PY, "-c", "import time; time.sleep(30)"])
    try:
        stale = tmp_path / f".latest.pt.{dead.pid}.abc123.tmp"
        live = tmp_path / f".latest.pt.{alive.pid}.def456.tmp"
        other = tmp_path / f".best_acc.pt.{dead.pid}.x.tmp"
        for p in (stale, live, other):
            p.write_bytes(b"partial")
        fileio.atomic_torch_save({"epoch": 3}, tmp_path / "latest.pt")
        assert not stale.exists()          # its writer is gone
        assert live.exists()               # a running process may still be writing it
        assert other.exists()              # another file's temp is left to that file's writer
        assert torch.load(tmp_path / "latest.pt", weights_only=True) == {"epoch": 3}
    finally:
        alive.kill()
        alive.wait()


def test_recover_run_folder_repairs_a_kill_between_latest_and_best(tmp_path):
    """Killed after latest.pt (an improved epoch) was replaced but before
    best_acc.pt was linked: best_acc.pt still holds an older epoch, and the
    killed writer's temp files are still there."""
    run = tmp_path
    fileio.atomic_torch_save({"epoch": 1, "best_epoch": 1, "best_loss_epoch": 1}, run / "latest.pt")
    fileio.atomic_link_or_copy(run / "latest.pt", run / "best_acc.pt")
    fileio.atomic_link_or_copy(run / "latest.pt", run / "best_loss.pt")
    fileio.atomic_torch_save({"epoch": 2, "best_epoch": 2, "best_loss_epoch": 1}, run / "latest.pt")
    # <- SIGKILL here: best_acc.pt (epoch 1) is behind latest's best_epoch 2
    dead = subprocess.Popen([PY, "-c", "pass"])
    dead.wait()
    for name in (f".metrics.csv.{dead.pid}.k2j3.tmp", f".best_acc.pt.{dead.pid}.link.tmp"):
        (run / name).write_bytes(b"partial")
    latest = torch.load(run / "latest.pt", weights_only=True)
    done = recover_run_folder(run, latest)
    assert "best_acc.pt" in done and "best_loss.pt" not in done
    assert torch.load(run / "best_acc.pt", weights_only=True)["epoch"] == 2
    assert torch.load(run / "best_loss.pt", weights_only=True)["epoch"] == 1
    assert sorted(p.name for p in run.iterdir()) == ["best_acc.pt", "best_loss.pt", "latest.pt"]
    assert recover_run_folder(run, latest) == []


def test_recover_run_folder_catches_metrics_csv_up_with_the_checkpoint(tmp_path):
    """metrics.csv is written after latest.pt. Two resumed runs each killed in
    that gap left it two rows behind latest.pt (CI, stop 10); resuming must
    rewrite it from the checkpoint's history, and a longer csv (resuming an
    older checkpoint) must not be cut before the next save."""
    def rows(n):
        return [{"epoch": e, "train_loss": 1.0 / e, "val_acc": 0.5} for e in range(1, n + 1)]

    run = tmp_path
    fileio.atomic_write_csv(run / "metrics.csv", rows(3))
    latest = {"epoch": 5, "best_epoch": 1, "best_loss_epoch": 1, "history": rows(5)}
    fileio.atomic_torch_save(latest, run / "latest.pt")
    assert recover_run_folder(run, latest) == ["metrics.csv"]
    with (run / "metrics.csv").open() as f:
        got = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in got] == [1, 2, 3, 4, 5]
    assert float(got[4]["train_loss"]) == pytest.approx(0.2)
    assert recover_run_folder(run, latest) == []

    older = dict(latest, epoch=2, history=rows(2))
    assert "metrics.csv" not in recover_run_folder(run, older)
    with (run / "metrics.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 5


def test_a_state_dict_without_num_batches_tracked_still_loads(trained, tmp_path):
    """Older or hand-made files may lack BatchNorm's num_batches_tracked buffers;
    torch fills them in, so the key check must not call them a wrong architecture."""
    from core.predict import Predictor
    full = torch.load(trained["state_dict"], weights_only=True)
    trimmed = {k: v for k, v in full.items() if not k.endswith("num_batches_tracked")}
    assert len(trimmed) < len(full)
    torch.save(trimmed, tmp_path / "trimmed.pt")
    image = trained["image"]
    a = Predictor.load(trained["state_dict"], arch="resnet18").predict_image(image, 2)
    b = Predictor.load(tmp_path / "trimmed.pt", arch="resnet18").predict_image(image, 2)
    assert [lab for lab, _ in a] == [lab for lab, _ in b]
    assert all(abs(p - q) < 1e-5 for (_, p), (_, q) in zip(a, b))
