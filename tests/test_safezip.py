"""zoo.store.safezip: hostile archives are rejected and leave nothing behind; good ones extract."""

from __future__ import annotations

import stat
import struct
import warnings
import zipfile
from pathlib import Path

import pytest

from zoo.errors import UnsafeArchiveError, ZooError
from zoo.store.safezip import extract_zip


def make_zip(path: Path, members: list[tuple[str | zipfile.ZipInfo, bytes]]) -> Path:
    """Write ``members`` (name or ZipInfo, content) into a deflated zip at ``path``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about duplicate names
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
            for name, data in members:
                archive.writestr(name, data)
    return path


def symlink_info(name: str) -> zipfile.ZipInfo:
    """A ZipInfo whose Unix mode marks a symbolic link."""
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


def lie_about_size(path: Path, declared: int) -> None:
    """Rewrite every uncompressed-size field (local and central headers) to ``declared``."""
    data = bytearray(path.read_bytes())
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        start = data.find(signature)
        while start != -1:
            struct.pack_into("<I", data, start + offset, declared)
            start = data.find(signature, start + 4)
    path.write_bytes(bytes(data))


def assert_nothing_left(dest: Path) -> None:
    """Neither ``dest`` nor a temporary sibling survives a rejected extraction."""
    assert not dest.exists()
    assert [p.name for p in dest.parent.iterdir() if p.name != "evil.zip"] == []


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    """Destination inside an otherwise empty directory (besides the archive)."""
    return tmp_path / "out" / "extracted"


def test_good_archive_extracts(tmp_path: Path, dest: Path) -> None:
    archive = make_zip(
        tmp_path / "good.zip",
        [("b.txt", b"bee"), ("dir/", b""), ("dir/a.bin", b"\x00" * 1000), ("./c", b"c")],
    )
    files = extract_zip(archive, dest)
    assert files == sorted([dest / "b.txt", dest / "dir" / "a.bin", dest / "c"])
    assert (dest / "b.txt").read_bytes() == b"bee"
    assert (dest / "dir" / "a.bin").read_bytes() == b"\x00" * 1000
    assert sorted(p.name for p in dest.parent.iterdir()) == ["extracted"]


@pytest.mark.parametrize(
    "name",
    ["../evil", "a/../../evil", "a/..", "/abs", "/etc/passwd", "C:/x", "c:x", "a\\..\\evil", "/"],
)
def test_unsafe_names_are_rejected(tmp_path: Path, dest: Path, name: str) -> None:
    dest.parent.mkdir()
    archive = make_zip(dest.parent / "evil.zip", [("ok.txt", b"fine"), (name, b"evil")])
    with pytest.raises(UnsafeArchiveError) as caught:
        extract_zip(archive, dest)
    assert str(archive) in str(caught.value) and repr(name) in str(caught.value)
    assert caught.value.hint and caught.value.exit_code == 4
    assert_nothing_left(dest)
    assert not (tmp_path / "evil").exists()


def test_symlink_member_is_rejected(dest: Path) -> None:
    dest.parent.mkdir()
    archive = make_zip(
        dest.parent / "evil.zip", [("ok.txt", b"fine"), (symlink_info("link"), b"/etc/passwd")]
    )
    with pytest.raises(UnsafeArchiveError, match="symbolic link"):
        extract_zip(archive, dest)
    assert_nothing_left(dest)


@pytest.mark.parametrize("second", ["a.txt", "A.TXT", "./a.txt"])
def test_duplicate_names_are_rejected(dest: Path, second: str) -> None:
    dest.parent.mkdir()
    archive = make_zip(dest.parent / "evil.zip", [("a.txt", b"one"), (second, b"two")])
    with pytest.raises(UnsafeArchiveError, match="duplicates"):
        extract_zip(archive, dest)
    assert_nothing_left(dest)


def test_file_used_as_directory_is_rejected(dest: Path) -> None:
    dest.parent.mkdir()
    archive = make_zip(dest.parent / "evil.zip", [("a", b"file"), ("a/b", b"under a file")])
    with pytest.raises(UnsafeArchiveError, match="is a file"):
        extract_zip(archive, dest)
    assert_nothing_left(dest)


def test_oversized_member_is_rejected(dest: Path) -> None:
    dest.parent.mkdir()
    archive = make_zip(dest.parent / "evil.zip", [("small", b"x"), ("big", b"\x00" * 5000)])
    with pytest.raises(UnsafeArchiveError, match="'big'.*over the 1000-byte limit"):
        extract_zip(archive, dest, max_member_bytes=1000)
    assert_nothing_left(dest)


def test_oversized_total_is_rejected(dest: Path) -> None:
    dest.parent.mkdir()
    members = [(f"part{i}", b"\x00" * 600) for i in range(3)]
    archive = make_zip(dest.parent / "evil.zip", members)
    with pytest.raises(UnsafeArchiveError, match="in total"):
        extract_zip(archive, dest, max_total_bytes=1000)
    assert_nothing_left(dest)


@pytest.mark.parametrize("declared", [10, 2_000_000])
def test_lying_header_is_rejected(dest: Path, declared: int) -> None:
    dest.parent.mkdir()
    archive = make_zip(dest.parent / "evil.zip", [("bomb", b"\x00" * 1_000_000)])
    lie_about_size(archive, declared)
    with zipfile.ZipFile(archive) as check:
        assert check.getinfo("bomb").file_size == declared  # the header now lies
    with pytest.raises(UnsafeArchiveError, match="'bomb'"):
        extract_zip(archive, dest, max_member_bytes=5_000_000)
    assert_nothing_left(dest)


@pytest.mark.parametrize("method", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_other_compression_methods_are_rejected(dest: Path, method: int) -> None:
    """Only stored and deflate: the others' decoders raise their own errors on corrupt data."""
    dest.parent.mkdir()
    archive = dest.parent / "evil.zip"
    with zipfile.ZipFile(archive, "w", method) as writer:
        writer.writestr("a.txt", b"x" * 1000)
    with pytest.raises(UnsafeArchiveError, match=f"'a.txt'.*compression method {method}"):
        extract_zip(archive, dest)
    assert_nothing_left(dest)


@pytest.mark.parametrize("flag", [0x1, 0x20, 0x40])
def test_encrypted_or_patched_members_are_rejected(dest: Path, flag: int) -> None:
    """Flags zipfile cannot read (or would need a password for) are refused, not a traceback."""
    dest.parent.mkdir()
    archive = make_zip(dest.parent / "evil.zip", [("a.txt", b"x" * 1000)])
    data = bytearray(archive.read_bytes())
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        start = data.find(signature) + offset
        struct.pack_into("<H", data, start, struct.unpack_from("<H", data, start)[0] | flag)
    archive.write_bytes(bytes(data))
    with pytest.raises(UnsafeArchiveError, match=f"'a.txt'.*encrypted or patched \\({flag:#x}"):
        extract_zip(archive, dest)
    assert_nothing_left(dest)


def test_a_name_that_is_not_utf8_is_rejected(dest: Path) -> None:
    dest.parent.mkdir()
    archive = make_zip(dest.parent / "evil.zip", [("caf\u00e9.txt", b"x")])  # flagged UTF-8
    archive.write_bytes(archive.read_bytes().replace("\u00e9".encode(), b"\xff\xfe"))
    with pytest.raises(UnsafeArchiveError, match="not a valid zip"):
        extract_zip(archive, dest)
    assert_nothing_left(dest)


def test_not_a_zip_is_rejected(dest: Path) -> None:
    dest.parent.mkdir()
    archive = dest.parent / "evil.zip"
    archive.write_bytes(b"this is not a zip archive")
    with pytest.raises(UnsafeArchiveError, match="not a valid zip"):
        extract_zip(archive, dest)
    assert_nothing_left(dest)


def test_non_empty_destination_is_left_alone(tmp_path: Path, dest: Path) -> None:
    archive = make_zip(tmp_path / "good.zip", [("a.txt", b"new")])
    dest.mkdir(parents=True)
    (dest / "a.txt").write_bytes(b"old")
    with pytest.raises(ZooError, match="not empty") as caught:
        extract_zip(archive, dest)
    assert not isinstance(caught.value, UnsafeArchiveError)
    assert (dest / "a.txt").read_bytes() == b"old"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["extracted"]


def test_empty_destination_is_filled(tmp_path: Path, dest: Path) -> None:
    archive = make_zip(tmp_path / "good.zip", [("a.txt", b"new")])
    dest.mkdir(parents=True)
    assert extract_zip(archive, dest) == [dest / "a.txt"]
    assert (dest / "a.txt").read_bytes() == b"new"
