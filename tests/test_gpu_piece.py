"""``benchmarks/gpu_piece.py`` moves checkpoints larger than one reply of the device tool: cut
into parts, sent over several replies, joined back here only if every part is there and every
sha256 matches."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("gpu_piece", ROOT / "benchmarks" / "gpu_piece.py")
assert spec is not None and spec.loader is not None
gp = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gp)

REPLY_LIMITS = {"files": 8, "bytes": 64 * 2**20, "file_bytes": 16 * 2**20}  # docs/gpu.md


def _reply_fits(folder: Path) -> None:
    files = [p for p in folder.iterdir() if p.is_file()]
    assert len(files) <= REPLY_LIMITS["files"]
    assert sum(p.stat().st_size for p in files) <= REPLY_LIMITS["bytes"]
    assert max(p.stat().st_size for p in files) <= REPLY_LIMITS["file_bytes"]


def test_two_finished_full_width_stages_come_back_in_two_replies(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    sizes = {"float.safetensors": 37_000_000, "qat.safetensors": 37_400_000}
    for name, size in sizes.items():
        (work / name).write_bytes(os.urandom(size))
    parts = tmp_path / "parts"
    index = gp.split(sorted(work.iterdir()), parts)
    assert sum(len(e["parts"]) for e in index.values()) == 6

    args = argparse.Namespace(variant="cifar10-vgg11-qat", profile="full")
    first, second = tmp_path / "reply1", tmp_path / "reply2"
    for out, start in ((first, 0), (second, gp.PARTS_PER_CALL)):
        out.mkdir()
        gp._send(args, parts, out, first=start)
        _reply_fits(out)

    with pytest.raises(SystemExit, match="missing"):  # the second reply is needed
        gp.join([first], tmp_path / "alone")
    assert not (tmp_path / "alone").exists()
    joined = gp.join([first, second], tmp_path / "back")
    assert sorted(p.name for p in joined) == sorted(sizes)
    for path in joined:
        assert path.read_bytes() == (work / path.name).read_bytes()

    # a damaged part is refused and leaves nothing behind
    name = json.loads((first / "parts.json").read_text())["float.safetensors"]["parts"][0]
    (first / name).write_bytes(b"x" + (first / name).read_bytes()[1:])
    with pytest.raises(SystemExit, match="sha256"):
        gp.join([first, second], tmp_path / "bad")
    assert not list((tmp_path / "bad").iterdir())
