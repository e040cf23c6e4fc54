"""Registry benchmarks: cold `zoo pull` against a raw `snapshot_download` of the same files from
the same local Hugging Face protocol server (olah behind our commit proxy), cold `zoo pull` from
a release store, warm `zoo pull`, and `zoo list` start-up. Results go to
benchmarks/results/pull.json.

    .venv/bin/python benchmarks/bench_pull.py [--payload-mb 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import make_build_dir  # noqa: E402
from hubserver import olah_hub  # noqa: E402

VARIANT = "cifar10-split-tiny"
REPO = "zoo-bench/cifar10-split-tiny"


def _timed(fn) -> float:  # noqa: ANN001
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _cli_seconds(args: list[str], env: dict[str, str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([str(ROOT / ".venv" / "bin" / "zoo"), *args], env=env, check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    """Run the benchmark and write its JSON."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--payload-mb", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="zoo-bench-"))
    os.environ.update(ZOO_HOME=str(work / "home"), ZOO_REGISTRY=str(work / "registry.json"))
    shutil.copy(ROOT / "registry.json", work / "registry.json")
    from huggingface_hub import snapshot_download

    import zoo

    build_dir = make_build_dir(work / "build", payload=args.payload_mb << 20)
    size = sum(p.stat().st_size for p in build_dir.iterdir() if p.is_file())
    with olah_hub(work / "hf") as hub:
        os.environ.update(ZOO_HF_ENDPOINT=hub.endpoint, HF_TOKEN=hub.token)
        build = zoo.publish(build_dir, f"hf://{REPO}", registry_path=work / "registry.json")
        files = [e.path for e in build.files]
        cold_zoo, cold_raw = [], []
        for i in range(args.repeats):  # alternate, so that neither side gets a warmer server
            shutil.rmtree(work / "home" / "cache", ignore_errors=True)
            cold_zoo.append(_timed(lambda: zoo.pull(VARIANT)))
            target = work / f"raw-{i}"
            cold_raw.append(_timed(lambda t=target: snapshot_download(
                REPO, revision=build.hubs[0].revision, allow_patterns=files, endpoint=hub.endpoint,
                token=hub.token, cache_dir=t)))  # fmt: skip
            shutil.rmtree(target)
        env = dict(os.environ)
        warm_cli = _cli_seconds(["pull", VARIANT], env, args.repeats)
        warm_api = statistics.median(_timed(lambda: zoo.pull(VARIANT)) for _ in range(args.repeats))
    list_cli = _cli_seconds(["list"], dict(os.environ), args.repeats)
    # The same build from a release store only (a registry copy that records no hub).
    store_registry = work / "registry-store.json"
    shutil.copy(ROOT / "registry.json", store_registry)
    os.environ["ZOO_RELEASES"] = str(work / "releases")
    zoo.publish(build_dir, "releases", registry_path=store_registry)
    cold_store = []
    for _ in range(args.repeats):
        shutil.rmtree(work / "home" / "cache", ignore_errors=True)
        cold_store.append(_timed(lambda: zoo.pull(VARIANT, registry_path=store_registry)))
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "payload_bytes": size,
        "files": len(files),
        "repeats": args.repeats,
        "cold_zoo_pull_seconds_median": statistics.median(cold_zoo),
        "cold_snapshot_download_seconds_median": statistics.median(cold_raw),
        "cold_ratio_zoo_over_snapshot_download": statistics.median(cold_zoo)
        / statistics.median(cold_raw),
        "cold_zoo_pull_from_release_store_seconds_median": statistics.median(cold_store),
        "warm_zoo_pull_api_seconds_median": warm_api,
        "warm_zoo_pull_cli_seconds_median": warm_cli,
        "zoo_list_cli_seconds_median": list_cli,
    }
    out = ROOT / "benchmarks" / "results" / "pull.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(json.dumps(result, indent=2, sort_keys=True))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
