"""The training engine: BatchNorm freezing, determinism, the frozen-prefix cache,
resume, stop, best-model rules and checkpoint contents."""
from __future__ import annotations

import math
import threading
from pathlib import Path

import pytest
import torch

from core import checkpoint as ck, fileio
from core.best import empty_best, is_better_acc, is_better_loss
from core.engine import train
from core.events import BatchProgress, EpochEnded, RunEnded, RunStarted
from core.models import build_model, split_model

from conftest import TEST_DEVICE, cpu_only, train_config as cfg_for, train_run as run

METRICS = ("train_loss", "train_acc", "val_loss", "val_acc")


def snapshot(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("policy,cache,augment", [("head", "off", "standard"), ("last", "off", "light"),
                                                   ("head", "auto", "light"), ("last", "auto", "none")])
def test_frozen_weights_and_batchnorm_buffers_are_bit_identical(tiny_dataset, tmp_path, policy, cache, augment):
    cfg = cfg_for(tiny_dataset, tmp_path / "ck", policy=policy, cache=cache, augment=augment, epochs=2)
    _, epochs, end = run(cfg)
    assert end.status == "completed" and len(epochs) == 2
    trained = ck.read_checkpoint(f"{end.run_dir}/latest.pt")["model_state"]
    torch.manual_seed(cfg.seed)  # the engine seeds before building, so this is the initial model
    initial = build_model("resnet18", 2, 0.0, "none")
    prefix, _ = split_model(initial, "resnet18", policy)
    frozen_keys = {k for k in initial.state_dict() if not k.startswith(("fc.",) if policy == "head" else ("fc.", "layer4."))}
    before = initial.state_dict()
    assert any("running_mean" in k for k in frozen_keys)
    for k in frozen_keys:
        assert torch.equal(before[k], trained[k]), f"frozen tensor {k} changed"
    # ...while the trainable part did learn
    assert not torch.equal(before["fc.weight"], trained["fc.weight"])
    if policy == "last":
        assert not torch.equal(before["layer4.1.bn2.running_mean"], trained["layer4.1.bn2.running_mean"])


def test_reference_bug_would_be_caught(tiny_dataset):
    """model.train() after freezing (the reference's order) changes BN buffers:
    the check above is sensitive to exactly that."""
    torch.manual_seed(0)
    model = build_model("resnet18", 2, 0.0, "none")
    before = snapshot(model)
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 64, 64))
    assert not torch.equal(before["bn1.running_mean"], model.state_dict()["bn1.running_mean"])


def test_same_seed_same_metrics(tiny_dataset, tmp_path):
    for cache in ("auto", "off"):
        a = run(cfg_for(tiny_dataset, tmp_path / "a", cache=cache, augment="standard" if cache == "off" else "light"))[2]
        b = run(cfg_for(tiny_dataset, tmp_path / "b", cache=cache, augment="standard" if cache == "off" else "light"))[2]
        strip = lambda h: [{k: v for k, v in row.items() if k != "seconds"} for row in h]  # noqa: E731
        assert strip(a.history) == strip(b.history)
        wa = ck.read_checkpoint(f"{a.run_dir}/latest.pt")["model_state"]["fc.weight"]
        wb = ck.read_checkpoint(f"{b.run_dir}/latest.pt")["model_state"]["fc.weight"]
        assert torch.equal(wa, wb)


@pytest.mark.parametrize("policy,augment", [("head", "none"), ("head", "light"), ("last", "light")])
def test_feature_cache_matches_uncached_path(tiny_dataset, tmp_path, policy, augment):
    cached = run(cfg_for(tiny_dataset, tmp_path / "c", policy=policy, augment=augment, cache="auto", epochs=3))
    plain = run(cfg_for(tiny_dataset, tmp_path / "p", policy=policy, augment=augment, cache="off", epochs=3))
    assert "frozen layers run once" in " ".join(cached[0][0].notes)
    assert "off" in " ".join(plain[0][0].notes)
    for a, b in zip(cached[1], plain[1]):
        for k in METRICS:
            # (relative too: a random frozen backbone gives val losses near 90, and a GPU's
            # nondeterministic kernels move them by ~5e-5 of that between any two runs)
            assert getattr(a, k) == pytest.approx(getattr(b, k), rel=1e-4, abs=1e-4), k


@cpu_only
@pytest.mark.parametrize("arch,cache", [("resnet18", "auto"), ("resnet18", "off"), ("mobilenet_v2", "auto")])
def test_trainable_layers_run_in_their_faster_memory_layout(tiny_dataset, tmp_path, monkeypatch, arch, cache):
    """On CPU, ResNet-18's layer4 trains in NCHW (faster there, bench/NOTES.md): its
    weights and its inputs, cached or fresh from the frozen layers, in training and
    validation. MobileNetV2's last stages keep channels_last, as do frozen layers."""
    from core import engine
    seen = []
    real_split = engine.split_model

    def split_and_watch(model, a, policy):
        prefix, suffix = real_split(model, a, policy)
        first = suffix[0]  # layer4 / features[14]
        first.register_forward_pre_hook(lambda m, args: seen.append(
            (m.training, args[0].is_contiguous(), args[0].is_contiguous(memory_format=torch.channels_last))))
        return prefix, suffix

    monkeypatch.setattr(engine, "split_model", split_and_watch)
    end = run(cfg_for(tiny_dataset, tmp_path, arch=arch, policy="last", cache=cache, epochs=1))[2]
    state = ck.read_checkpoint(f"{end.run_dir}/latest.pt")["model_state"]
    nchw = arch == "resnet18"
    assert {training for training, *_ in seen} == {True, False}  # train and val batches seen
    assert all((contig, cl) == ((True, False) if nchw else (False, True)) for _, contig, cl in seen), seen
    if nchw:  # (MobileNetV2's 1x1 and depthwise weights look the same in both layouts)
        assert state["layer4.0.conv1.weight"].is_contiguous()
    frozen_w = state["layer3.0.conv1.weight" if nchw else "features.0.0.weight"]
    assert frozen_w.is_contiguous(memory_format=torch.channels_last) and not frozen_w.is_contiguous()


@cpu_only
def test_validation_on_cached_maps_uses_larger_batches(tmp_path):
    """On CPU, whole images are validated in batches of 8 (cache-friendly for a whole
    network); cached layer3 maps in batches of 32, faster per image for layer4."""
    from conftest import make_image_dataset
    data = make_image_dataset(tmp_path / "ds", n_train=2, n_val=6)  # 12 val images
    for cache, batches in (("auto", 1), ("off", 2)):
        events = run(cfg_for(data, tmp_path / cache, policy="last", cache=cache, epochs=1))[0]
        val = [e for e in events if isinstance(e, BatchProgress) and e.phase == "val"]
        assert [e.total for e in val] == [batches] * batches, cache


def test_rerun_takes_features_from_memory_without_refolding(tiny_dataset, tmp_path, monkeypatch):
    """An identical second run in the same process (the app's Train button again)
    reuses the frozen-layer activations: no cache pass, no folded copy of the
    frozen layers built, and the same metrics as the first run."""
    from core import engine, features
    monkeypatch.setattr(engine, "FEATURES", features.BoundedCache(1))
    folds = []
    real_fold = engine.fold_batchnorm
    monkeypatch.setattr(engine, "fold_batchnorm", lambda m: folds.append(m) or real_fold(m))
    first = run(cfg_for(tiny_dataset, tmp_path / "a", policy="last", augment="light", epochs=2))
    assert len(folds) == 1 and any(isinstance(e, BatchProgress) and e.phase == "cache" for e in first[0])
    second = run(cfg_for(tiny_dataset, tmp_path / "b", policy="last", augment="light", epochs=2))
    assert len(folds) == 1 and not any(isinstance(e, BatchProgress) and e.phase == "cache" for e in second[0])
    # bit-identical on the CPU; cuDNN's backward kernels add atomics-order rounding on a GPU
    # (seen: 2e-7 relative, on val losses near 90)
    tol = 0 if TEST_DEVICE == "cpu" else 1e-5
    for a, b in zip(first[1], second[1]):
        assert [getattr(a, k) for k in METRICS] == pytest.approx([getattr(b, k) for k in METRICS], rel=tol, abs=tol)


def test_a_frozen_random_backbone_is_pointed_out(tiny_dataset, tmp_path):
    notes = lambda **kw: next(iter(train(cfg_for(tiny_dataset, tmp_path, epochs=1, **kw)))).notes  # noqa: E731
    assert any("chance-level accuracy" in n for n in notes(policy="head"))
    assert not any("chance-level" in n for n in notes(policy="full"))


def test_cache_over_budget_falls_back_and_says_so(tiny_dataset, tmp_path):
    events, epochs, end = run(cfg_for(tiny_dataset, tmp_path, policy="last", cache_budget_mb=0, epochs=1))
    assert "using the uncached path" in " ".join(events[0].notes)
    assert end.status == "completed" and len(epochs) == 1


def test_resume_continues_exactly(tiny_dataset, tmp_path):
    full = run(cfg_for(tiny_dataset, tmp_path / "full", epochs=4))[2]
    first = run(cfg_for(tiny_dataset, tmp_path / "part", epochs=2))[2]
    resumed_events, resumed_epochs, resumed = run(cfg_for(tiny_dataset, tmp_path / "ignored", epochs=4,
                                                          resume=f"{first.run_dir}/latest.pt"))
    assert resumed_events[0].start_epoch == 3
    assert [e.epoch for e in resumed_epochs] == [3, 4]
    assert resumed.run_dir == first.run_dir
    assert len(resumed.history) == 4
    for a, b in zip(full.history, resumed.history):
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-5)
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
    latest = ck.read_checkpoint(f"{resumed.run_dir}/latest.pt")
    assert latest["epoch"] == 4 and len(latest["history"]) == 4


@cpu_only
def test_resume_puts_optimizer_moments_in_the_weights_layout(tiny_dataset, tmp_path):
    """A checkpoint whose AdamW moments are channels_last (saved by an older version,
    or on a GPU) while this run's layer4 weights are NCHW: resuming converts the
    moments to the weights' layout, with the same results as an NCHW checkpoint."""
    first = run(cfg_for(tiny_dataset, tmp_path / "a", policy="last", epochs=1))[2]
    saved = ck.read_checkpoint(f"{first.run_dir}/latest.pt")
    moments = [st for st in saved["optimizer_state"]["state"].values() if st["exp_avg"].dim() == 4]
    assert moments and all(st["exp_avg"].is_contiguous() for st in moments)
    for st in moments:
        for k in ("exp_avg", "exp_avg_sq"):
            st[k] = st[k].contiguous(memory_format=torch.channels_last)
    fileio.atomic_torch_save(saved, tmp_path / "other_layout.pt")
    same = run(cfg_for(tiny_dataset, tmp_path / "x", policy="last", epochs=2, resume=f"{first.run_dir}/latest.pt"))[2]
    other = run(cfg_for(tiny_dataset, tmp_path / "y", policy="last", epochs=2, resume=str(tmp_path / "other_layout.pt")))[2]
    assert [h["train_loss"] for h in other.history] == pytest.approx([h["train_loss"] for h in same.history], abs=1e-6)
    after = ck.read_checkpoint(Path(other.run_dir) / "latest.pt")["optimizer_state"]["state"].values()
    assert all(st[k].is_contiguous() for st in after if st["exp_avg"].dim() == 4 for k in ("exp_avg", "exp_avg_sq"))


def test_resuming_an_older_checkpoint_continues_in_a_new_folder(tiny_dataset, tmp_path):
    """Resuming best_acc.pt (or any earlier copy) from a folder whose latest.pt
    went further must not overwrite those later epochs: latest.pt, metrics.csv
    and the best files there stay as they were, and the run goes to a new folder."""
    out = tmp_path / "ck"
    first = run(cfg_for(tiny_dataset, out, epochs=3))[2]
    folder = Path(first.run_dir)
    early = ck.read_checkpoint(folder / "latest.pt")
    early = {**early, "epoch": 1, "history": early["history"][:1], "best_epoch": 1, "best_loss_epoch": 1}
    fileio.atomic_torch_save(early, folder / "epoch1.pt")
    before = {name: (folder / name).read_bytes() for name in ("latest.pt", "best_acc.pt", "best_loss.pt", "metrics.csv")}
    events, epochs, end = run(cfg_for(tiny_dataset, tmp_path / "forks", epochs=2, lr=1e-9, export_state_dict=True,
                                      resume=str(folder / "epoch1.pt")))
    assert end.status == "completed" and [e.epoch for e in epochs] == [2]
    assert end.run_dir != first.run_dir and Path(end.run_dir).parent == tmp_path / "forks"  # --output-dir
    # lr 1e-9: epoch 2 cannot beat epoch 1, so the new folder's best files are epoch 1's, carried over
    assert ck.saved_epoch(Path(end.run_dir) / "best_acc.pt") == 1 == ck.saved_epoch(Path(end.run_dir) / "best_loss.pt")
    assert "best_acc=" in "\n".join(end.end_lines()) and (Path(end.run_dir) / "state_dict.pt").is_file()
    assert any("latest.pt is past epoch 1" in n and "new folder" in n for n in events[0].notes), events[0].notes
    assert {name: (folder / name).read_bytes() for name in before} == before
    new = ck.read_checkpoint(f"{end.run_dir}/latest.pt")
    assert new["epoch"] == 2 and [h["epoch"] for h in new["history"]] == [1, 2]
    assert (Path(end.run_dir) / "args.json").is_file()
    # resuming the folder's own latest.pt still continues in place
    again = run(cfg_for(tiny_dataset, tmp_path / "ignored", epochs=4, resume=str(folder / "latest.pt")))[2]
    assert again.run_dir == first.run_dir and again.epochs_done == 4


def test_resume_keeps_recording_where_the_weights_came_from(tiny_dataset, tmp_path):
    first = run(cfg_for(tiny_dataset, tmp_path / "a", epochs=1, weights="none"))[2]
    cfg = cfg_for(tiny_dataset, tmp_path / "a", epochs=2, resume=f"{first.run_dir}/latest.pt")
    cfg.weights = "imagenet"  # the CLI default when --weights is not repeated
    events, _, end = run(cfg)
    assert any(line.startswith("MODEL: arch=resnet18 weights=none ") for line in events[0].header_lines())
    latest = ck.read_checkpoint(f"{end.run_dir}/latest.pt")
    assert latest["weights"] == "none" and latest["args"]["weights"] == "none"


def test_optimizer_is_fused_on_cpu_and_resume_from_an_unfused_checkpoint_switches(tiny_dataset, tmp_path):
    """AdamW runs its fused kernel on CPU. A checkpoint saved by a plain AdamW (the
    reference, or this project before the change) resumes fine and continues fused,
    with the same results as resuming the fused checkpoint (up to float rounding)."""
    first = run(cfg_for(tiny_dataset, tmp_path / "a", epochs=1))[2]
    saved = ck.read_checkpoint(f"{first.run_dir}/latest.pt")
    assert all(g["fused"] is True for g in saved["optimizer_state"]["param_groups"])
    for g in saved["optimizer_state"]["param_groups"]:
        g.update(fused=None, foreach=None)
    fileio.atomic_torch_save(saved, tmp_path / "unfused.pt")
    from_fused = run(cfg_for(tiny_dataset, tmp_path / "x", epochs=2, resume=f"{first.run_dir}/latest.pt"))[2]
    from_unfused = run(cfg_for(tiny_dataset, tmp_path / "y", epochs=2, resume=str(tmp_path / "unfused.pt")))[2]
    assert from_unfused.status == "completed" and from_unfused.epochs_done == 2
    # unfused.pt lies in no run folder: the run went to --output-dir
    assert Path(from_unfused.run_dir).parent == tmp_path / "y"
    for a, b in zip(from_fused.history, from_unfused.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6)
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-6)
    after = ck.read_checkpoint(Path(from_unfused.run_dir) / "latest.pt")
    assert all(g["fused"] is True for g in after["optimizer_state"]["param_groups"])
    assert all(st["step"].dtype == torch.float32 and st["step"].item() > 0
               for st in after["optimizer_state"]["state"].values())


def test_stop_flag_ends_run_between_batches(tiny_dataset, tmp_path):
    stop = threading.Event()
    events = []
    for ev in train(cfg_for(tiny_dataset, tmp_path, epochs=5, batch_size=2), stop):
        events.append(ev)
        if isinstance(ev, EpochEnded):
            stop.set()  # ask to stop right after epoch 1 is saved
        if isinstance(ev, BatchProgress) and ev.epoch == 2:
            pytest.fail("a batch of epoch 2 ran after stop was requested")
    end = events[-1]
    assert isinstance(end, RunEnded) and end.status == "stopped" and end.epochs_done == 1
    assert ck.read_checkpoint(f"{end.run_dir}/latest.pt")["epoch"] == 1


def test_stop_requested_after_the_last_epoch_still_counts_as_completed(tiny_dataset, tmp_path):
    stop = threading.Event()
    events = []
    for ev in train(cfg_for(tiny_dataset, tmp_path, epochs=2, batch_size=2), stop):
        events.append(ev)
        if isinstance(ev, EpochEnded) and ev.epoch == 2:
            stop.set()  # e.g. Stop clicked as the last epoch's line appears
    assert events[-1].status == "completed" and events[-1].epochs_done == 2


def test_stop_during_first_epoch_leaves_no_run_folder(tiny_dataset, tmp_path):
    stop = threading.Event()
    out = tmp_path / "ck"
    for ev in train(cfg_for(tiny_dataset, out, epochs=3, batch_size=2, cache="off"), stop):
        if isinstance(ev, BatchProgress) and ev.phase == "train":
            stop.set()
    assert ev.status == "stopped" and ev.epochs_done == 0
    assert list(out.iterdir()) == []


def test_checkpoint_contents_plain_and_complete(tiny_dataset, tmp_path):
    _, epochs, end = run(cfg_for(tiny_dataset, tmp_path, epochs=2, dropout=0.3))
    run_dir = end.run_dir
    for name in ("latest.pt", "best_acc.pt", "best_loss.pt"):
        raw = torch.load(f"{run_dir}/{name}", weights_only=True)
        for key in ck.REFERENCE_KEYS + ("arch", "format_version", "head", "best_loss_epoch"):
            assert key in raw, (name, key)
        assert raw["format_version"] == ck.FORMAT_VERSION
        assert raw["class_names"] == ["cat", "fish"]
        assert raw["head"]["dropout"] == 0.3 and "fc.1.weight" in raw["model_state"]
        assert len(raw["history"]) == raw["epoch"]
    best = torch.load(f"{run_dir}/best_acc.pt", weights_only=True)
    assert best["epoch"] == best["best_epoch"] == end.best["acc_epoch"]
    csv_lines = open(f"{run_dir}/metrics.csv").read().splitlines()
    assert csv_lines[0].startswith("epoch,train_loss") and len(csv_lines) == 3
    assert (tmp_path / run_dir.split("/")[-1] / "args.json").exists()


def test_best_file_keeps_its_epoch_when_latest_moves_on(tmp_path):
    a = fileio.atomic_torch_save({"epoch": 1}, tmp_path / "latest.pt")
    fileio.atomic_link_or_copy(a, tmp_path / "best_acc.pt")
    fileio.atomic_torch_save({"epoch": 2}, tmp_path / "latest.pt")
    assert torch.load(tmp_path / "best_acc.pt", weights_only=True)["epoch"] == 1
    assert torch.load(tmp_path / "latest.pt", weights_only=True)["epoch"] == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_best_rules_treat_nan_as_worst_and_break_ties_by_loss():
    best = empty_best()
    assert not is_better_acc(float("nan"), 0.1, best)
    assert not is_better_loss(float("nan"), best)
    assert is_better_acc(0.5, 1.0, best)
    best.update(acc=0.9, acc_epoch=1, acc_loss=0.5, loss=0.5, loss_epoch=1)
    assert not is_better_acc(0.9, 0.6, best)
    assert is_better_acc(0.9, 0.4, best)
    assert is_better_acc(0.95, math.inf, best)
    assert not is_better_loss(0.5, best) and is_better_loss(0.49, best)
    # ties compare with the loss of the best-accuracy epoch, not the best loss of any epoch
    best.update(loss=0.3, loss_epoch=2)
    assert is_better_acc(0.9, 0.4, best)


def test_run_started_reports_dataset_and_params(tiny_dataset, tmp_path):
    ev = next(iter(train(cfg_for(tiny_dataset, tmp_path, epochs=1))))
    assert isinstance(ev, RunStarted)
    assert ev.dataset.train.counts() == {"cat": 4, "fish": 4}
    assert ev.trainable_params == 512 * 2 + 2
    assert ev.total_params > 11_000_000


def test_resume_refuses_a_finished_run_and_restores_data_settings(tiny_dataset, tmp_path):
    from core.errors import ConfigError
    first = run(cfg_for(tiny_dataset, tmp_path, epochs=2, seed=11))[2]
    from cli.common import FLAG_NAMES
    with pytest.raises(ConfigError, match="already finished epoch 2") as e:
        list(train(cfg_for(tiny_dataset, tmp_path, epochs=2, resume=f"{first.run_dir}/latest.pt")))
    assert e.value.field == "epochs" and "pass a larger --epochs (the new total, e.g. --epochs 12)" in \
        e.value.render(FLAG_NAMES)
    events = list(train(cfg_for(tiny_dataset, tmp_path, epochs=3, seed=99, resume=f"{first.run_dir}/latest.pt")))
    assert events[0].config.seed == 11
    assert any("continuing with the checkpoint's seed=11" in n for n in events[0].notes)


def test_stop_while_decoding_images(tiny_dataset, tmp_path):
    stop = threading.Event()
    out = tmp_path / "ck"
    # (cache off: with the feature cache the feature pass itself checks the images, no separate decode pass)
    for ev in train(cfg_for(tiny_dataset, out, epochs=3, cache="off"), stop):
        if isinstance(ev, BatchProgress) and ev.phase == "decode":
            stop.set()
        assert not (isinstance(ev, BatchProgress) and ev.phase in ("cache", "train"))
    assert ev.status == "stopped" and "reading images" in ev.message
    assert list(out.iterdir()) == []


@cpu_only
def test_val_split_run_and_amp_note_on_cpu(tmp_path, monkeypatch):
    from conftest import make_image_dataset
    from core import device
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: False)  # the note this test reads
    data = make_image_dataset(tmp_path / "noval", n_train=6, val=False)
    events, epochs, end = run(cfg_for(data, tmp_path / "ck", epochs=1, val_split=0.34, amp=True))
    start = events[0]
    assert start.dataset.val_from_split == 0.34
    assert start.dataset.val.counts() == {"cat": 2, "fish": 2} and start.dataset.train.counts() == {"cat": 4, "fish": 4}
    from cli.common import say
    assert "held out of train/ by --val-split 0.34: 4 of 12 images" in say("\n".join(start.header_lines()))
    # with a val/ folder, --val-split does nothing, and a warning says so
    from core.data import scan_dataset
    with_val = make_image_dataset(tmp_path / "withval", n_train=3)
    assert any("--val-split 0.2 ignored" in say(w) for w in scan_dataset(with_val, 0.2).warnings)
    assert not any("ignored" in w for w in scan_dataset(with_val).warnings)
    assert any("--amp 1 has no effect on this CPU" in say(n) for n in start.notes)
    assert end.status == "completed" and len(epochs) == 1
