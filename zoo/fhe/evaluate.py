"""``zoo eval``: accuracy of a build on the CIFAR-10 test set, simulated or in real FHE.

Every image's result is appended to a results file (JSON lines) as soon as it is known, so a
long real-FHE evaluation can be killed and continued with ``resume=True``::

    {"run": {"variant": ..., "revision": ..., "fhe": "execute", "indices": [...]}}
    {"index": 17, "label": 3, "simulate": [...10 logits], "execute": [...], "seconds": 71.2,
     "machine": {"cpu_model": ..., "isa": "avx512", "cpu_count": 2, ...}, "cpu_steal": 0.0,
     "cpu_others": 0.0}
    ...
    {"summary": {"execute_top1": ..., "agreement_with_simulation": ..., ...}}

Each real-FHE record names the machine it ran on, so a sample continued on another machine
keeps its seconds apart: the summary's ``execute_seconds_per_image`` is that of the machine in
its ``machine`` (this one, when it ran images of the sample), and ``execute_seconds_by_machine``
lists every machine. Records written before records named their machine take the machine of
the summary that closed their run. ``cpu_steal`` is the share of CPU time the hypervisor gave to
other guests while the image ran here (``machine.steal``), ``cpu_others`` the share that other
processes of this machine used (``machine.others``; both None on Ray): a time measured while
either was high is not the machine's; the summary gives the largest as ``cpu_steal_max`` and
``cpu_others_max``.
Images run by Ray's local workers side by side say how many shared the machine (``parallel``):
they count for accuracy, and their seconds are kept apart from those of images run alone.

Real FHE also runs the simulation of each image and reports their agreement image by image:
the measurement no reference published. ``backend="ray"`` spreads the encrypted runs over a Ray
cluster (:mod:`zoo.fhe.cluster`); encryption and decryption stay here, with the secret key.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from zoo import api, config
from zoo.api import DEFAULT_FHE, check_fhe_mode
from zoo.build.data import fingerprint, load_split
from zoo.catalog import registry as reg
from zoo.cost import model as cost
from zoo.cost.machine import alone, cpu, cpu_ticks, others, steal
from zoo.errors import InputError
from zoo.fhe import cluster, runtime, sigpipe

log = logging.getLogger(__name__)

KEY_TIMINGS = ("keygen_seconds", "keys_load_seconds", "keygen_cpu_others")
#: Images simulated per results-file append (simulation is cheap; real FHE appends per image).
SIMULATE_CHUNK = 50


def topk(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of rows whose label is among the k largest logits."""
    order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return float((order == labels[:, None]).any(axis=1).mean())


def sample_indices(n_total: int, n: int, seed: int | None) -> np.ndarray:
    """The first ``n`` test images, or (with a seed) ``n`` drawn without replacement, sorted."""
    if not 1 <= n <= n_total:
        raise InputError(f"-n must be between 1 and {n_total}, got {n}")
    if seed is None:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n_total, size=n, replace=False))


def sample_name(seed: int | None, done: int, drawn: int) -> str:
    """``first`` / ``seed S``, plus ``(D of N done)`` while a sample is evaluated in pieces."""
    name = "first" if seed is None else f"seed {seed}"
    return name if done == drawn else f"{name} ({done} of {drawn} done)"


def default_results_path(variant: str, revision: str, fhe: str, n: int, seed: int | None) -> Path:
    """``$ZOO_HOME/results/VARIANT@REV12/FHE-nN-(first|seedS).jsonl``."""
    sample = "first" if seed is None else f"seed{seed}"
    folder = config.zoo_home() / "results" / f"{variant}@{revision[:12]}"
    return folder / f"{fhe}-n{n}-{sample}.jsonl"


def parse_results(text: str) -> tuple[dict[str, Any] | None, dict[int, dict[str, Any]]]:
    """(run header, image records by index) of a results file; a torn last line is ignored.

    A real-FHE record without ``machine`` (files from before records had one) takes that of
    the next summary: the summary its run wrote when it ended, on the same machine. A record
    with ``machine`` before that summary means the older run ended without one: its records'
    machine stays unknown.
    """
    header, records, unnamed = None, {}, []
    for line in text.splitlines():
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            continue  # the write that was interrupted
        if not isinstance(item, dict):
            continue  # not one of ours: the header check refuses such a file
        if "run" in item:
            header = item["run"]
        elif "index" in item:
            records[item["index"] if type(item["index"]) is int else repr(item["index"])] = item
            if "execute" in item and "machine" not in item:
                unnamed.append(item)
            elif "machine" in item:
                unnamed = []
        elif isinstance(item.get("summary"), dict) and unnamed:
            for record in unnamed:
                record["machine"] = item["summary"].get("machine")
            unnamed = []
    return header, records


def _bad_record(record: dict[str, Any], fhe: str, indices: set[int], width: int | None) -> bool:
    """Whether ``record`` is not one that a run of mode ``fhe`` on ``indices`` writes
    (``width``: the length of its logits, once a record has shown it)."""
    modes = ["simulate", "execute"] if fhe == "execute" else [fhe]
    rows = [record.get(mode) for mode in modes]
    return not (
        type(record["index"]) is int and record["index"] in indices
        and type(record.get("label")) is int
        and all(isinstance(row, list) and len(row) == (width or len(rows[0])) for row in rows)
        and all(type(v) in (int, float) for row in rows for v in row)
    )  # fmt: skip


class _ResultsFile:
    """Append-only JSON lines, flushed and synced after every record."""

    HEAD = '{"run": '  # how the file starts (json.dumps of the header)

    def __init__(self, path: Path, header: dict[str, Any], resume: bool) -> None:
        self.path = path
        if path.is_dir():
            raise InputError(f"--results {path} is a folder", hint="name a file in it")
        text = path.read_bytes().decode(errors="replace") if path.exists() else ""
        torn = "\n" not in text and (text.startswith(self.HEAD) or self.HEAD.startswith(text))
        found, self.done = parse_results(text)
        if found is None and not torn:  # someone else's file: never truncated
            raise InputError(
                f"{path} is not a results file of zoo eval (it has no run header)",
                hint="pass --results to write another file, or remove this one",
            )
        if found is not None:
            if not resume:
                raise InputError(
                    f"results file {path} exists",
                    hint="pass --resume to continue it, or --results to write another file",
                )
            if found != header:
                raise InputError(
                    f"results file {path} belongs to another run (build, mode or images differ)",
                    hint="pass --results to write another file, or remove this one",
                )
            width, indices = None, set(header["indices"])
            for record in self.done.values():
                if _bad_record(record, header["fhe"], indices, width):
                    raise InputError(
                        f"results file {path}: the record of image {record['index']!r} is not "
                        "one this run writes",
                        hint="remove its line (or the file) to run that image again",
                    )
                width = len(record[header["fhe"]])
        path.parent.mkdir(parents=True, exist_ok=True)
        # decrypted logits: readable by their owner only, like the keys
        mode = os.O_APPEND if found is not None else os.O_TRUNC
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | mode, 0o600)
        os.chmod(path, 0o600)
        self._handle = os.fdopen(fd, "a" if found is not None else "w")
        if found is None:
            self.append({"run": header})
        elif not text.endswith("\n"):
            self._handle.write("\n")  # the interrupted write left a torn line: start afresh

    def append(self, item: dict[str, Any]) -> None:
        self._handle.write(json.dumps(item, sort_keys=True) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()


def _rows(logits: np.ndarray) -> list[list[float]]:
    return [[round(float(v), 6) for v in row] for row in logits]


def seconds_by_machine(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Real-FHE seconds per image on each machine that ran some of ``records``, most images
    first: ``[{"machine": {...} or None, "n_images": n, "seconds_per_image": s}]``. Images
    that shared the machine with others make rows of their own, marked ``parallel`` (> 1 in
    their record: Ray workers on one host) or ``disturbed`` (other processes took more than
    :data:`~zoo.cost.machine.BUSY` of the CPU): their seconds are not one image's alone. Each
    row also gives its slowest image (``max_seconds``): a per-image budget is about that one."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        key = [record.get("machine"), record.get("parallel", 1), _disturbed(record)]
        groups.setdefault(json.dumps(key, sort_keys=True), []).append(record)
    rows = []
    for group in groups.values():
        shared = group[0].get("parallel", 1)
        rows.append({
            "machine": group[0].get("machine"),
            **({"parallel": shared} if shared > 1 else {}),
            **({"disturbed": True} if _disturbed(group[0]) else {}),
            "n_images": len(group),
            "seconds_per_image": round(float(np.mean([r["seconds"] for r in group])), 3),
            "max_seconds": round(max(r["seconds"] for r in group), 3),
        })  # fmt: skip
    return sorted(rows, key=lambda row: -row["n_images"])


def summarize(
    records: list[dict[str, Any]], fhe: str, machine: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Top-1/2/3 of simulation (and real FHE), agreement, and seconds per image: on
    ``machine`` if it ran some of the images, else on the machine that ran the most (named as
    ``machine`` in the summary). ``records`` holds at least one image."""
    records = sorted(records, key=lambda r: r["index"])
    labels = np.array([r["label"] for r in records])
    summary: dict[str, Any] = {"n_images": len(records)}
    if fhe == "disable":
        clear = np.array([r["disable"] for r in records])
        return {**summary, **{f"disable_top{k}": topk(clear, labels, k) for k in (1, 2, 3)}}
    simulated = np.array([r["simulate"] for r in records])
    for k in (1, 2, 3):
        summary[f"simulate_top{k}"] = topk(simulated, labels, k)
    if fhe == "execute":
        executed = np.array([r["execute"] for r in records])
        for k in (1, 2, 3):
            summary[f"execute_top{k}"] = topk(executed, labels, k)
        agree = executed.argmax(1) == simulated.argmax(1)
        by_machine = seconds_by_machine(records)
        alone_rows = [row for row in by_machine if not {"parallel", "disturbed"} & row.keys()]
        candidates = alone_rows or by_machine
        timed = next((row for row in candidates if row["machine"] == machine), candidates[0])
        if not alone_rows:  # said beside the seconds, so that nobody takes them as clean
            summary["execute_timing_conditions"] = _conditions(timed, records)
        summary.update(
            agreement_with_simulation=float(agree.mean()),
            disagreeing_indices=[r["index"] for r, a in zip(records, agree) if not a],
            execute_seconds_per_image=timed["seconds_per_image"],
            execute_max_seconds_per_image=timed["max_seconds"],
            execute_timed_images=timed["n_images"],
            machine=timed["machine"],
            execute_seconds_by_machine=by_machine,
            cpu_steal_max=_largest(records, "cpu_steal"),
            cpu_others_max=_largest(records, "cpu_others"),
            predictions=[int(i) for i in executed.argmax(1)],
            labels=[int(i) for i in labels],
        )
    return summary


def _disturbed(record: dict[str, Any]) -> bool:
    """Whether other processes (or other guests) took more than BUSY of the CPU meanwhile."""
    return not (alone(record.get("cpu_others")) and alone(record.get("cpu_steal")))


def _conditions(row: dict[str, Any], records: list[dict[str, Any]]) -> str:
    """Why the seconds per image of ``row`` are not one image's on a quiet machine."""
    if "parallel" in row:
        return (f"{row['n_images']} image(s) timed {row['parallel']} at a time on one machine "
                "(Ray workers sharing its cores): not one image's time alone")  # fmt: skip
    busiest = max(_largest(records, "cpu_others") or 0, _largest(records, "cpu_steal") or 0)
    return (f"{row['n_images']} image(s) timed while other processes took up to {busiest:.0%} of "
            "the CPU: not a clean timing")  # fmt: skip


def _largest(records: list[dict[str, Any]], key: str) -> float | None:
    """The largest ``key`` of the records that have one; None where none has."""
    return max((r[key] for r in records if r.get(key) is not None), default=None)


def evaluate(
    ref: str,
    *,
    fhe: str = DEFAULT_FHE,
    n_images: int = 100,
    seed: int | None = None,
    data_dir: Path | None = None,
    registry_path: Path | None = None,
    results: Path | None = None,
    resume: bool = False,
    backend: str = "local",
    address: str | None = None,
    workers: int | None = None,
    progress: bool = False,
    record: bool = False,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Top-1/2/3 of ``ref`` on its dataset's test images (the first ``n_images``, or a seeded
    sample).

    Results go to ``results`` (default :func:`default_results_path`); with ``resume`` the images
    already there are not run again. Returns the summary, also appended to the results file.
    With ``record`` (real FHE only), the summary also goes into the build's registry metrics
    (``fhe_execute_*``), where `zoo list` and `zoo info` show it. ``stop_after`` runs at most
    that many new images (a long evaluation in pieces, with ``resume``); the summary then
    covers the images done so far and says so in ``sample``.
    """
    from tqdm.auto import tqdm

    check_fhe_mode(fhe)
    if backend not in ("local", "ray"):
        raise InputError(f"unknown backend {backend!r}", hint="use 'local' or 'ray'")
    if record and fhe != "execute":
        raise InputError("--record keeps real-FHE results", hint="add --fhe execute")
    if n_images < 1:
        raise InputError(f"-n must be at least 1, got {n_images}")
    if stop_after is not None and stop_after < 0:
        raise InputError(f"--stop-after must be >= 0, got {stop_after}")
    if seed is not None and seed < 0:
        raise InputError(f"--seed must be >= 0, got {seed}")
    if workers is not None and workers < 1:
        raise InputError(f"--workers must be at least 1, got {workers}")
    # --stop-after 0 runs no image, only summarizes: no circuit to load (VGG11's compiles minutes)
    model = runtime.load(ref, registry_path=registry_path,
                         circuits=fhe != "disable" and stop_after != 0)  # fmt: skip
    dataset = reg.load(registry_path).variant(model.build.variant).dataset
    images, labels = load_split(Path(data_dir or config.data_dir()), dataset, "test")
    indices = sample_indices(len(labels), n_images, seed)
    build = model.build
    header = {
        "variant": build.variant,
        "revision": build.revision,
        "fhe": fhe,
        "test_set": fingerprint(images, labels),
        "indices": [int(i) for i in indices],
    }
    path = (
        Path(results)
        if results
        else default_results_path(build.variant, build.revision, fhe, n_images, seed)
    )
    # where the circuit runs: this machine, unless Ray runs it on a cluster it joins
    joins = backend == "ray" and cluster.cluster_address(address) is not None
    machine = None if joins else cpu()
    if stop_after == 0 and not (resume and path.exists()):
        raise InputError(
            f"--stop-after 0 runs no image: it only summarizes a results file, and {path} is not "
            "one to resume",
            hint="add --resume (and --results FILE if an earlier run wrote elsewhere), or drop "
            "--stop-after",
        )
    out = _ResultsFile(path, header, resume)
    pending = [int(i) for i in indices if int(i) not in out.done]
    if stop_after is not None:
        pending = pending[:stop_after]
    estimate = cost.estimate_seconds(model.meta.get("circuit", {}))
    if progress and fhe == "execute" and estimate and pending:
        parallel = max(1, workers or 1) if backend == "ray" else 1
        hours = estimate * len(pending) / parallel / 3600
        log.info("cost model: ~%s s per image, ~%.2f h for %d images; the bar's ETA takes "
                 "over after the first", f"{estimate:,.0f}", hours, len(pending))  # fmt: skip
    started = time.perf_counter()
    bar = tqdm(total=len(indices), initial=len(out.done), disable=not progress,
               desc=f"{fhe} {build.variant}", unit="img")  # fmt: skip
    try:
        records = (
            _in_the_clear(model, images, labels, pending, fhe)
            if fhe != "execute"
            else _executed(model, images, labels, pending, backend, address, workers, machine)
        )
        ran = 0
        for item in records:
            out.append(item)
            out.done[item["index"]] = item
            ran += 1
            bar.update(1)
        if not out.done:
            raise InputError(f"no image of this sample is evaluated yet ({path})",
                             hint="run without --stop-after 0")  # fmt: skip
        summary = {
            "variant": build.variant,
            "revision": build.revision,
            "fhe": fhe,
            "backend": backend,
            "sample": sample_name(seed, len(out.done), len(indices)),
            **summarize(list(out.done.values()), fhe, machine),
            **{k: round(v, 3) for k in KEY_TIMINGS if (v := model.timings.get(k)) is not None},
            "this_run_images": ran,
            "this_run_seconds": round(time.perf_counter() - started, 3),
        }
        out.append({"summary": summary})
    finally:
        bar.close()
        out.close()
    summary["results"] = str(path)
    if record:
        api.record_metrics(build.ref, registry_metrics(summary), registry_path=registry_path)
    return summary


def registry_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    """The registry's ``fhe_execute_*`` metrics from a real-FHE evaluation summary (plus the
    keygen time, when this run generated the keys with nothing else running)."""
    machine = summary.get("machine")
    return {
        **runtime.keygen_metrics(summary.get("keygen_seconds"), summary.get("keygen_cpu_others")),
        "fhe_execute_top1": summary["execute_top1"],
        "fhe_execute_top2": summary["execute_top2"],
        "fhe_execute_top3": summary["execute_top3"],
        "fhe_execute_agreement": summary["agreement_with_simulation"],
        "fhe_execute_n_images": summary["n_images"],
        "fhe_execute_seconds_per_image": summary["execute_seconds_per_image"],
        "fhe_execute_max_seconds_per_image": summary["execute_max_seconds_per_image"],
        "fhe_execute_timed_images": summary.get("execute_timed_images"),
        "fhe_execute_sample": summary["sample"],
        "fhe_execute_machine": cost.describe_machine(machine) if machine else None,
        "fhe_execute_conditions": summary.get("execute_timing_conditions"),
        "fhe_execute_other_machines": other_machines(summary),
    }


def other_machines(summary: dict[str, Any]) -> str | None:
    """The sample's images timed alone on other machines than the summary's, as one line
    (``5 on AMD EPYC (family 25 model 17), avx512, 2 cores: 1,410 s per image, the slowest
    1,458``), or None: a sample continued on another machine keeps every image's budget in
    sight."""
    lines = []
    for row in summary.get("execute_seconds_by_machine", []):
        if row["machine"] == summary.get("machine") or {"parallel", "disturbed"} & row.keys():
            continue
        where = cost.describe_machine(row["machine"]) if row["machine"] else "an unrecorded machine"
        lines.append(f"{row['n_images']} on {where}: {row['seconds_per_image']:,.0f} s per image, "
                     f"the slowest {row['max_seconds']:,.0f}")  # fmt: skip
    return "; ".join(lines) or None


def _in_the_clear(
    model: runtime.Model, images: np.ndarray, labels: np.ndarray, pending: list[int], fhe: str
) -> Iterator[dict[str, Any]]:
    """Records of the clear model (``disable``) or the simulated circuit, a chunk at a time."""
    for start in range(0, len(pending), SIMULATE_CHUNK):
        chunk = pending[start : start + SIMULATE_CHUNK]
        logits = model.logits(images[chunk], fhe)
        for index, row in zip(chunk, _rows(logits)):
            yield {"index": index, "label": int(labels[index]), fhe: row}


def _executed(
    model: runtime.Model,
    images: np.ndarray,
    labels: np.ndarray,
    pending: list[int],
    backend: str,
    address: str | None,
    workers: int | None,
    machine: dict[str, Any] | None,
) -> Iterator[dict[str, Any]]:
    """Encrypt here, run the circuit locally or on Ray, decrypt here; yield as results come
    (each record names ``machine``, where the circuit ran)."""
    if not pending:
        return
    inputs = model.head(images[pending])
    simulated = dict(zip(pending, _rows(model.logits(images[pending], "simulate"))))
    # up to this many circuits run at once on this machine: Ray's local workers share its cores
    at_once = (
        min(len(pending), workers or os.cpu_count() or 1) if backend == "ray" and machine else 1
    )
    parallel = {"parallel": at_once} if at_once > 1 else {}

    def record(index: int, result: bytes, seconds: float, shares: dict[str, Any]) -> dict[str, Any]:
        logits = model.client.deserialize_decrypt_dequantize(result)
        return {"index": index, "label": int(labels[index]), "simulate": simulated[index],
                "execute": _rows(logits)[0], "seconds": round(seconds, 3),
                "machine": machine, **shares, **parallel}  # fmt: skip

    model.ensure_keys()
    keys = model.client.get_serialized_evaluation_keys()
    ciphertexts = (
        (index, model.client.quantize_encrypt_serialize(inputs[i : i + 1]))
        for i, index in enumerate(pending)
    )
    if backend == "ray":
        for index, result, seconds in cluster.run(
            model.path, keys, ciphertexts, runtime=model.build.runtime, address=address,
            workers=workers,
        ):  # fmt: skip
            yield record(index, result, seconds, {"cpu_steal": None, "cpu_others": None})
        return
    for index, ciphertext in ciphertexts:
        start, ticks = time.perf_counter(), cpu_ticks()
        try:
            result = model.server.run(ciphertext, keys)
        finally:
            sigpipe.restore()
        seconds = time.perf_counter() - start
        after = cpu_ticks()
        shares = {"cpu_steal": steal(ticks, after), "cpu_others": others(ticks, after)}
        yield record(index, result, seconds, shares)
