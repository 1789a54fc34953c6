"""What a model file may cost before torch.load reads it.

torch.load inflates compressed zip entries without limit (a 200 KB file can
ask for gigabytes) and trusts the sizes a file declares. PyTorch writes every
entry of its zip format stored (uncompressed), so a file it wrote never needs
more memory than its own size. Checked here from the zip's central directory
alone (nothing is extracted) and from the pickle's opcodes (nothing is built):
- entries: stored only, each and all together no larger than the file, at most
  MAX_ENTRIES of them, the directory where the end record says it is (so this
  check and torch's zip reader see the same directory);
- the pickle (data.pkl, or the pickles of the legacy format): at most
  MAX_PICKLE_BYTES, because unpickling can build ~70 bytes of Python objects
  per byte (an empty dict is 1 opcode and 64 bytes);
- the file: at most MAX_FILE_BYTES.
Legacy (pre-1.6, non-zip) files hold their tensors after the pickles, read
into storages whose size torch checks against the file, so they are bounded
by the file size and the pickle bound."""
from __future__ import annotations

import pickletools
import struct
import zipfile
from typing import BinaryIO

from .errors import CheckpointError, first_line

# The largest file this tool can write or use is a ResNet-18 checkpoint with its
# AdamW state and a 10,000-class head, ~0.2 GB (a typical one is 45-135 MB).
# 2 GiB leaves 10x room for files from elsewhere that carry extra state (EMA
# copies, other optimizers) and is still a load that a laptop survives.
MAX_FILE_BYTES = 2 * 2**30
# A checkpoint's pickle is its metadata: 10,000 epochs of history plus 10,000
# class names and their per-class counts come to ~4 MB.
MAX_PICKLE_BYTES = 16 * 2**20
# One entry per tensor storage: ~320 for a ResNet-18 checkpoint with AdamW state.
MAX_ENTRIES = 10_000
LEGACY_PICKLES = 5  # magic number, protocol, sys info, the object, storage keys

_EOCD = struct.Struct("<4s4H2LH")
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB" if n < 2**30 else f"{n / 2**30:,.1f} GiB"


def check_torch_file(f: BinaryIO, name, size: int) -> None:
    """Raise CheckpointError unless the open file `f` (`size` bytes, named `name`
    in messages) is safe to hand to torch.load. Leaves f at offset 0."""
    if size > MAX_FILE_BYTES:
        raise CheckpointError(f"{name} is {_mib(size)}; model files over {_mib(MAX_FILE_BYTES)} are refused "
                              f"(the largest this tool makes is ~0.2 GB)")
    try:
        f.seek(0)
        head = f.read(4)
        if head == b"PK\x03\x04":
            _check_zip(f, name, size)
        elif head[:1] == b"\x80":
            _check_legacy_pickles(f, name)
    finally:
        f.seek(0)


def _damaged(name, why: str) -> CheckpointError:
    return CheckpointError(f"{name} is not a readable PyTorch checkpoint (truncated or damaged: {why})")


def _directory_bounds(f: BinaryIO, name, size: int) -> tuple[int, int, int]:
    """(entries, offset, size) of the central directory from the end records,
    which must place it right before them (as torch writes it): a reader that
    trusts the stated offset and one that trusts the position (Python's zipfile)
    would otherwise read two different directories."""
    tail_len = min(size, _EOCD.size + 0xFFFF)
    f.seek(size - tail_len)
    tail = f.read(tail_len)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < _EOCD.size:
        raise _damaged(name, "no zip directory at its end")
    _, _, _, _, entries, cd_size, cd_offset, _ = _EOCD.unpack_from(tail, at)
    end = size - tail_len + at  # where the directory must end
    if at >= _ZIP64_LOCATOR.size and tail[at - _ZIP64_LOCATOR.size:][:4] == b"PK\x06\x07":
        # zip64 (torch always writes it): the real values are in the record the locator points to
        _, _, record_at, _ = _ZIP64_LOCATOR.unpack_from(tail, at - _ZIP64_LOCATOR.size)
        f.seek(min(record_at, size))
        record = f.read(_ZIP64_EOCD.size)
        if len(record) < _ZIP64_EOCD.size or record[:4] != b"PK\x06\x06":
            raise _damaged(name, "a broken zip64 end record")
        plain = (entries, cd_size, cd_offset)
        _, _, _, _, _, _, _, entries, cd_size, cd_offset = _ZIP64_EOCD.unpack(record)
        # each plain value is the zip64 one, or says "see zip64"; readers that take either then agree
        if any(p not in (z, 0xFFFF, 0xFFFFFFFF) for p, z in zip(plain, (entries, cd_size, cd_offset))):
            raise CheckpointError(f"{name} is refused: its two zip end records disagree (PyTorch never writes "
                                  f"such a file)")
        end = record_at
    elif entries == 0xFFFF or 0xFFFFFFFF in (cd_size, cd_offset):
        raise _damaged(name, "a zip64 directory without its locator")
    if cd_offset + cd_size != end:
        raise CheckpointError(f"{name} is refused: its zip directory is not where its end record says "
                              f"(PyTorch never writes such a file)")
    return entries, cd_offset, cd_size



def _check_zip(f: BinaryIO, name, size: int) -> None:
    entries, _, cd_size = _directory_bounds(f, name, size)
    if entries > MAX_ENTRIES:
        raise CheckpointError(f"{name} is refused: its zip directory lists {entries:,} entries; PyTorch files "
                              f"this tool can use have at most {MAX_ENTRIES:,} (one per tensor)")
    try:
        f.seek(0)
        infos = zipfile.ZipFile(f).infolist()
    except Exception as e:  # zipfile raises several types for a damaged directory
        raise _damaged(name, first_line(e)) from None
    if len(infos) != entries:
        raise CheckpointError(f"{name} is refused: its zip directory holds {len(infos):,} entries but its "
                              f"end record says {entries:,} (PyTorch never writes such a file)")
    total = 0
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(
                f"{name} is refused: its entry {info.filename!r} is compressed (method {info.compress_type}); "
                f"PyTorch writes every entry stored, and a compressed one can inflate to any size (a zip bomb). "
                f"If you re-zipped the file, use the original .pt")
        if info.compress_size != info.file_size or info.file_size > size:
            raise CheckpointError(f"{name} is refused: its entry {info.filename!r} claims {info.file_size:,} bytes "
                                  f"in a {size:,}-byte file")
        if info.filename.rsplit("/", 1)[-1] == "data.pkl" and info.file_size > MAX_PICKLE_BYTES:
            raise CheckpointError(f"{name} is refused: its pickle ({info.filename}) is {_mib(info.file_size)}; "
                                  f"a checkpoint's metadata is at most {_mib(MAX_PICKLE_BYTES)}")
        total += info.file_size
    if total > size:  # stored entries lie inside the file: more is a lie about sizes
        raise CheckpointError(f"{name} is refused: its entries add up to {total:,} bytes, more than the file's "
                              f"{size:,} (a zip bomb or a damaged directory)")
    if cd_size > size:
        raise _damaged(name, "its directory is larger than the file")


def _check_legacy_pickles(f: BinaryIO, name) -> None:
    """Walk the opcodes (nothing is built or run) of the legacy format's pickles.
    A parse error is left to torch.load, whose message says more."""
    f.seek(0)
    for _ in range(LEGACY_PICKLES):
        start = f.tell()
        try:
            for _op, _arg, _pos in pickletools.genops(f):
                if f.tell() - start > MAX_PICKLE_BYTES:
                    raise CheckpointError(f"{name} is refused: it holds a pickle over {_mib(MAX_PICKLE_BYTES)}; "
                                          f"a checkpoint's metadata is smaller")
        except CheckpointError:
            raise
        except Exception:
            return
        if f.tell() == start:
            return
