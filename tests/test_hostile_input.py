"""Bad input ends in one line, a hint and the promised exit code, never a traceback; and the
repairs of the store's edges (re-publishing a damaged revision, killed publishes, read-only
caches, orphans, private results). Each case failed before its fix (issue #20, "Low")."""

from __future__ import annotations

import errno
import json
import os
import stat
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import zoo
from zoo import config
from zoo.catalog import registry as reg
from zoo.cli import main
from zoo.errors import BuildError, InputError, ServerError, ZooError
from zoo.fhe import evaluate, runtime, serve
from zoo.store import cache, hub
from zoo.store.releases import ReleaseStore

VARIANT = "cifar10-split-tiny"


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stderr


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[" * 200_000 + "]" * 200_000, "nests too deeply"),
        (b"\xff\xfe{}", "not UTF-8"),
        (None, "is a directory"),
    ],
)
def test_a_broken_registry_is_one_line(tmp_path: Path, content: object, message: str) -> None:
    path = tmp_path / "registry.json"
    if content is None:
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    code, err = _run("list", "--registry", str(path))
    assert code == 3 and message in err and "Traceback" not in err


def test_a_registry_listing_a_file_twice_or_dot_dot_is_refused(registry_file: Path) -> None:
    document = json.loads(registry_file.read_text())
    entry = {"path": "..", "role": "card", "size": 1, "sha256": "sha256:" + "0" * 64}
    build = {"revision": "0" * 64, "hubs": [], "profile": "smoke", "files": [entry],
             "runtime": {"concrete-ml": "1.9.0", "concrete-python": "2.10.0", "python": "3.11",
                         "torch": "2.3.1", "brevitas": "0.10.2"},
             "metrics": {}, "circuit": {"max_bit_width": 1, "pbs_count": 0}}  # fmt: skip
    document["variants"][VARIANT]["builds"] = [build]
    registry_file.write_text(json.dumps(document))
    with pytest.raises(zoo.api.reg.RegistryError, match=r"'\.\.' does not match"):
        reg.load(registry_file)
    manifest_entry = dict(entry, path="manifest.json", role="manifest")
    build["files"] = [manifest_entry, manifest_entry]
    registry_file.write_text(json.dumps(document))
    with pytest.raises(zoo.api.reg.RegistryError, match="listed twice"):
        reg.load(registry_file)
    # head.safetensors as the weights: a client pull would skip it, and loading would fail
    build["files"] = [manifest_entry, dict(entry, path="head.safetensors", role="weights")]
    registry_file.write_text(json.dumps(document))
    with pytest.raises(zoo.api.reg.RegistryError, match="role 'weights', whose file is 'weigh"):
        reg.load(registry_file)


@pytest.mark.parametrize("ref", ["x@", "x@a@b", "cifar10-split-tiny@xyz!"])
def test_malformed_names_are_usage_errors(zoo_home: Path, ref: str) -> None:
    code, err = _run("pull", ref)
    assert code == 2 and ("cannot parse" in err or "not hexadecimal" in err)


@pytest.mark.parametrize(
    "spec",
    [
        "hf://../x",
        "hf://org/../x",
        "hf://a",
        "ftp://x",
        "hf://org/a--b",
        "hf://org/repo-",
        "hf://org/" + "x" * 97,
    ],  # the last three: names the Hugging Face Hub refuses
)
def test_bad_hub_specs_are_usage_errors(
    zoo_home: Path, registry_file: Path, build_dir: Path, spec: str
) -> None:
    code, err = _run("publish", str(build_dir), "--hub", spec)
    assert code == 2 and "hub" in err and "Traceback" not in err


def test_publishing_to_a_remote_hub_offline_is_refused_before_any_upload(
    zoo_home: Path, registry_file: Path, build_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ZOO_OFFLINE", "1")
    before = registry_file.read_bytes()
    code, err = _run("publish", str(build_dir), "--hub", "local", "--hub", "hf://org/repo")
    assert code == 6 and "ZOO_OFFLINE is set" in err and "org/repo" in err
    assert registry_file.read_bytes() == before and not (zoo_home / "hub").exists()


@pytest.mark.parametrize(
    "args", [["--max-keys", "0"], ["--port", "99999"], ["--max-key-bytes", "0"]]
)
def test_serve_checks_its_options_before_loading(zoo_home: Path, args: list[str]) -> None:
    code, err = _run("serve", "cifar10-split-tiny@" + "0" * 64, *args)
    assert code == 2 and "Invalid value" in err  # click's usage error, before any pull


@pytest.mark.parametrize("number", [errno.ENOSPC, errno.EROFS])
def test_a_full_or_read_only_disk_is_one_line(
    zoo_home: Path, registry_file: Path, build_dir: Path, monkeypatch: pytest.MonkeyPatch,
    number: int,
) -> None:  # fmt: skip
    zoo.publish(build_dir, "local")

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(number, os.strerror(number), str(zoo_home / "cache"))

    monkeypatch.setattr(cache, "fetch", fail)
    code, err = _run("pull", VARIANT)
    assert code == 1 and os.strerror(number) in err and "writable" in err
    assert "Traceback" not in err
    before = registry_file.read_bytes()
    monkeypatch.setattr(ReleaseStore, "publish", fail)
    code, err = _run("publish", str(build_dir))
    assert code == 1 and os.strerror(number) in err and "Traceback" not in err
    assert registry_file.read_bytes() == before


def test_republishing_repairs_a_damaged_local_revision(
    zoo_home: Path, registry_file: Path, build_dir: Path
) -> None:
    build = zoo.publish(build_dir, "local")
    (local,) = build.hubs
    folder = zoo_home / "hub" / local.repo / "revisions" / local.revision
    damaged = folder / "server.zip"
    damaged.write_bytes(b"x" * damaged.stat().st_size)
    stale = folder.parent / ".tmp-killed"
    stale.mkdir()
    old = time.time() - 2 * hub.STALE_SECONDS
    os.utime(stale, (old, old))
    fresh = folder.parent / ".tmp-running"
    fresh.mkdir()
    zoo.publish(build_dir, "local")
    assert damaged.read_bytes() == (build_dir / "server.zip").read_bytes()
    assert not stale.exists() and fresh.exists()  # a publish in progress is left alone
    assert zoo.pull(VARIANT).source == "local"


def test_cache_rm_counts_only_what_it_removed(
    zoo_home: Path, registry_file: Path, build_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    zoo.publish(build_dir, "local")
    zoo.pull(VARIANT)
    monkeypatch.setattr(cache.shutil, "rmtree", lambda *a, **k: None)  # a read-only cache
    assert zoo.cache_remove(VARIANT) == 0


def test_results_files_are_private(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    results = evaluate._ResultsFile(path, {"build": "x"}, resume=False)
    results.append({"index": 0})
    results.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


RUN = {"variant": VARIANT, "revision": "0" * 64, "fhe": "simulate", "test_set": "t",
       "indices": [0, 1, 2]}  # fmt: skip


def _results(path: Path, *records: object) -> Path:
    lines = [json.dumps({"run": RUN}), *(json.dumps(r) for r in records)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    "record",
    [
        {"index": [1], "label": 0, "simulate": [0.0, 1.0]},  # not an int: unhashable
        {"index": 7, "label": 0, "simulate": [0.0, 1.0]},  # not one of the run's images
        {"index": 1},  # no label, no logits
        {"index": 1, "label": 0, "simulate": [0.0]},  # logits of another width
        {"index": 1, "label": 0, "simulate": ["x", 1.0]},
    ],
)
def test_a_results_record_that_this_run_does_not_write_is_refused(
    tmp_path: Path, record: dict
) -> None:
    good = {"index": 0, "label": 3, "simulate": [0.5, 0.25]}
    path = _results(tmp_path / "r.jsonl", good, record)
    before = path.read_bytes()
    with pytest.raises(InputError, match="is not one this run writes"):
        evaluate._ResultsFile(path, RUN, resume=True)
    assert path.read_bytes() == before
    evaluate._ResultsFile(_results(tmp_path / "ok.jsonl", good), RUN, resume=True).close()


def test_results_files_of_others_are_refused_and_kept(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="is a folder"):
        evaluate._ResultsFile(tmp_path, RUN, resume=True)
    other = tmp_path / "conf.json"
    other.write_text('{"a": 1}')  # no newline: not a torn header either
    with pytest.raises(InputError, match="no run header"):
        evaluate._ResultsFile(other, RUN, resume=False)
    assert other.read_text() == '{"a": 1}'
    path = _results(tmp_path / "r.jsonl")
    with pytest.raises(InputError, match="exists"):
        evaluate._ResultsFile(path, RUN, resume=False)
    with pytest.raises(InputError, match="belongs to another run"):
        evaluate._ResultsFile(path, {**RUN, "indices": [0, 1]}, resume=True)
    torn = tmp_path / "torn.jsonl"
    torn.write_text(json.dumps({"run": RUN})[:20])  # a first write that was interrupted
    evaluate._ResultsFile(torn, RUN, resume=True).close()
    assert evaluate.parse_results(torn.read_text())[0] == RUN
    with path.open("ab") as handle:
        handle.write(b'{"index": 2, "label": 1, "simulate": [0.1, 0.2]}\xff\n')  # not UTF-8
    results = evaluate._ResultsFile(path, RUN, resume=True)
    assert results.done == {}  # the line is taken for a torn write, as it is not JSON
    results.close()


def test_eval_checks_seed_and_workers_before_loading_anything() -> None:
    absent = f"{VARIANT}@{'0' * 64}"  # loading it would say "not found" (exit 3)
    code, err = _run("eval", absent, "--seed", "-1")
    assert code == 2 and "-1 is not in the range x>=0" in err
    code, err = _run("eval", absent, "--fhe", "execute", "--backend", "ray", "--workers", "0")
    assert code == 2 and "0 is not in the range x>=1" in err
    with pytest.raises(InputError, match="--seed must be >= 0"):
        evaluate.evaluate(absent, seed=-1)
    with pytest.raises(InputError, match="--workers must be at least 1"):
        evaluate.evaluate(absent, workers=0)


def test_writing_into_a_folder_that_is_not_there_is_one_line(
    zoo_home: Path, registry_file: Path, build_dir: Path, tmp_path: Path
) -> None:
    zoo.publish(build_dir, "local")
    for command in (["bundle", "export", VARIANT], ["card", VARIANT]):
        code, err = _run(*command, "-o", str(tmp_path / "absent" / "b.zip"))
        assert code == 2 and "absent does not exist" in err and "Traceback" not in err


def test_serve_checks_its_tls_files_before_loading(tmp_path: Path) -> None:
    absent = f"{VARIANT}@{'0' * 64}"
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    key.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    cert.write_text("not a certificate\n")
    code, err = _run("serve", absent, "--port", "0", "--ssl-keyfile", str(key))
    assert code == 2 and "--ssl-keyfile and --ssl-certfile go together" in err
    code, err = _run("serve", absent, "--port", "0", "--ssl-keyfile", str(key),
                     "--ssl-certfile", str(cert))  # fmt: skip
    assert code == 2 and "cannot serve HTTPS" in err and "Traceback" not in err


def test_a_port_in_use_is_refused_before_the_build_loads() -> None:
    first = serve._listen("127.0.0.1", 0)
    try:
        with pytest.raises(ServerError, match="cannot listen on 127.0.0.1"):
            serve._listen("127.0.0.1", first.getsockname()[1]).close()
    finally:
        first.close()


def test_serve_refuses_an_open_address_without_a_token(
    zoo_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ZOO_SERVE_TOKEN", raising=False)
    code, err = _run("serve", "cifar10-split-tiny@" + "0" * 64, "--host", "0.0.0.0")
    assert code == 2 and "without a token" in err and "--token-file" in err
    short = tmp_path / "tokens"
    short.write_text("# comment\nsecret\n")
    code, err = _run("serve", VARIANT, "--host", "0.0.0.0", "--token-file", str(short))
    assert code == 2 and "shorter than 16 characters" in err


@pytest.mark.parametrize("torn", ["manifest.json", "report.json"])
def test_a_torn_build_file_stops_publish_before_any_upload(
    zoo_home: Path, registry_file: Path, build_dir: Path, torn: str
) -> None:
    path = build_dir / torn
    text = path.read_text() if path.exists() else '{"metrics": {}}'
    path.write_text(text[: len(text) // 2])  # a build killed while writing it
    before = registry_file.read_bytes()
    code, err = _run("publish", str(build_dir), "--hub", "local")
    assert code == 8 and f"{torn} is not a JSON object" in err and "Traceback" not in err
    assert "--resume" in err
    assert registry_file.read_bytes() == before and not (zoo_home / "hub").exists()


def test_publishing_through_a_linked_registry_updates_the_file_it_names(
    zoo_home: Path, registry_file: Path, build_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    link = registry_file.parent / "linked" / "registry.json"
    link.parent.mkdir()
    link.symlink_to(registry_file)
    monkeypatch.setenv("ZOO_REGISTRY", str(link))
    build = zoo.publish(build_dir, "local")
    assert link.is_symlink()
    assert [b.revision for b in reg.load(registry_file).variant(VARIANT).builds] == [build.revision]


def test_prune_leaves_the_staging_of_a_running_pull_alone(
    zoo_home: Path, registry_file: Path, build_dir: Path
) -> None:
    build = zoo.publish(build_dir, "local")
    root = zoo_home / "cache"
    with cache.staging(build, root) as folder:  # a pull (or a rebuild) at work
        assert zoo.cache_prune()["staging_removed"] == 0 and folder.is_dir()
    assert not folder.exists()


def test_a_pull_behind_a_stuck_lock_says_what_holds_it(
    zoo_home: Path, registry_file: Path, build_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    build = zoo.publish(build_dir, "local")
    monkeypatch.setattr(cache, "LOCK_TIMEOUT_S", 0.2)
    stuck = cache.staging(build, zoo_home / "cache")  # a pull (or a rebuild) that does not end
    held = pytest.raises(ZooError, match=r"another pull or rebuild has held .*\.lock")
    with stuck, held:
        zoo.pull(VARIANT)
    assert zoo.pull(VARIANT).downloaded  # the lock was released


def test_predict_checks_its_images_before_loading(
    zoo_home: Path, registry_file: Path, tmp_path: Path
) -> None:
    # The scratch registry pins no build: a check made after the load would say "not found".
    notes = tmp_path / "notes.png"
    notes.write_text("not a picture")
    code, err = _run("predict", VARIANT, str(notes))
    assert code == 2 and "is not a readable image file" in err and "Traceback" not in err
    assert _run("predict", VARIANT, str(tmp_path))[0] == 2  # a folder
    assert _run("predict", VARIANT, str(notes), "--top-k", "0")[0] == 2
    cut = tmp_path / "cut.png"  # a valid 32x32 header, its pixels cut off
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(noise).save(cut)
    cut.write_bytes(cut.read_bytes()[:200])
    code, err = _run("predict", VARIANT, str(cut))
    assert code == 2 and "cut.png is not a readable image file" in err and "Traceback" not in err


def test_images_from_python_fail_with_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="nothing.png is not a readable image file"):
        runtime.as_images(tmp_path / "nothing.png")
    pixels = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(InputError, match=r"shape \(N, 32, 32, 3\), got \(1, 32, 31, 3\)"):
        runtime.as_images([pixels, pixels[:, :31]])  # arrays of two shapes
    assert runtime.as_images([pixels, pixels[None]]).shape == (2, 32, 32, 3)
    with pytest.raises(InputError, match="no images given"):  # before keygen (minutes)
        runtime.as_images(np.zeros((0, 32, 32, 3), np.uint8))


def test_the_serve_worker_does_not_import_from_the_current_folder(
    zoo_home: Path, registry_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from zoo.errors import ZooError
    from zoo.fhe.worker import FheWorker

    marker = tmp_path / "ran"
    planted = tmp_path / "cwd" / "zoo" / "fhe"
    planted.mkdir(parents=True)
    for folder in (planted.parent, planted):
        (folder / "__init__.py").write_text("")
    (planted / "worker.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.chdir(planted.parent.parent)
    with pytest.raises(ZooError, match="could not load"):  # the real worker: no such build
        FheWorker(f"{VARIANT}@{'0' * 64}").start()
    assert not marker.exists()


def test_serve_on_a_taken_port_fails_before_loading(zoo_home: Path, registry_file: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # The scratch registry pins no build: a load first would say "not found" (exit 3).
        code, err = _run("serve", f"{VARIANT}@{'0' * 64}", "--port", str(port))
    assert code == 9 and f"cannot listen on 127.0.0.1:{port}" in err and "--port" in err


def test_a_build_without_resume_keeps_a_paused_builds_checkpoints(
    registry_file: Path, tmp_path: Path
) -> None:
    checkpoint = tmp_path / "paused" / "work" / "checkpoint.safetensors"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"hours of training")
    code, err = _run("build", VARIANT, "--profile", "smoke", "--out", str(checkpoint.parent.parent))
    assert code == 8 and "already holds a build or its checkpoints" in err and "--resume" in err
    assert checkpoint.read_bytes() == b"hours of training"


def test_a_build_trained_on_a_gpu_is_not_rebuilt_on_a_cpu(
    zoo_home: Path, registry_file: Path, build_dir: Path
) -> None:
    build = zoo.publish(build_dir, "local")
    document = json.loads(registry_file.read_text())
    document["variants"][VARIANT]["builds"][-1]["device"] = "cuda"
    reg.save(document, registry_file)
    code, err = _run("build", VARIANT, "--check", build.revision[:12])
    assert code == 8 and "trained on a GPU" in err and "release store" in err


def test_a_build_of_other_versions_is_not_rebuilt_for_hours_to_differ(
    zoo_home: Path, registry_file: Path, build_dir: Path
) -> None:
    build = zoo.publish(build_dir, "local")
    document = json.loads(registry_file.read_text())
    document["variants"][VARIANT]["builds"][-1]["runtime"]["concrete-ml"] = "0.1.0"
    reg.save(document, registry_file)
    code, err = _run("build", VARIANT, "--check", build.revision[:12])
    assert code == 5 and "built with other versions" in err and "concrete-ml: need 0.1.0" in err


@pytest.mark.parametrize(("option", "value"), [("--seed", "-1"), ("--stop-after", "nan")])
def test_build_options_out_of_range_stop_before_any_work(
    registry_file: Path, tmp_path: Path, option: str, value: str
) -> None:
    code, err = _run("build", VARIANT, "--profile", "smoke", "--out", str(tmp_path / "b"),
                     option, value)  # fmt: skip
    assert code == 2 and option in err and "Traceback" not in err
    assert not (tmp_path / "b").exists()


def test_training_on_a_gpu_that_is_not_there_is_a_build_error(
    registry_file: Path, cifar_dir: Path, tmp_path: Path
) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: it would train there")
    code, err = _run("build", VARIANT, "--profile", "smoke", "--device", "cuda",
                     "--data-dir", str(cifar_dir), "--out", str(tmp_path / "b"))  # fmt: skip
    assert code == 8 and "sees no GPU" in err and "Traceback" not in err


def test_check_refuses_options_it_would_ignore(registry_file: Path) -> None:
    result = CliRunner().invoke(main, ["build", VARIANT, "--check", "abc", "--profile", "smoke",
                                       "--stop-after", "60"])  # fmt: skip
    assert result.exit_code == 2 and "drop --profile, --stop-after" in result.stderr


def test_check_refuses_a_missing_wrong_or_needless_init_before_training(
    registry_file: Path, tmp_path: Path
) -> None:
    """A build trained from ``--init`` weights rebuilds only from the same file: `--check`
    reads the pinned manifest in the release store (else the cache) and refuses before anything
    trains."""
    from conftest import make_build_dir

    from zoo.build import run as builder
    from zoo.catalog import manifest
    from zoo.store.hashing import sha256_file

    init, other = tmp_path / "init.safetensors", tmp_path / "other.safetensors"
    init.write_bytes(b"the weights it started from")
    other.write_bytes(b"other weights")
    started = make_build_dir(tmp_path / "started")
    document = manifest.read(started)
    document["recipe"]["config"]["init"] = {"file": init.name, "sha256": sha256_file(init)}
    manifest.write(started, document)
    with_init = zoo.publish(started)
    plain = zoo.publish(make_build_dir(tmp_path / "plain", seed=1))
    for build, given, message in [
        (with_init, None, f"trained from --init weights {sha256_file(init)}"),
        (with_init, other, f"not from {other}"),
        (plain, init, "trained from its own initialisation"),
    ]:
        with pytest.raises(BuildError, match=message):
            builder.check(f"{VARIANT}@{build.revision[:12]}", init=given, out_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()
    # Pulled where no hub has its files: not rebuilt for hours to fail the compare at the end.
    store = ReleaseStore.beside(registry_file)
    ref = f"{VARIANT}@{with_init.revision[:12]}"
    zoo.pull(ref, role="client")  # the manifest is cached now
    store.blob(with_init.file("server").sha256).unlink()
    with pytest.raises(BuildError, match="trained from --init weights"):
        zoo.pull(ref, build_missing=True)
    # Its manifest gone from the release store too (a yanked build, pruned): the cache's copy.
    store.blob(with_init.file("manifest").sha256).unlink()
    with pytest.raises(BuildError, match="trained from --init weights"):
        builder.check(ref, out_dir=tmp_path / "o")


def test_sigpipe_is_ignored_again_from_any_thread() -> None:
    """concrete's runtime installs an aborting SIGPIPE handler; a web app's worker thread that
    ran a circuit must be able to put SIG_IGN back (Python's signal.signal cannot there)."""
    import ctypes
    import signal
    import threading

    from zoo.fhe import sigpipe

    libc = ctypes.CDLL(None)
    libc.signal.argtypes = (ctypes.c_int, ctypes.c_void_p)
    libc.signal(signal.SIGPIPE, int(signal.SIG_DFL))  # as concrete leaves it: not ignored
    try:
        assert not sigpipe.ignored()
        thread = threading.Thread(target=sigpipe.restore)
        thread.start()
        thread.join()
        assert sigpipe.ignored()
    finally:
        sigpipe.restore()


def test_a_tilde_in_the_environment_is_the_home_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a systemd unit or a .env file passes it, unexpanded: not a folder named ``~``."""
    monkeypatch.setenv("HOME", str(tmp_path))
    for name, get in [("ZOO_HOME", config.zoo_home), ("ZOO_DATA_DIR", config.data_dir),
                      ("ZOO_REGISTRY", config.registry_path),
                      ("ZOO_RELEASES", config.releases_dir)]:  # fmt: skip
        monkeypatch.setenv(name, "~/x")
        assert get() == tmp_path / "x"
