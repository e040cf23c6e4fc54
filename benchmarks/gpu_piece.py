"""Train a variant on a lent GPU machine, one piece at a time, and bring its checkpoint back.

A lent GPU machine (see docs/gpu.md) reaches no package registry, takes at most 64 MiB of
files with each command, runs a command for at most 10 minutes and gives back at most 64 MiB in
files of 16 MiB. Its Python has torch but neither brevitas nor concrete-ml. So a piece is:

1. ``prepare`` (here): into ``.gpu/`` (git-ignored), the wheels zoo's training needs beyond
   what that machine has, the CIFAR copy of ``../shared/data`` (23 MB; the official archive
   is too large to carry) and the build's ``work/`` checkpoints from the last piece, cut into
   parts of at most 15 MiB.
2. ``piece`` (there, the prepared command): install the wheels into /tmp, write the data,
   join the parts, and ``zoo build VARIANT --profile P --device cuda --resume --train-only
   --stop-after SECONDS``: it trains until its time is up or training is done, checkpointing
   every epoch; then the checkpoints go to ``$OUT`` in parts, with the build log. Parts
   beyond what one reply brings back stay on the machine: ``send`` (there, at once, while it
   is warm) brings the rest.
3. ``collect`` (here): join the parts returned (from one folder or several) into
   ``build-out/VARIANT-PROFILE/work/``, checked against the sha256 the piece recorded. Run
   ``prepare`` again for the next piece; once training is done, ``zoo build VARIANT --profile
   P --device cuda --resume`` here compiles and simulates on the CPU (training is skipped)
   and records ``device: cuda``.

Usage (the device tool's ``run`` takes the middle command)::

    python benchmarks/gpu_piece.py prepare cifar10-cnv-2w2a --profile long
    run: python3 benchmarks/gpu_piece.py piece cifar10-cnv-2w2a --profile long --seconds 420
         (carry [".gpu"], timeout_s 600)
    python benchmarks/gpu_piece.py collect cifar10-cnv-2w2a --profile long FILES_AT
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from zoo.store.hashing import sha256_file  # noqa: E402  (light: no torch, no concrete)

CARRY = ROOT / ".gpu"
PART = 15 * 2**20  # the device tool returns files of at most 16 MiB
PARTS_PER_CALL = 4  # ... and 64 MiB in all: 60 MiB of parts, a log and an index
#: What zoo's training imports that the GPU machine's image lacks (it has torch, numpy, click,
#: tqdm, filelock, safetensors, huggingface_hub, attrs): brevitas and its own needs,
#: jsonschema (the registry's schema) with its needs, and threadpoolctl (the kernel check).
#: Versions: brevitas and threadpoolctl as installed here.
WHEELS = [
    "brevitas=={brevitas}",
    "threadpoolctl=={threadpoolctl}",
    "setuptools==75.3.0",  # brevitas 0.10 imports pkg_resources, which newer setuptools lack
    "dependencies==2.0.1",
    "unfoldNd==0.2.3",
    "jsonschema==4.26.0",
    "jsonschema-specifications==2025.9.1",
    "referencing==0.37.0",
    "rpds-py==2026.9.1",
]
#: The GPU machine's Python (pip needs it to choose binary wheels).
DEVICE_PYTHON = "3.12"
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]


def split(files: list[Path], dest: Path) -> dict[str, dict]:
    """Cut each file into ``dest/NAME.partK`` of at most :data:`PART` bytes; return the index
    (name → size, sha256, parts)."""
    dest.mkdir(parents=True, exist_ok=True)
    index = {}
    for path in files:
        data, parts = path.read_bytes(), []
        for k in range(0, max(len(data), 1), PART):
            part = dest / f"{path.name}.part{k // PART}"
            part.write_bytes(data[k : k + PART])
            parts.append(part.name)
        index[path.name] = {"size": len(data), "sha256": sha256_file(path), "parts": parts}
    (dest / "parts.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    return index


def join(srcs: list[Path], dest: Path) -> list[Path]:
    """Join the parts that ``srcs[0]/parts.json`` lists, each found in one of ``srcs``, into
    ``dest``, all or nothing: every part must be there and every joined file match its size
    and sha256 before any replaces its namesake (no work/ with some checkpoints new, some old)."""
    index = json.loads((srcs[0] / "parts.json").read_text())
    where = {part: next((src / part for src in srcs if (src / part).is_file()), None)
             for entry in index.values() for part in entry["parts"]}  # fmt: skip
    missing = sorted(part for part, path in where.items() if path is None)
    if missing:
        sys.exit(f"{', '.join(missing)} missing: pass every folder that the piece and its "
                 "`send` commands returned")  # fmt: skip
    dest.mkdir(parents=True, exist_ok=True)
    tmps = {name: dest / f".{name}.joining" for name in index}
    try:
        for name, entry in index.items():
            tmp = tmps[name]
            with tmp.open("wb") as out:
                for part in entry["parts"]:
                    out.write(where[part].read_bytes())
            if tmp.stat().st_size != entry["size"] or sha256_file(tmp) != entry["sha256"]:
                sys.exit(f"{name}: the joined parts do not match their sha256; fetch them again")
        for name, tmp in tmps.items():
            tmp.replace(dest / name)
    finally:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)
    return [dest / name for name in index]


def build_dir(variant: str, profile: str) -> Path:
    return ROOT / "build-out" / f"{variant}-{profile}"


def prepare(args: argparse.Namespace) -> None:
    """Fill ``.gpu/`` for the next piece."""
    from importlib import metadata

    shutil.rmtree(CARRY, ignore_errors=True)
    wheels = CARRY / "wheels"
    here = {name: metadata.version(name) for name in ("brevitas", "threadpoolctl")}
    specs = [w.format(**here) for w in WHEELS]
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                    "--only-binary=:all:", "--python-version", DEVICE_PYTHON,
                    "--implementation", "cp", *platforms, "-d", str(wheels), *specs],
                   check=True)  # fmt: skip
    shared = Path(args.shared_data)
    if not (shared / "materialize_cifar.py").is_file():
        sys.exit(f"{shared} has no materialize_cifar.py: pass --shared-data DIR")
    shutil.copytree(shared, CARRY / "data")
    work = build_dir(args.variant, args.profile) / "work"
    checkpoints = sorted(work.glob("*.safetensors")) if work.is_dir() else []
    split(checkpoints, CARRY / "work")
    size = sum(p.stat().st_size for p in CARRY.rglob("*") if p.is_file())
    print(f"prepared {CARRY}: {size / 2**20:.1f} MiB ({len(checkpoints)} checkpoints from {work})")
    if size > 60 * 2**20:
        sys.exit("more than the device tool carries with the working tree (64 MiB in all)")


def piece(args: argparse.Namespace) -> None:
    """On the GPU machine: train for ``--seconds`` and leave the checkpoints in ``$OUT``."""
    out = Path(os.environ.get("OUT", "gpu-out"))
    site, data = Path("/tmp/site"), Path("/tmp/cifar")
    build = Path("/tmp/build") / f"{args.variant}-{args.profile}"
    wheels = [str(w) for w in (CARRY / "wheels").glob("*.whl")]
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                    "--no-compile", "--upgrade", "--target", str(site), *wheels],
                   check=True)  # fmt: skip
    if not (data / "cifar-10-batches-py").is_dir():
        subprocess.run([sys.executable, str(CARRY / "data" / "materialize_cifar.py"), str(data)],
                       check=True)  # fmt: skip
    carried, joined = CARRY / "work" / "parts.json", build / "joined-carry.sha256"
    if not joined.is_file() or joined.read_text() != sha256_file(carried):
        join([CARRY / "work"], build / "work")
        joined.write_text(sha256_file(carried))
    # else: a warm machine, the same carry: its own checkpoints are newer than the carried ones
    (build / "work" / "build.log").unlink(missing_ok=True)  # a warm machine keeps the last one
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{ROOT}", "PYTHONUNBUFFERED": "1",
           "TQDM_DISABLE": "1"}  # fmt: skip
    cmd = [sys.executable, "-m", "zoo", "-v", "build", args.variant, "--profile", args.profile,
           "--device", "cuda", "--resume", "--train-only", "--stop-after", str(args.seconds),
           "--data-dir", str(data), "--out", str(build)]  # fmt: skip
    print("$", " ".join(cmd), flush=True)
    status = subprocess.run(cmd, env=env, cwd=ROOT).returncode
    out.mkdir(parents=True, exist_ok=True)
    if not args.log_only:
        parts = build / "parts"
        shutil.rmtree(parts, ignore_errors=True)
        split(sorted((build / "work").glob("*.safetensors")), parts)
        _send(args, parts, out, first=0)
    shutil.copy(build / "work" / "build.log", out / f"{args.variant}-build.log")
    print(f"zoo build exited {status} (10: paused or trained, as asked)")
    if status not in (0, 10):
        sys.exit(status)


def _send(args: argparse.Namespace, parts: Path, out: Path, first: int) -> None:
    """Copy ``parts.json`` and the parts from number ``first`` on into ``out``, as many as one
    command brings back (:data:`PARTS_PER_CALL`); say how to fetch the rest."""
    names = [p for entry in json.loads((parts / "parts.json").read_text()).values()
             for p in entry["parts"]]  # fmt: skip
    shutil.copy(parts / "parts.json", out / "parts.json")
    end = min(len(names), first + PARTS_PER_CALL)
    for name in names[first:end]:
        shutil.copy(parts / name, out / name)
    print(f"parts {first + 1}-{end} of {len(names)} in $OUT")
    if end < len(names):
        print(f"MORE: run at once, while the machine is warm: python3 benchmarks/gpu_piece.py "
              f"send {args.variant} --profile {args.profile} --first {end}")  # fmt: skip


def send(args: argparse.Namespace) -> None:
    """On the GPU machine, right after a piece: the parts it could not bring back."""
    build = Path("/tmp/build") / f"{args.variant}-{args.profile}"
    out = Path(os.environ.get("OUT", "gpu-out"))
    out.mkdir(parents=True, exist_ok=True)
    _send(args, build / "parts", out, args.first)


def collect(args: argparse.Namespace) -> None:
    """Join what a piece returned into the build's ``work/``."""
    work = build_dir(args.variant, args.profile) / "work"
    for path in join([Path(f) for f in args.files], work):
        print(f"{path} ({path.stat().st_size / 2**20:.1f} MiB, sha256 verified)")
    log = Path(args.files[0]) / f"{args.variant}-build.log"
    if log.is_file():
        with (work / "gpu-build.log").open("a") as f:
            f.write(log.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="step", required=True)
    steps = (("prepare", prepare), ("piece", piece), ("send", send), ("collect", collect))
    for name, fn in steps:
        p = sub.add_parser(name, help=fn.__doc__)
        p.add_argument("variant")
        p.add_argument("--profile", default="long")
        p.set_defaults(fn=fn)
        if name == "prepare":
            p.add_argument("--shared-data", default=str(ROOT.parent / "shared" / "data"))
        if name == "piece":
            p.add_argument(
                "--seconds",
                type=float,
                default=420,
                help="stop at the first checkpoint after this many seconds of the build",
            )
            p.add_argument(
                "--log-only",
                action="store_true",
                help="bring back the build log only (a timing run, or checkpoints "
                "too large to carry)",
            )
        if name == "send":
            p.add_argument("--first", type=int, required=True, help="the first part to send")
        if name == "collect":
            p.add_argument("files", nargs="+", help="the folders the device tool put the "
                           "piece's files in (the piece's first, then its `send`s')")  # fmt: skip
    args = parser.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
