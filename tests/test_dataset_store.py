"""core/dataset_store.py: every naming, file and confinement rule, on real files."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import unicodedata
from multiprocessing import get_context
from pathlib import Path

import pytest
from PIL import Image

from core.data import scan_dataset
from core.dataset_files import MAX_IMAGE_BYTES, check_name, safe_stem
from core.dataset_store import DatasetStore
from core.errors import UserError

from conftest import ROOT


def png(path: Path, color=(200, 40, 40), size=(40, 32), fmt="PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, fmt)
    return path


@pytest.fixture
def store(tmp_path):
    s = DatasetStore(tmp_path / "data")
    s.create("pets")
    s.add_class("pets", "cat")
    return s


# ---------------------------------------------------------------- names

@pytest.mark.parametrize("bad, why", [
    ("", "empty"), ("   ", "empty"), (None, "empty"), (".", "folder reference"), ("..", "folder reference"),
    ("../x", "'/'"), ("a/b", "'/'"), ("a\\b", "'\\\\'"), ("x:y", "':'"), ("a\x00b", "'\\x00'"), ("tab\there", "'\\t'"),
    ("what?", "'?'"), ("star*", "'*'"), (".hidden", "hidden"), ("dots.", "ends with '.'"),
    ("CON", "device name"), ("nul.txt", "device name"), ("x" * 65, "65 characters"),
    ("rtl\u202eevil", "'\\u202e'"),
])
def test_bad_names_are_refused_with_the_rule(bad, why):
    with pytest.raises(UserError) as e:
        check_name(bad, "class_name", "class name")
    assert e.value.field == "class_name"
    assert why in e.value.message
    assert "allowed" in e.value.message or "empty" in e.value.message


@pytest.mark.parametrize("good, stored", [
    ("cat", "cat"), ("  Tabby cat ", "Tabby cat"), ("chat-noir_2 (vieux)", "chat-noir_2 (vieux)"),
    ("e\u0301clair", "\u00e9clair"), ("猫", "猫"), ("a.b", "a.b"),
])
def test_good_names_are_kept_as_typed(good, stored):
    assert check_name(good, "class_name", "class name") == stored


def test_class_names_are_unique_ignoring_case_and_unicode_form(store):
    with pytest.raises(UserError, match="already exists") as e:
        store.add_class("pets", "cat")
    assert e.value.field == "class_name"
    with pytest.raises(UserError, match="case or accents"):
        store.add_class("pets", "CAT")
    store.add_class("pets", "\u00e9clair")
    with pytest.raises(UserError, match="already exists"):
        store.add_class("pets", unicodedata.normalize("NFD", "\u00e9clair"))
    assert store.classes("pets") == ["cat", "\u00e9clair"]


def test_dataset_names_unique_reserved_and_confined(tmp_path):
    s = DatasetStore(tmp_path / "data")
    path = s.create("My set")
    assert path == tmp_path / "data" / "My set" and (path / "train").is_dir()
    for bad, match in [("my SET", "already exists"), ("train", "reserved"), ("VAL", "reserved"),
                       ("../escape", "'/'"), ("", "empty")]:
        with pytest.raises(UserError, match=match) as e:
            s.create(bad)
        assert e.value.field == "dataset_name"
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["My set"]
    assert not (tmp_path / "escape").exists()
    with pytest.raises(UserError, match="no dataset"):
        s.add_class("nope", "cat")


def test_a_dataset_or_class_linked_outside_is_refused(tmp_path, store):
    outside = tmp_path / "outside"
    (outside / "train").mkdir(parents=True)
    (tmp_path / "data" / "linked").symlink_to(outside)
    with pytest.raises(UserError, match="outside"):
        store.add_class("linked", "cat")
    (outside / "dog").mkdir()
    (tmp_path / "data" / "pets" / "train" / "dog").symlink_to(outside / "dog")
    with pytest.raises(UserError, match="outside"):
        store.add_images("pets", "dog", [png(tmp_path / "in" / "d.png")])
    assert list((outside / "dog").iterdir()) == []


# ---------------------------------------------------------------- images

def test_images_keep_their_bytes_get_safe_names_and_train_as_imagefolder(tmp_path, store):
    src = png(tmp_path / "in" / "../in/My Photo (1).PNG")
    jpeg_named_png = png(tmp_path / "in" / "really_jpeg.png", (10, 200, 10), fmt="JPEG")
    r = store.add_images("pets", "cat", [src, ("pasted image", jpeg_named_png)])
    assert r.refused == [] and r.duplicates == [] and len(r.added) == 2
    stored = store.images("pets", "cat")
    by_name = {p.name: p for p in stored}
    first = next(n for n in by_name if n.startswith("My_Photo_1_"))
    assert first.endswith(".png") and by_name[first].read_bytes() == src.read_bytes()
    second = next(n for n in by_name if n.startswith("pasted_image_"))
    assert second.endswith(".jpg")  # the extension of the real format
    assert not [p for p in (tmp_path / "data" / "pets" / "train" / "cat").iterdir() if p.name.startswith(".")]


def test_exact_duplicates_are_skipped_anywhere_in_the_dataset(tmp_path, store):
    a = png(tmp_path / "a.png")
    copy = tmp_path / "copy of a.png"
    copy.write_bytes(a.read_bytes())
    assert len(store.add_images("pets", "cat", [a]).added) == 1
    r = store.add_images("pets", "cat", [copy, a])
    assert r.added == [] and [n for n, _ in r.duplicates] == ["copy of a.png", "a.png"]
    assert "train/cat" in r.duplicates[0][1]
    store.add_class("pets", "dog")
    r = store.add_images("pets", "dog", [copy], split="val")
    assert r.added == [] and r.duplicates  # the same photo in another class or split is a mistake too
    assert len(store.images("pets", "cat")) == 1


def test_non_images_empty_and_oversized_files_are_refused_by_name(tmp_path, store, monkeypatch):
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(png(tmp_path / "full.png").read_bytes()[:40])
    ico = tmp_path / "icon.ico"
    Image.new("RGB", (16, 16)).save(ico)
    big = png(tmp_path / "big.png")
    import core.dataset_files as ds
    monkeypatch.setattr(ds, "MAX_IMAGE_BYTES", big.stat().st_size - 1)
    r = store.add_images("pets", "cat", [text, empty, truncated, ico, big, tmp_path / "missing.png"])
    assert r.added == []
    reasons = dict(r.refused)
    assert set(reasons) == {"notes.jpg", "empty.png", "cut.png", "icon.ico", "big.png", "missing.png"}
    assert "not a supported image" in reasons["notes.jpg"]
    assert "empty" in reasons["empty.png"]
    assert "truncated" in reasons["cut.png"] or "decode" in reasons["cut.png"]
    assert "cannot be used for training" in reasons["icon.ico"]
    assert "at most" in reasons["big.png"]
    assert store.images("pets", "cat") == []
    assert MAX_IMAGE_BYTES == 200 * 2**20  # the app's per-upload limit (demo_app/ui.py MAX_FILE_SIZE)


def test_remove_image_only_names_a_file_of_that_class(tmp_path, store):
    store.add_images("pets", "cat", [png(tmp_path / "a.png")])
    (name,) = [p.name for p in store.images("pets", "cat")]
    secret = tmp_path / "data" / "pets" / "secret.txt"
    secret.write_text("keep")
    for bad in ["../secret.txt", "../../pets/secret.txt", "", ".", "nope.png"]:
        with pytest.raises(UserError) as e:
            store.remove_image("pets", "cat", bad)
        assert e.value.field == "image"
    assert secret.exists()
    store.remove_image("pets", "cat", name)
    assert store.images("pets", "cat") == []


def test_rename_and_delete_class_in_every_split(tmp_path, store):
    store.add_images("pets", "cat", [png(tmp_path / "a.png")])
    store.add_images("pets", "cat", [png(tmp_path / "b.png", (1, 2, 3))], split="val")
    store.add_class("pets", "dog")
    with pytest.raises(UserError, match="already exists"):
        store.rename_class("pets", "cat", "DOG")
    with pytest.raises(UserError, match="'/'"):
        store.rename_class("pets", "cat", "a/b")
    with pytest.raises(UserError, match="no class"):
        store.rename_class("pets", "cow", "calf")
    assert store.rename_class("pets", "cat", "Kitten") == "Kitten"
    root = tmp_path / "data" / "pets"
    assert sorted(p.name for p in (root / "train").iterdir()) == ["Kitten", "dog"]
    assert [p.name for p in (root / "val").iterdir()] == ["Kitten"]
    assert store.rename_class("pets", "kitten", "kitten") == "kitten"  # a case-only rename
    assert store.delete_class("pets", "KITTEN") == 2
    assert store.classes("pets") == ["dog"]
    with pytest.raises(UserError, match="no class"):
        store.delete_class("pets", "../pets")
    assert root.is_dir()


def test_list_counts_per_split_and_class_with_uploads(tmp_path, store):
    store.add_class("pets", "dog")
    store.add_images("pets", "cat", [png(tmp_path / f"{i}.png", (i * 20, 0, 0)) for i in range(3)])
    store.add_images("pets", "dog", [png(tmp_path / "d.png", (0, 0, 9))], split="val")
    (tmp_path / "data" / "train" / "x").mkdir(parents=True)  # <root> itself a dataset (not a 'train' one in it)
    uploads = tmp_path / "uploads"
    (uploads / "zipped_20260101" / "inner" / "train" / "a").mkdir(parents=True)
    png(uploads / "zipped_20260101" / "inner" / "train" / "a" / "1.png")
    entries = store.datasets(uploads)
    assert [(e.name, e.editable) for e in entries] == [("pets", True), ("data (the folder itself)", False),
                                                        ("upload: zipped_20260101", False)]
    assert entries[0].counts == {"train": {"cat": 3, "dog": 0}, "val": {"dog": 1}}
    assert entries[0].label() == "pets — 2 classes: cat 3, dog 0+1"
    assert entries[1].path == (tmp_path / "data").resolve() and entries[1].counts == {"train": {"x": 0}}
    assert entries[2].counts == {"train": {"a": 1}}


def _add_from_process(root, k):
    from PIL import Image as I
    s = DatasetStore(root)
    paths = []
    for i in range(6):
        p = Path(root).parent / f"proc{k}_{i}.png"
        I.new("RGB", (20, 20), (k * 40, i * 30, 7)).save(p)
        paths.append(p)
    return len(s.add_images("pets", "cat", paths).added)


def test_two_processes_and_threads_adding_to_one_class_lose_nothing(tmp_path, store):
    with get_context("spawn").Pool(2) as pool:
        added = pool.starmap(_add_from_process, [(str(tmp_path / "data"), 1), (str(tmp_path / "data"), 2)])
    threads = [threading.Thread(target=_add_from_process, args=(str(tmp_path / "data"), k)) for k in (3, 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert added == [6, 6]
    assert len(store.images("pets", "cat")) == 24


def test_a_built_dataset_trains_from_the_cli(tmp_path, store):
    store.add_class("pets", "fish")
    for cls, base in (("cat", (200, 50, 50)), ("fish", (50, 50, 200))):
        files = [png(tmp_path / "in" / f"{cls}{i}.png", tuple(min(255, c + 9 * i) for c in base), (48, 40))
                 for i in range(5)]
        assert len(store.add_images("pets", cls, files).added) == 5
    data = tmp_path / "data" / "pets"
    info = scan_dataset(data, 0.2, 0)
    assert info.train.counts() == {"cat": 4, "fish": 4} and info.val.counts() == {"cat": 1, "fish": 1}
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), "--data-dir", str(data), "--weights", "none",
                          "--epochs", "1", "--batch-size", "4", "--val-split", "0.2",
                          "--output-dir", str(tmp_path / "runs")],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "CI": ""})
    assert out.returncode == 0, out.stderr
    assert "classes=['cat', 'fish']" in out.stdout
    assert list((tmp_path / "runs").rglob("best_acc.pt"))


def test_safe_stem():
    assert safe_stem("../../etc/passwd") == "passwd"
    assert safe_stem("Été 2024.JPG") == "Ete_2024"
    assert safe_stem("猫.png") == "image"
    assert safe_stem("webcam.png") == "webcam"
