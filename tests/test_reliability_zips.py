"""Issue 5.4: hostile dataset zips. core.zipimport.extract_dataset_zip refuses
each with a DatasetError naming the problem, and nothing is written outside
the destination folder (nor left inside it) when it refuses."""
from __future__ import annotations

import io
import os
import stat
import struct
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from core import zipimport
from core.data import scan_dataset
from core.errors import DatasetError
from core.zipimport import extract_dataset_zip


def jpeg(color=(200, 30, 30)) -> bytes:
    b = io.BytesIO()
    Image.new("RGB", (16, 12), color).save(b, "JPEG")
    return b.getvalue()


GOOD_ENTRIES = {f"{split}/{cls}/{i}.jpg": jpeg((200, 30, 30) if cls == "cat" else (30, 30, 200))
                for split in ("train", "val") for cls in ("cat", "fish") for i in range(2)}


def make_zip(path: Path, entries, compression=zipfile.ZIP_DEFLATED) -> Path:
    """entries: {name: bytes} or [(name or ZipInfo, bytes)]."""
    items = entries.items() if isinstance(entries, dict) else entries
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in items:
            zf.writestr(name, data)
    return path


def tree(root: Path) -> dict[str, tuple]:
    """Everything under root: path -> (kind, size, mtime)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            st = p.lstat()
            out[str(p.relative_to(root))] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def sandbox(tmp_path):
    """tmp/{zips, uploads (the destination), outside/victim.txt}."""
    (tmp_path / "zips").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "victim.txt").write_text("precious")
    return tmp_path


def refuse(sandbox: Path, zpath: Path, *words: str) -> str:
    """Extraction raises DatasetError containing `words`; the whole sandbox
    (except the zip itself) is unchanged, including an empty uploads/."""
    before = tree(sandbox)
    with pytest.raises(DatasetError) as e:
        extract_dataset_zip(zpath, sandbox / "uploads")
    msg = str(e.value)
    for w in words:
        assert w.lower() in msg.lower(), (w, msg)
    after = tree(sandbox)
    created = {k for k in after if k not in before}
    assert created <= {"uploads"}, f"written by a refused zip: {sorted(created)}"
    assert {k: v for k, v in after.items() if k != "uploads"} == {k: v for k, v in before.items() if k != "uploads"}
    assert not (sandbox / "uploads").exists() or not any((sandbox / "uploads").iterdir())
    assert (sandbox / "outside" / "victim.txt").read_text() == "precious"
    return msg


# ---------------------------------------------------------------- hostile zips

@pytest.mark.parametrize("evil", ["../outside/victim.txt", "train/cat/../../../outside/victim.txt",
                                  "..\\outside\\victim.txt", "train/../../escape.jpg"])
def test_zip_slip_is_refused(sandbox, evil):
    z = make_zip(sandbox / "zips" / "slip.zip", {**GOOD_ENTRIES, evil: b"pwned"})
    refuse(sandbox, z, "escapes its folder", "refused")


@pytest.mark.parametrize("evil", ["/tmp/abs.jpg", "\\windows\\abs.jpg", "C:/abs.jpg", "C:\\abs.jpg", "//server/share/x.jpg"])
def test_absolute_paths_are_refused(sandbox, evil):
    z = make_zip(sandbox / "zips" / "abs.zip", [*GOOD_ENTRIES.items(), (zipfile.ZipInfo(evil), b"pwned")])
    refuse(sandbox, z, "absolute path")


def symlink_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # unix
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


@pytest.mark.parametrize("target", ["../../outside", "/etc/passwd", "cat"])
def test_symlink_entries_are_refused(sandbox, target):
    """A link to the outside, then a file written 'through' it."""
    z = make_zip(sandbox / "zips" / "link.zip",
                 [(symlink_info("train/link"), target.encode()), ("train/link/victim.txt", b"pwned"),
                  *GOOD_ENTRIES.items()])
    refuse(sandbox, z, "symbolic link")


def test_zip_bomb_ratio_is_refused(sandbox):
    z = make_zip(sandbox / "zips" / "bomb.zip", {**GOOD_ENTRIES, "train/cat/bomb.jpg": b"\0" * (8 * 2**20)})
    assert z.stat().st_size < 100_000  # 8 MB of zeros in a tiny zip
    refuse(sandbox, z, "bomb", "bomb.jpg")


def test_zip_bomb_overall_ratio_is_refused(sandbox, monkeypatch):
    """Many entries each under the per-entry floor, hugely compressed together."""
    monkeypatch.setattr(zipimport, "MAX_TOTAL_RATIO_FLOOR", 4 * 2**20)
    entries = {f"train/cat/{i}.jpg": b"\0" * (2**20 - 1) for i in range(6)}
    z = make_zip(sandbox / "zips" / "many.zip", {**GOOD_ENTRIES, **entries})
    refuse(sandbox, z, "overall", "bomb")


def test_total_size_limit(sandbox, monkeypatch):
    monkeypatch.setattr(zipimport, "MAX_TOTAL_BYTES", 20_000)
    z = make_zip(sandbox / "zips" / "big.zip", {**GOOD_ENTRIES, "train/cat/big.jpg": os.urandom(30_000)},
                 compression=zipfile.ZIP_STORED)
    refuse(sandbox, z, "expands to more than", "bomb")


def test_entry_count_limit(sandbox, monkeypatch):
    monkeypatch.setattr(zipimport, "MAX_FILES", 10)
    z = make_zip(sandbox / "zips" / "many.zip", {**GOOD_ENTRIES, **{f"train/cat/x{i}.jpg": b"x" for i in range(5)}})
    refuse(sandbox, z, "entries", "limit is 10")


def test_a_zip_that_would_leave_too_little_disk_is_refused(sandbox, monkeypatch):
    """Extractions are never removed (they are datasets), so one must not fill the disk training saves to."""
    import shutil
    z = make_zip(sandbox / "zips" / "good.zip", GOOD_ENTRIES)
    monkeypatch.setattr(zipimport, "DISK_RESERVE", shutil.disk_usage(sandbox).free)
    refuse(sandbox, z, "free some space first", "stays for saving checkpoints")


def test_header_that_lies_about_its_size_is_refused_and_cleaned_up(sandbox):
    """The central directory says 10 bytes; the data is 50 kB. Extraction has
    started when this is found: the partial folder must be removed."""
    z = make_zip(sandbox / "zips" / "liar.zip", {**GOOD_ENTRIES, "val/fish/zz_liar.jpg": os.urandom(50_000)},
                 compression=zipfile.ZIP_STORED)
    data = bytearray(z.read_bytes())
    name = b"val/fish/zz_liar.jpg"
    for sig, size_off in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        pos = 0
        while (pos := data.find(sig, pos)) != -1:
            name_off = 30 if sig == b"PK\x03\x04" else 46
            if data[pos + name_off:pos + name_off + len(name)] == name:
                struct.pack_into("<I", data, pos + size_off, 10)
            pos += 4
    z.write_bytes(bytes(data))
    assert zipfile.ZipFile(z).getinfo(name.decode()).file_size == 10
    refuse(sandbox, z, "liar.jpg")


def test_encrypted_zip_is_refused(sandbox):
    z = make_zip(sandbox / "zips" / "enc.zip", GOOD_ENTRIES)
    data = bytearray(z.read_bytes())
    for sig, flag_off in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # set the 'encrypted' flag bit
        pos = 0
        while (pos := data.find(sig, pos)) != -1:
            data[pos + flag_off] |= 1
            pos += 4
    z.write_bytes(bytes(data))
    refuse(sandbox, z, "password")


@pytest.mark.parametrize("content", [b"", b"not a zip at all", b"PK\x05\x06" + b"\0" * 18 + b"garbage",
                                     b"\x89PNG\r\n\x1a\n" + os.urandom(100)])
def test_non_zip_files_are_refused(sandbox, content):
    p = sandbox / "zips" / "upload.zip"
    p.write_bytes(content)
    refuse(sandbox, p, "upload.zip")


def test_truncated_zip_is_refused(sandbox):
    z = make_zip(sandbox / "zips" / "cut.zip", GOOD_ENTRIES)
    data = z.read_bytes()
    z.write_bytes(data[: len(data) // 2])
    refuse(sandbox, z, "cut.zip")


def test_zip_without_train_folder(sandbox):
    z = make_zip(sandbox / "zips" / "notrain.zip", {"cat/1.jpg": jpeg(), "fish/1.jpg": jpeg(), "val/cat/1.jpg": jpeg()})
    refuse(sandbox, z, "no train/ folder")


@pytest.mark.parametrize("entries", [
    [("train/cat", b"a file"), ("train/cat/9.jpg", jpeg())],  # a file where a folder must go
    [("", b"nameless")],
    [("train/cat/" + "x" * 300 + ".jpg", jpeg())],  # name too long for the file system
])
def test_entries_that_cannot_be_written_are_a_dataset_error(sandbox, entries):
    items = [(zipfile.ZipInfo(n) if n == "" else n, d) for n, d in entries]
    z = make_zip(sandbox / "zips" / "odd.zip", [*items, *GOOD_ENTRIES.items()])
    refuse(sandbox, z)


def test_corrupt_compressed_data_is_a_dataset_error(sandbox):
    z = make_zip(sandbox / "zips" / "corrupt.zip", {**GOOD_ENTRIES, "val/fish/zz.jpg": os.urandom(20_000) + b"\0" * 20_000})
    data = bytearray(z.read_bytes())
    i = data.index(b"val/fish/zz.jpg") + len("val/fish/zz.jpg") + 100
    data[i:i + 200] = os.urandom(200)  # scramble the deflate stream
    z.write_bytes(bytes(data))
    refuse(sandbox, z, "corrupt.zip")


# ---------------------------------------------------------------- good zips

@pytest.mark.parametrize("prefix", ["", "my dataset/", "outer/inner/"])
def test_good_zip_extracts_and_scans(sandbox, prefix):
    entries = {prefix + k: v for k, v in GOOD_ENTRIES.items()}
    entries[prefix + "README.txt"] = b"about this data"
    entries["__MACOSX/" + prefix + "train/cat/._0.jpg"] = b"\0\5\26\7 mac junk"
    z = make_zip(sandbox / "zips" / "good.zip", entries)
    root = extract_dataset_zip(z, sandbox / "uploads")
    uploads = (sandbox / "uploads").resolve()
    assert uploads in root.resolve().parents
    info = scan_dataset(root)
    assert info.classes == ["cat", "fish"] and len(info.train.samples) == 4 and len(info.val.samples) == 4
    assert (sandbox / "outside" / "victim.txt").read_text() == "precious"


def test_windows_backslash_zip_extracts_into_folders(sandbox):
    entries = [(zipfile.ZipInfo(k.replace("/", "\\")), v) for k, v in GOOD_ENTRIES.items()]
    z = make_zip(sandbox / "zips" / "win.zip", entries)
    info = scan_dataset(extract_dataset_zip(z, sandbox / "uploads"))
    assert len(info.train.samples) == 4


def test_two_extractions_of_the_same_zip_get_separate_folders(sandbox):
    z = make_zip(sandbox / "zips" / "same.zip", GOOD_ENTRIES)
    a = extract_dataset_zip(z, sandbox / "uploads")
    b = extract_dataset_zip(z, sandbox / "uploads")
    assert a != b and a.is_dir() and b.is_dir()


def test_the_same_upload_again_reuses_its_extraction_while_it_is_intact(sandbox):
    """No second copy of the same upload; but a folder changed since (a file
    deleted, overwritten at the same size, or added) is not passed off as the
    zip's contents. A zip holding a folder named like the marker still extracts."""
    from core.zipimport import SOURCE_SUFFIX, reuse_or_extract
    uploads = sandbox / "uploads"
    z = make_zip(sandbox / "zips" / "same.zip", {**GOOD_ENTRIES, SOURCE_SUFFIX + "/x.txt": b"hi"})
    a, reused = reuse_or_extract(z, uploads)
    assert not reused and (a / "train").is_dir()
    assert reuse_or_extract(z, uploads) == (a, True)
    victim = next(p for p in sorted(a.rglob("*.jpg")))
    victim.write_bytes(bytes(victim.stat().st_size))  # same size, other bytes
    b, reused = reuse_or_extract(z, uploads)
    assert not reused and b != a
    assert reuse_or_extract(z, uploads) == (b, True)
    (b / "train" / "extra.jpg").write_bytes(b"x")
    c, reused = reuse_or_extract(z, uploads)
    assert not reused and c not in (a, b)
    other = make_zip(sandbox / "zips" / "other.zip", dict(list(GOOD_ENTRIES.items())[1:]))
    assert reuse_or_extract(other, uploads)[1] is False
