"""Tests for scripts/make_demo_data.py (the procedural cat/fish demo dataset)."""

import importlib.util
from pathlib import Path

import pytest
from PIL import Image

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_demo_data.py"


@pytest.fixture(scope="module")
def gen():
    # scripts/ is not a package, so load the module from its file.
    spec = importlib.util.spec_from_file_location("make_demo_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def small_args(out, *extra):
    return ["--out", str(out), "--seed", "3", "--train-per-class", "3",
            "--val-per-class", "2", *extra]


def snapshot(root):
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes(gen, tmp_path):
    assert gen.main(small_args(tmp_path / "a")) == 0
    assert gen.main(small_args(tmp_path / "b")) == 0
    a, b = snapshot(tmp_path / "a"), snapshot(tmp_path / "b")
    assert a.keys() == b.keys() and a == b


def test_rerun_into_same_folder_is_allowed_and_identical(gen, tmp_path):
    assert gen.main(small_args(tmp_path)) == 0
    first = snapshot(tmp_path)
    assert gen.main(small_args(tmp_path)) == 0
    assert snapshot(tmp_path) == first


def test_different_seed_gives_different_images(gen, tmp_path):
    gen.main(small_args(tmp_path / "a"))
    gen.main(small_args(tmp_path / "b", "--seed", "4"))
    name = "train/cat/cat_000.jpg"
    assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "b" / name).read_bytes()


def test_counts_per_class_match_flags(gen, tmp_path):
    assert gen.main(small_args(tmp_path)) == 0
    for split, n in (("train", 3), ("val", 2)):
        assert sorted(d.name for d in (tmp_path / split).iterdir()) == ["cat", "fish"]
        for cls in ("cat", "fish"):
            names = sorted(p.name for p in (tmp_path / split / cls).iterdir())
            assert names == [f"{cls}_{i:03d}.jpg" for i in range(n)]
    assert (tmp_path / "README.md").read_text().startswith(gen.README_MARKER)


def test_smaller_rerun_removes_stale_generated_files(gen, tmp_path):
    gen.main(small_args(tmp_path))
    gen.main(["--out", str(tmp_path), "--train-per-class", "1", "--val-per-class", "1"])
    assert len(list((tmp_path / "train" / "cat").iterdir())) == 1


def test_every_file_is_rgb_256_jpeg(gen, tmp_path):
    assert gen.main(small_args(tmp_path)) == 0
    files = list(tmp_path.rglob("*.jpg"))
    assert len(files) == 2 * (3 + 2)
    for f in files:
        with Image.open(f) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (256, 256)


def test_refuses_folder_with_foreign_file(gen, tmp_path, capsys):
    foreign = tmp_path / "train" / "cat" / "my_photo.jpg"
    foreign.parent.mkdir(parents=True)
    foreign.write_bytes(b"user data")
    assert gen.main(small_args(tmp_path)) != 0
    assert "my_photo.jpg" in capsys.readouterr().err
    assert foreign.read_bytes() == b"user data"
    assert not (tmp_path / "train" / "cat" / "cat_000.jpg").exists()


def test_refuses_foreign_readme_and_force_keeps_it(gen, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("my notes\n")
    assert gen.main(small_args(tmp_path)) != 0
    assert gen.main(small_args(tmp_path, "--force")) == 0
    assert readme.read_text() == "my notes\n"
    assert (tmp_path / "val" / "fish" / "fish_001.jpg").exists()


def test_force_writes_but_keeps_foreign_file(gen, tmp_path):
    foreign = tmp_path / "val" / "fish" / "nemo.png"
    foreign.parent.mkdir(parents=True)
    foreign.write_bytes(b"user data")
    assert gen.main(small_args(tmp_path, "--force")) == 0
    assert foreign.read_bytes() == b"user data"
    assert (tmp_path / "val" / "fish" / "fish_000.jpg").exists()


@pytest.mark.parametrize("extra,message", [(["--size", "-5"], "--size must be from 32"),
                                           (["--size", "0"], "--size must be from 32"),
                                           (["--train-per-class", "-1"], "--train-per-class must be from 1"),
                                           (["--val-per-class", "0"], "--val-per-class must be from 1")])
def test_bad_numbers_are_refused_in_one_line(gen, tmp_path, capsys, extra, message):
    assert gen.main(small_args(tmp_path / "out", *extra)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_unwritable_output_folder_is_named(gen, tmp_path, capsys):
    blocker = tmp_path / "a_file.jpg"
    blocker.write_bytes(b"x")
    assert gen.main(small_args(blocker)) == 2
    err = capsys.readouterr().err
    assert "cannot write" in err and "a_file.jpg" in err and "--out" in err


def test_boxes_json_holds_each_animals_box(gen, tmp_path):
    """boxes.json names every image; each box lies in the image and covers the
    animal: its pixels differ from the background around it more than the
    background differs from itself (train images: a plain gradient behind)."""
    import json

    import numpy as np
    assert gen.main(small_args(tmp_path)) == 0
    boxes = json.loads((tmp_path / "boxes.json").read_text())["boxes"]
    images = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.jpg"))
    assert sorted(boxes) == images
    for name, (x0, y0, x1, y1) in boxes.items():
        assert 0 <= x0 < x1 <= 256 and 0 <= y0 < y1 <= 256, name
        assert (x1 - x0) * (y1 - y0) >= 0.04 * 256 * 256, name  # an animal, not a speck
        if name.startswith("train/"):
            a = np.asarray(Image.open(tmp_path / name).convert("L"), np.float32)
            inside = np.zeros(a.shape, bool)
            inside[y0:y1, x0:x1] = True
            assert np.abs(a[inside] - np.median(a[~inside])).mean() > 2 * a[~inside].std(), name


def test_a_foreign_boxes_json_is_refused_and_kept(gen, tmp_path):
    mine = tmp_path / "boxes.json"
    mine.write_text('{"my": "labels"}')
    assert gen.main(small_args(tmp_path)) == 2
    assert gen.main(small_args(tmp_path, "--force")) == 0
    assert mine.read_text() == '{"my": "labels"}'


def test_shipped_boxes_match_the_generator(gen, tmp_path):
    """data/boxes.json is what the script writes for data/'s own flags."""
    root = SCRIPT.parents[1] / "data"
    assert gen.main(["--out", str(tmp_path)]) == 0
    assert (tmp_path / "boxes.json").read_bytes() == (root / "boxes.json").read_bytes()
