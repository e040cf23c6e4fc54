"""The ``zoo`` command: a thin click layer over :mod:`zoo.api` that parses and prints.

Every command takes ``--json``. Failures print one line and a hint, and exit with the error's
code: 1 generic, 2 usage, 3 not found / bad registry, 4 integrity, 5 runtime mismatch,
6 offline and missing, 7 hub error, 8 build failed, 9 `zoo serve` refused, 10 build paused at a
checkpoint as asked.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from zoo import api
from zoo.build import kernels
from zoo.cost import model as cost
from zoo.cost.machine import alone
from zoo.errors import BuildPaused, ZooError
from zoo.store.atomic import writable

REGISTRY = click.option(
    "--registry",
    "registry_path",
    type=click.Path(path_type=Path),
    default=None,
    help="registry file (default: $ZOO_REGISTRY or the project's registry.json)",
)
JSON = click.option("--json", "as_json", is_flag=True, help="print JSON instead of text")
FHE = click.option(
    "--fhe",
    type=click.Choice(api.FHE_MODES),
    default=api.DEFAULT_FHE,
    help="disable: the clear model; simulate: the circuit without encryption; execute: real FHE",
)
#: Disk full, quota, read-only or forbidden: the user's to fix, so one line and a hint.
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def _size(n: int | None) -> str:
    """Bytes in binary units: ``255MiB``."""
    if n is None:
        return "-"
    from tqdm import tqdm

    text = tqdm.format_sizeof(n, suffix="B", divisor=1024)
    return text if text[-2:-1].isdigit() else text[:-1] + "iB"


def _num(x: Any, fmt: str = "{:.4f}") -> str:
    return "-" if x is None else fmt.format(x)


def _emit(as_json: bool, data: Any, text: Callable[[], str]) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str) if as_json else text())


def handles_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn ZooError into one line + hint on stderr (or JSON) and the error's exit code."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except ZooError as exc:
            if kwargs.get("as_json"):
                payload = {"error": str(exc), "hint": exc.hint, "type": type(exc).__name__}
                click.echo(json.dumps(payload, indent=2))
            else:
                click.echo(f"error: {exc}", err=True)
                if exc.hint:
                    click.echo(f"hint: {exc.hint}", err=True)
            sys.exit(exc.exit_code)
        except OSError as exc:
            if exc.errno not in DISK_ERRNOS:
                raise
            where = f" ({exc.filename})" if exc.filename else ""
            click.echo(f"error: {exc.strerror}{where}", err=True)
            hint = ("free disk space or make $ZOO_HOME (or the file named) writable, then run "
                    "the command again; nothing half-written was kept")  # fmt: skip
            click.echo(f"hint: {hint}", err=True)
            sys.exit(1)

    return wrapper


def complete_ref(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    """Shell completion of ``VARIANT`` and ``VARIANT@REV`` from the registry (nothing on error)."""
    from zoo.catalog import registry as reg

    try:
        variants = reg.load(ctx.params.get("registry_path")).variants.values()
    except ZooError:
        return []
    names = [v.name for v in variants]
    if "@" in incomplete:
        names += [f"{v.name}@{b.revision[:12]}" for v in variants for b in v.live]
    return sorted(n for n in names if n.startswith(incomplete))


REF = click.argument("ref", shell_complete=complete_ref)


class _Stderr(logging.StreamHandler):
    """A handler that writes to the current ``sys.stderr`` (which click's test runner swaps)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def setup_logging(level: int) -> None:
    """Show the ``zoo`` loggers' messages at ``level`` and above on stderr, once per process."""
    logger = logging.getLogger("zoo")
    logger.setLevel(level)
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)


class _Group(click.Group):
    """The command group; its exit status survives concrete's exit hook (zoo.fhe.exit_status)."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        from zoo.fhe import exit_status

        try:
            return super().main(*args, **kwargs)
        except SystemExit as done:
            exit_status.keep(done.code)
            raise
        except BaseException:  # a traceback: status 1
            exit_status.keep(1)
            raise


@click.group(
    cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "show_default": True}
)
@click.version_option(package_name="concrete-zoo")
@click.option("-v", "--verbose", is_flag=True, help="debug messages too")
@click.option("-q", "--quiet", is_flag=True, help="warnings and errors only")
def main(verbose: bool, quiet: bool) -> None:
    """zoo: a model zoo for encrypted (FHE) CIFAR inference with Concrete ML.

    Shell completion (variant names too): eval "$(_ZOO_COMPLETE=bash_source zoo)" in ~/.bashrc
    (zsh_source / fish_source for zsh and fish).
    """
    setup_logging(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    # The clear head of predict/eval/serve then runs on the kernels its build measured with
    # (zoo build pins them too): a float rounding apart would move a quantization boundary.
    kernels.pin()


@main.command("list")
@REGISTRY
@JSON
@handles_errors
def list_cmd(registry_path: Path | None, as_json: bool) -> None:
    """List the variants with accuracy, bit width and estimated FHE cost."""
    rows = api.list_variants(registry_path)

    def text() -> str:
        from tabulate import tabulate

        table = [
            [
                r["variant"],
                r["dataset"],
                r["profile"] or "-",
                _num(r["clear_top1"]),
                _num(r["fhe_simulation_top1"]),
                _num(r["fhe_execute_top1"]),
                r["max_bit_width"] or "-",
                ("≥" if r["est_fhe_lower_bound"] else "")
                + _num(r["est_fhe_seconds"], "{:.1f}")
                + ("†" if r["est_other_machine"] and r["est_fhe_seconds"] is not None else ""),
                _keys(r["eval_key_bytes_serialized"], r["eval_key_bytes"]),
                r["builds"] or ("yanked" if r["yanked"] else "no"),
            ]
            for r in rows
        ]
        headers = ["variant", "data", "profile", "top1 clear", "top1 sim", "top1 FHE",
                   "max bits", "est. s/img", "eval keys", "builds"]  # fmt: skip
        other = sorted({r["est_other_machine"] for r in rows if r["est_other_machine"]})
        footer = "\neval keys: serialized, what a client uploads (* concrete's in-memory figure)"
        footer += (f"\nwarning: † est. s/img from calibration points of another kind of machine "
                   f"({'; '.join(other)}); calibrate this one with `zoo bench pbs`"
                   ) if other else ""  # fmt: skip
        return tabulate(table, headers=headers) + footer

    _emit(as_json, rows, text)


def _keys(serialized: int | None, in_memory: int | None) -> str:
    """Serialized evaluation-key size, else concrete's in-memory figure marked with ``*``."""
    return _size(serialized) if serialized else f"{_size(in_memory)}*" if in_memory else "-"


def _cost_lines(estimate: dict[str, Any] | None) -> list[str]:
    """Per parameter set: an FHE time estimate's terms, and where its calibration is from."""
    if not estimate:
        return []
    calibration = estimate.get("calibration")
    if calibration:
        where = (f"{calibration['source']} calibration: {cost.describe_machine(calibration)}, "
                 f"{calibration['created']}, "
                 f"concrete-python {calibration['concrete-python']}")  # fmt: skip
        lines = [f"cost model: {calibration['formula']} per PBS; {where}"]
        if calibration.get("note"):
            lines.append(f"  note: {calibration['note']}")
        if calibration.get("stale"):
            lines.append(f"  warning: this calibration was {calibration['stale']}")
        if calibration.get("other_machine"):
            lines.append(f"  warning: another kind of machine: {calibration['other_machine']}; "
                         "calibrate this one with `zoo bench pbs`")  # fmt: skip
        lines += [f"  ignored {i['path']}: {i['reason']}" for i in calibration.get("ignored", [])]
    else:
        lines = ["cost model: per-bit-width table (no per-parameter PBS counts in this build)"]
    if estimate.get("lower_bound"):
        lines.append(
            "  warning: WoP-PBS circuit (lookups of 11+ bits) priced as classic PBS, "
            "which a WoP lookup costs many times: a lower bound; calibrate with "
            "`zoo bench pbs --wop`"
        )
    elif estimate["method"] == "wop" and calibration:
        lines.append(
            f"  WoP-PBS circuit (lookups of 11+ bits): {calibration['wop_formula']} "
            f"per lookup; max |error| {calibration['wop_max_abs_relative_error']:.0%} "
            "on the bench's WoP circuits"
        )
        if calibration.get("wop_other_machine"):
            lines.append(f"  warning: WoP points from another kind of machine: "
                         f"{calibration['wop_other_machine']}; calibrate this one with "
                         "`zoo bench pbs --add-wop`")  # fmt: skip
    for row in estimate["rows"]:
        if row.get("key_switch"):
            lines.append(
                f"  {row['count']:>9,} KS  x {row['seconds_each'] * 1e3:9.2f} ms = "
                f"{row['seconds']:10.1f} s  key switches ({calibration['ks_formula']})"
            )
            continue
        if row.get("linear"):
            lines.append(f"  {row['work']:>9.3g} word-ops        = {row['seconds']:10.1f} s  "
                         f"linear work ({calibration['linear_formula']})")  # fmt: skip
            continue
        if "parameter" not in row:  # the per-bit-width table
            what = f"{row['bit_width']}-bit"
        elif "bit_width" in row:
            what = f"{row['bit_width']}-bit WoP lookup, {cost.describe(row['parameter'])}"
        else:
            what = cost.describe(row["parameter"])
        lines.append(f"  {row['count']:>9,} PBS x {row['seconds_each'] * 1e3:9.2f} ms = "
                     f"{row['seconds']:10.1f} s  {what}")  # fmt: skip
    if estimate.get("overhead_seconds"):
        lines.append(f"  + {estimate['overhead_seconds']:.3f} s fixed per run")
    return lines


def _recompiled_lines(recompiled: list[dict[str, Any]]) -> list[str]:
    """One line per variant that compiles these weights again, with what its build measured."""
    lines = []
    for other in recompiled:
        how = ", ".join(f"{k} {v}" for k, v in other["compile"].items())
        m = other["metrics"]
        if other["revision"] is None:
            measured = "no build yet"
        else:
            measured = f"FHE-sim top-1 {_num(m.get('fhe_simulation_top1'))}"
            if m.get("n_test_images"):
                measured += f" on {m['n_test_images']:,} images"
            n = m.get("fhe_execute_n_images")
            if n:
                timed = m.get("fhe_execute_timed_images") or n
                measured += (f"; real FHE top-1 {m['fhe_execute_top1']:.4f} on {n} images, "
                             f"{m['fhe_execute_seconds_per_image']:,.0f} s per image")  # fmt: skip
                if m.get("fhe_execute_machine"):
                    measured += f" on {m['fhe_execute_machine']}"
                measured += f" (the {timed} timed alone there)" if timed != n else ""
                if m.get("fhe_execute_max_seconds_per_image") and timed > 1:
                    measured += f", the slowest {m['fhe_execute_max_seconds_per_image']:,.0f} s"
                if m.get("fhe_execute_other_machines"):
                    measured += f"; also timed {m['fhe_execute_other_machines']}"
        lines.append(f"recompiled as {other['variant']} (the weights of {other['compile_from']}, "
                     f"{how}): {measured}")  # fmt: skip
    return lines


@main.command()
@REF
@REGISTRY
@JSON
@handles_errors
def info(ref: str, registry_path: Path | None, as_json: bool) -> None:
    """Show a variant's metadata and what pulling it costs (before any download)."""
    data = api.info(ref, registry_path)

    def text() -> str:
        lines = [f"{data['variant']}: {data['summary']}", f"dataset: {data['dataset']}"]
        lines.append(f"recipe: {data['recipe']['module']} {json.dumps(data['recipe']['params'])}")
        ref_metrics = data["reference"]["metrics"]
        lines.append(f"reference ({data['reference']['source']}): {json.dumps(ref_metrics)}")
        for build in data["builds"]:
            hubs = ", ".join(f"{h['kind']}:{h['repo']}" for h in build["hubs"])
            where = f"on {hubs} + releases" if hubs else "in releases"
            if build.get("yanked"):
                where = f"YANKED: {build['yanked']}"
            clear = build["metrics"].get("clear_top1")
            lines.append(f"build {build['revision'][:12]} [{build['profile']}] {where}; "
                         f"clear top-1 {_num(clear)}")  # fmt: skip
        resolved = data.get("resolved")
        if resolved:
            sizes = resolved["download_bytes"]
            lines.append(f"pull would take {resolved['revision'][:12]}:")
            lines.extend(f"  {what}: {value}" for what, value in resolved["fhe_truth"])
            if resolved.get("client_computes"):
                lines.append(f"  the client computes in the clear: {resolved['client_computes']}")
            lines.append(
                f"  download {_size(sizes['client'])} (client) / {_size(sizes['server'])} "
                f"(server) / {_size(sizes['all'])} (all); cached: "
                f"{'yes' if resolved['cached'] else 'no'}\n"
                f"  est. {_num(resolved['est_fhe_seconds_per_image'], '{:.1f}')} s per image in "
                "real FHE here"
            )
            lines.extend(_cost_lines(resolved.get("cost")))
        elif data.get("resolve_error"):
            lines.append(f"no build for this runtime: {data['resolve_error']}")
        else:
            lines.append("not published yet: build it with `zoo build " + data["variant"] + "`")
        lines.extend(_recompiled_lines(data["recompiled_as"]))
        return "\n".join(lines)

    _emit(as_json, data, text)


@main.command()
@REF
@click.option("--role", type=click.Choice(["client", "server", "all"]), default="all")
@click.option("--offline", is_flag=True, default=None, help="cache only (also ZOO_OFFLINE=1)")
@click.option("--endpoint", default=None, help="Hugging Face protocol endpoint (ZOO_HF_ENDPOINT)")
@click.option("--hub-dir", type=click.Path(path_type=Path), default=None, help="local hub folder")
@click.option("--build-missing", is_flag=True, help="rebuild from the recipe if no hub has it")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="CIFAR data for --build-missing (default $ZOO_DATA_DIR)")  # fmt: skip
@REGISTRY
@JSON
@handles_errors
def pull(
    ref: str,
    role: str,
    offline: bool | None,
    endpoint: str | None,
    hub_dir: Path | None,
    build_missing: bool,
    data_dir: Path | None,
    registry_path: Path | None,
    as_json: bool,
) -> None:
    """Pull a build (VARIANT or VARIANT@REVISION) into the cache, each file verified as it enters
    (a warm pull checks sizes; `zoo verify` rehashes)."""
    result = api.pull(
        ref,
        role=role,
        offline=offline,
        registry_path=registry_path,
        endpoint=endpoint,
        hub_dir=hub_dir,
        progress=not as_json and sys.stderr.isatty(),
        build_missing=build_missing,
        data_dir=data_dir,
    )
    data = {
        "variant": result.build.variant,
        "revision": result.build.revision,
        "role": role,
        "path": str(result.path),
        "downloaded": result.downloaded,
        "downloaded_bytes": result.downloaded_bytes,
        "source": result.source,
        "files": {k: str(v) for k, v in result.files.items()},
    }
    verb = "cached"
    if result.downloaded:
        verb = f"downloaded {_size(result.downloaded_bytes)}, verified"
    if result.source == "rebuild":
        verb = f"rebuilt from its recipe: all {len(result.downloaded)} files match their pins"
    _emit(as_json, data, lambda: f"{result.build.variant}@{result.build.revision[:12]} ({verb}): "
          f"{result.path}")  # fmt: skip


# fmt: off
@main.command("build")
@click.argument("variant", shell_complete=complete_ref)
@click.option("--profile",
              type=click.Choice(["fast", "distill", "distill-long", "finetune", "long", "full",
                                 "quick", "smoke"]),
              default="quick", help="long: for a GPU, in pieces (--stop-after); fast: "
              "one-cycle schedule for the CPU, in pieces; distill: fast, taught by another "
              "build (distill-long: 120 epochs); finetune: continues the build its arch names")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="folder with cifar-10-batches-py/ (default $ZOO_DATA_DIR)")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="build directory (default build-out/VARIANT-PROFILE)")
@click.option("--seed", type=click.IntRange(min=0), default=None,
              help="default: the registry's seed")
@click.option("--resume", is_flag=True, help="continue from the last epoch checkpoint")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu")
@click.option("--init", "init", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              default=None, help="safetensors weights to start training from (VGG11: float "
              "weights, ours or torchvision's vgg11)")
@click.option("--stop-after", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
              help="stop at the first checkpoint after SECONDS (exit code 10); --resume continues")
@click.option("--train-only", is_flag=True,
              help="stop once trained, before compiling (exit code 10): train on a GPU machine "
              "without concrete-ml, then --resume without it where concrete-ml is")
@click.option("--check", "check_rev", default=None, metavar="REV",
              help="rebuild the published build REV and compare file by file")
@REGISTRY
@JSON
@handles_errors
def build_cmd(variant: str, profile: str, data_dir: Path | None, out_dir: Path | None,
              seed: int | None, resume: bool, device: str, init: Path | None,
              stop_after: float | None, train_only: bool, check_rev: str | None,
              registry_path: Path | None, as_json: bool) -> None:
    """Build a variant from its recipe into a build directory that `zoo publish` accepts."""
    from zoo.build import run as builder

    if check_rev:
        source = click.get_current_context().get_parameter_source
        given = [f"--{name.replace('_', '-')}" for name in
                 ("profile", "seed", "device", "stop_after", "train_only")
                 if source(name) is not click.core.ParameterSource.DEFAULT]  # fmt: skip
        if given:
            raise click.UsageError(f"--check rebuilds the pinned build as it was made (its "
                                   f"profile and seed, on the CPU): drop {', '.join(given)}")
        out, report = builder.check(f"{variant}@{check_rev}", data_dir=data_dir, init=init,
                                    out_dir=out_dir, registry_path=registry_path, resume=resume)
        _emit(as_json, {"build_dir": str(out), "files": report},
              lambda: "\n".join(f"{p}: {why}" for p, why in report.items()))
        if any(why != "match" for why in report.values()):
            click.echo(f"hint: {builder.MISMATCH_HINT}", err=True)
            sys.exit(4)
        return
    try:
        out = builder.build(variant, profile=profile, data_dir=data_dir, out_dir=out_dir,
                            seed=seed, resume=resume, device=device, registry_path=registry_path,
                            init=init, stop_after=stop_after, train_only=train_only)
    except BuildPaused as paused:
        text = f"paused: {paused}\nhint: {paused.hint}"
        _emit(as_json, {"paused": str(paused), "hint": paused.hint}, lambda: text)
        sys.exit(paused.exit_code)
    _emit(as_json, {"build_dir": str(out)}, lambda: f"built {variant} ({profile}) in {out}")
# fmt: on


@main.command()
@click.argument("build_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--hub", "hub_specs", multiple=True, default=["releases"], show_default=True,
              help="releases (the store beside the registry), local, or hf://ORG/REPO; repeat "
              "it to publish to several")  # fmt: skip
@click.option("--message", default=None, help="commit message")
@REGISTRY
@JSON
@handles_errors
def publish(
    build_dir: Path,
    hub_specs: tuple[str, ...],
    message: str | None,
    registry_path: Path | None,
    as_json: bool,
) -> None:
    """Publish a build directory to hubs and pin it in the registry."""
    build = api.publish(build_dir, list(hub_specs), registry_path=registry_path, message=message)
    data = {"variant": build.variant, "revision": build.revision, "hubs": build.raw["hubs"]}
    _emit(as_json, data, lambda: f"published {build.ref} to {', '.join(hub_specs)}")


@main.group()
def bundle() -> None:
    """Carry builds as one file to a machine without a hub, verified on import."""


@bundle.command("export")
@click.argument("refs", nargs=-1, required=True, shell_complete=complete_ref)
@click.option("-o", "--out", "out", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="the bundle file to write")  # fmt: skip
@REGISTRY
@JSON
@handles_errors
def bundle_export(refs: tuple[str, ...], out: Path, registry_path: Path | None, as_json: bool):
    """Write builds (VARIANT or VARIANT@REV, pulled first if needed) into one bundle file."""
    from zoo.store import bundle as bundles

    data = bundles.export(list(refs), out, registry_path)
    _emit(as_json, data, lambda: f"wrote {', '.join(data['builds'])} to {data['path']} "
          f"({_size(data['bytes'])})")  # fmt: skip


@bundle.command("import")
@click.argument("path", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option(
    "--trust",
    is_flag=True,
    help="also add builds this registry does not pin (only for bundles you trust)",
)
@REGISTRY
@JSON
@handles_errors
def bundle_import(path: Path, trust: bool, registry_path: Path | None, as_json: bool) -> None:
    """Verify a bundle against the registry's pins and put its builds into the cache."""
    from zoo.store import bundle as bundles

    data = bundles.import_bundle(path, trust=trust, registry_path=registry_path)
    added = data["added_to_registry"]
    _emit(as_json, data, lambda: f"imported {', '.join(data['imported'])} into the cache" + (
          f"; added to the registry: {', '.join(added)}" if added else ""))  # fmt: skip


@main.group()
def releases() -> None:
    """The release store: releases/ beside the registry, every pinned build's files by sha256."""


@releases.command("check")
@REGISTRY
@JSON
@handles_errors
def releases_check(registry_path: Path | None, as_json: bool) -> None:
    """Rehash every live build's files in the store; exit 4 if any is missing or wrong."""
    data = api.releases_check(registry_path)
    bad = {ref: {p: why for p, why in report.items() if why != "ok"}
           for ref, report in data["builds"].items()}  # fmt: skip

    def text() -> str:
        lines = [f"{data['store']}: {data['blobs']} blobs, {_size(data['bytes'])}"]
        lines += [f"{ref}: " + (json.dumps(b) if b else "ok") for ref, b in bad.items()]
        return "\n".join(lines)

    _emit(as_json, data, text)
    if any(bad.values()):
        click.echo("hint: publish each build with `zoo publish BUILD_DIR --hub releases`, or "
                   "yank it in registry.json with a reason", err=True)  # fmt: skip
        sys.exit(4)


@main.command()
@REF
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="write the card to this file instead of printing it",
)
@REGISTRY
@handles_errors
def card(ref: str, output: Path | None, registry_path: Path | None) -> None:
    """Print a build's model card with its FHE truth: accuracy in simulation and real FHE (with
    image counts), seconds per image and where, PBS count, serialized evaluation-key size."""
    if output is not None:
        writable(output)
    text = api.card(ref, registry_path)
    if output is None:
        click.echo(text)
    else:
        output.write_text(text)


@main.command()
@REF
@REGISTRY
@JSON
@handles_errors
def verify(ref: str, registry_path: Path | None, as_json: bool) -> None:
    """Rehash what is cached of a variant; corrupt or unsafe files are removed (exit 4)."""
    report = api.verify(ref, registry_path)

    def text() -> str:
        return "\n".join(
            f"{rev[:12]} {path}: {status}" for rev, files in report.items()
            for path, status in files.items()
        )  # fmt: skip

    _emit(as_json, report, text)
    bad = ("corrupt", "unsafe")
    if any(s.startswith(bad) for files in report.values() for s in files.values()):
        sys.exit(4)


@main.command()
@REF
@click.argument("images", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))  # fmt: skip
@FHE
@click.option("--top-k", type=click.IntRange(min=1), default=3, show_default=True)
@click.option(
    "--server",
    "server_url",
    default=None,
    metavar="URL",
    help="run the circuit on a `zoo serve` server (the secret key stays here)",
)
@REGISTRY
@JSON
@handles_errors
def predict(ref: str, images: tuple[Path, ...], fhe: str, top_k: int, server_url: str | None,
            registry_path: Path | None, as_json: bool) -> None:  # fmt: skip
    """Classify 32x32 PNG/JPEG images: clear head, then the encrypted circuit (here, or on
    a `zoo serve` server with --server: encrypted here, run there, decrypted here)."""
    from zoo.fhe import runtime

    if server_url and fhe != "execute":
        raise click.UsageError("--server runs real FHE: use --fhe execute with it (simulation "
                               "runs locally: drop --server)")  # fmt: skip
    pixels = runtime.as_images(list(images))  # bad images fail before the load (minutes)
    role = "client" if server_url else "all"
    model = runtime.load(ref, role=role, server_url=server_url, circuits=fhe != "disable",
                         registry_path=registry_path)  # fmt: skip
    if server_url:
        model.server.health()  # a wrong or absent server fails now, not after keygen
    predictions = model.predict(pixels, fhe=fhe, top_k=top_k)
    data = [{"image": str(i), **p.__dict__} for i, p in zip(images, predictions)]

    def text() -> str:
        return "\n".join(
            f"{d['image']}: " + ", ".join(f"{n} {s:.3f}" for n, s in zip(d["names"], d["scores"]))
            for d in data
        )

    _emit(as_json, data, text)


# fmt: off
@main.command("serve")
@REF
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--key-store", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="where received evaluation keys go (default "
                   "$ZOO_HOME/server-keys/VARIANT/REVISION)")
@click.option("--max-key-bytes", type=click.IntRange(min=1), default=None,
              help="largest evaluation-key upload accepted (default 4 GiB)")
@click.option("--max-keys", type=click.IntRange(min=1), default=None,
              help="evaluation keys kept per client; the least recently used go first "
                   "(default 8)")
@click.option("--max-concurrent", type=click.IntRange(min=1), default=None,
              help="uploads and runs at once; more get 503 + Retry-After (default 2)")
@click.option("--token-file", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              default=None, help="bearer tokens, one per line (also $ZOO_SERVE_TOKEN); needed "
                                 "to bind a non-loopback --host")
@click.option("--ssl-keyfile", type=click.Path(path_type=Path, exists=True), default=None)
@click.option("--ssl-certfile", type=click.Path(path_type=Path, exists=True), default=None)
@REGISTRY
@JSON
@handles_errors
def serve_cmd(ref: str, host: str, port: int, key_store: Path | None, max_key_bytes: int | None,
              max_keys: int | None, max_concurrent: int | None, token_file: Path | None,
              ssl_keyfile: Path | None, ssl_certfile: Path | None, registry_path: Path | None,
              as_json: bool) -> None:
    """Serve a build's FHE circuit over HTTP for `zoo predict --server` (the server side only:
    it receives evaluation keys and ciphertexts, never a secret key)."""
    from zoo.fhe import serve

    tokens = serve.load_tokens(token_file)
    serve.check_exposure(host, tokens)  # before loading anything
    limits = {"max_key_bytes": max_key_bytes, "max_keys": max_keys,
              "max_concurrent": max_concurrent, "ssl_keyfile": ssl_keyfile,
              "ssl_certfile": ssl_certfile}
    kwargs = {k: v for k, v in limits.items() if v is not None}

    def announce(data: dict[str, Any]) -> None:
        _emit(as_json, data, lambda: f"serving {data['variant']}@{data['revision'][:12]} at "
              f"{data['url']} (evaluation keys in {data['key_store']})")

    serve.serve(ref, host, port, announce=announce, registry_path=registry_path,
                key_store=key_store, tokens=tokens, **kwargs)
# fmt: on


@main.command("eval")
@REF
@FHE
@click.option("-n", "n_images", type=int, default=100, help="number of test images")
@click.option(
    "--seed", type=click.IntRange(min=0), default=None, help="seeded sample (default: first N)"
)
@click.option("--data-dir", type=click.Path(path_type=Path), default=None)
@click.option(
    "--results",
    type=click.Path(path_type=Path),
    default=None,
    help="results file (JSON lines; default under $ZOO_HOME/results)",
)
@click.option("--resume", is_flag=True, help="continue the results file, skipping finished images")
@click.option(
    "--stop-after",
    type=int,
    default=None,
    metavar="K",
    help="run at most K more images, then summarize what is done (with --resume: "
    "a long evaluation in pieces)",
)
@click.option(
    "--backend",
    type=click.Choice(["local", "ray"]),
    default="local",
    help="where the encrypted circuit runs (--fhe execute)",
)
@click.option("--address", default=None, help="Ray cluster address (default: start a local one)")
@click.option(
    "--workers", type=click.IntRange(min=1), default=None, help="Ray workers (default: one per CPU)"
)
@click.option(
    "--record",
    is_flag=True,
    help="write the real-FHE results into the build's registry metrics (--fhe execute)",
)
@REGISTRY
@JSON
@handles_errors
def eval_cmd(ref: str, fhe: str, n_images: int, seed: int | None, data_dir: Path | None,
             results: Path | None, resume: bool, stop_after: int | None, backend: str,
             address: str | None, workers: int | None, record: bool,
             registry_path: Path | None, as_json: bool) -> None:  # fmt: skip
    """Top-1/2/3 on CIFAR-10 test images; real FHE also reports agreement with simulation,
    image by image. Every image is appended to the results file as it finishes."""
    from zoo.fhe import evaluate

    result = evaluate.evaluate(
        ref, fhe=fhe, n_images=n_images, seed=seed, data_dir=data_dir, registry_path=registry_path,
        results=results, resume=resume, backend=backend, address=address, workers=workers,
        progress=not as_json, record=record, stop_after=stop_after,
    )  # fmt: skip
    _emit(as_json, result, lambda: eval_text(result))


def eval_text(summary: dict[str, Any]) -> str:
    """An evaluation summary for people: accuracy, real-FHE agreement and time, results file."""
    mode = summary["fhe"]
    lines = [f"{summary['variant']}@{summary['revision'][:12]}, fhe={mode}, "
             f"{summary['n_images']} test images ({summary['sample']})"]  # fmt: skip
    for name in ("disable", "simulate", "execute"):
        if f"{name}_top1" in summary:
            tops = " / ".join(f"{summary[f'{name}_top{k}']:.4f}" for k in (1, 2, 3))
            lines.append(f"  {name:8} top-1/2/3 {tops}")
    if mode == "execute":
        machine = summary.get("machine") or {}
        lines.append(
            f"  agreement with simulation {summary['agreement_with_simulation']:.2f} "
            f"(disagreeing images: {summary['disagreeing_indices'] or 'none'})\n"
            f"  {summary['execute_seconds_per_image']:,.1f} s per image on "
            f"{cost.describe_machine(machine) if machine else 'the Ray cluster'}"
        )
        busy = summary.get("cpu_others_max")
        if summary.get("execute_timing_conditions"):
            lines.append(f"  {summary['execute_timing_conditions']}")
        elif not alone(busy):
            lines.append(
                f"  other processes used up to {busy:.0%} of the CPU during an image: left out "
                "of the seconds per image (results file: cpu_others)"
            )
    lines.append(f"  results: {summary['results']}")
    return "\n".join(lines)


@main.command()
@REF
@click.option("--force", is_flag=True, help="throw the build's keys away and make new ones")
@click.option(
    "--record",
    is_flag=True,
    help="write the serialized key size (and keygen time) into the registry",
)
@REGISTRY
@JSON
@handles_errors
def keygen(ref: str, force: bool, record: bool, registry_path: Path | None, as_json: bool) -> None:
    """Generate the client keys of a build once (or reuse them) and report their size."""
    from zoo.fhe import runtime

    info = runtime.keygen(ref, force=force, registry_path=registry_path)
    timed = runtime.keygen_metrics(info.keygen_seconds, info.cpu_others)
    if record:
        metrics = {"eval_key_bytes_serialized": info.eval_key_bytes, **timed}
        api.record_metrics(f"{info.variant}@{info.revision}", metrics, registry_path)
    data = {**info.__dict__, "path": str(info.path)}

    def text() -> str:
        made = (f"generated in {info.keygen_seconds:.1f} s" if info.generated
                else "reused")  # fmt: skip
        busy = ("" if timed or not info.generated else
                f"\nother processes used {info.cpu_others:.0%} of the CPU meanwhile: the time is "
                "not this machine's alone, so --record leaves it out")  # fmt: skip
        return (f"{info.variant}@{info.revision[:12]}: keys {made} at {info.path}\n"
                f"evaluation keys: {_size(info.eval_key_bytes)} (sent to the server; "
                f"the secret key stays here){busy}")  # fmt: skip

    _emit(as_json, data, text)


@main.group("bench")
def bench_group() -> None:
    """Measure this machine (calibrations for the cost estimates of `zoo list` / `zoo info`)."""


# fmt: off
@bench_group.command("pbs")
@click.option("--max-bits", type=click.IntRange(2, 8), default=7, show_default=True,
              help="widest lookup measured (8 adds polynomial size 32768: minutes of keygen)")
@click.option("--min-bits", type=click.IntRange(2, 8), default=2, show_default=True)
@click.option("--repetitions", type=click.IntRange(min=1), default=5, show_default=True,
              help="timed runs per circuit (the median is kept)")
@click.option("--out", "out_path", type=click.Path(path_type=Path), default=None,
              help="calibration file (default $ZOO_HOME/calibration/pbs.json)")
@click.option("--note", default=None, help="free text stored with the calibration")
@click.option("--wop", is_flag=True,
              help="also time WoP-PBS lookups (4-14 bits, as in circuits with lookups of 11+ "
                   "bits: ~0.5 GiB of keys each)")
@click.option("--add-wop", is_flag=True,
              help="time only the WoP-PBS lookups and add them to the calibration at --out")
@JSON
@handles_errors
def bench_pbs(max_bits: int, min_bits: int, repetitions: int, out_path: Path | None,
              note: str | None, wop: bool, add_wop: bool, as_json: bool) -> None:
    """Time programmable bootstraps per crypto parameter set and fit the cost model."""
    from zoo.cost import bench

    if min_bits > max_bits:
        raise click.UsageError("--min-bits must not exceed --max-bits")
    try:
        document, path = bench.run_pbs_bench(
            max_bits=max_bits, min_bits=min_bits, repetitions=repetitions, out=out_path,
            note=note, progress=None if as_json else lambda line: click.echo(line, err=True),
            wop=wop, add_wop=add_wop)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    fit, wop_fit = document["fit"], document.get("wop_fit")

    def text() -> str:
        lines = [f"{e['circuit']}: measured {e['measured_seconds']:.3f} s, model "
                 f"{e['predicted_seconds']:.3f} s ({e['relative_error']:+.0%})"
                 for e in fit["errors"] + (wop_fit["errors"] if wop_fit else [])]
        lines.append(f"fit: seconds per PBS = {fit['formula']}, c = {fit['coefficient']:.4g}, "
                     f"e = {fit['level_free_coefficient']:.4g}; max |error| "
                     f"{fit['max_abs_relative_error']:.0%}")
        if fit.get("key_switch_coefficient"):
            lines.append(f"     key switches: {fit['key_switch_formula']}, "
                         f"d = {fit['key_switch_coefficient']:.4g}")
        if fit.get("linear_coefficient"):
            lines.append(f"     linear work: {fit['linear_formula']}, "
                         f"g = {fit['linear_coefficient']:.4g}")
        seconds = (document["wop_measured"] if add_wop else document)["bench_seconds"]
        lines.append(f"measured in {seconds:.0f} s")
        if wop_fit:
            lines.append(f"WoP fit: seconds per lookup = ({wop_fit['a']:.4g} + "
                         f"{wop_fit['b']:.4g} x bits) x n x (level+1) x (k+1)^2 x N x log2(N); "
                         "max |error| "
                         f"{wop_fit['max_abs_relative_error']:.0%}")
        lines.append(f"calibration written to {path}")
        return "\n".join(lines)

    _emit(as_json, {**document, "path": str(path)}, text)
# fmt: on


@main.group("cache")
def cache_group() -> None:
    """Inspect and clean the local cache ($ZOO_HOME/cache)."""


@cache_group.command("ls")
@REGISTRY
@JSON
@handles_errors
def cache_ls(registry_path: Path | None, as_json: bool) -> None:
    """List cached builds."""
    entries = api.cache_list(registry_path)
    data = [
        {"variant": e.variant, "revision": e.revision, "size": e.size, "status": e.status,
         "files": e.files, "path": str(e.path)}
        for e in entries
    ]  # fmt: skip

    def text() -> str:
        if not entries:
            return "cache is empty"
        return "\n".join(
            f"{e.variant}@{e.revision[:12]}  {_size(e.size)}  {e.status}  {len(e.files)} files"
            for e in entries
        )

    _emit(as_json, data, text)


@cache_group.command("rm")
@click.argument("ref", required=False)
@click.option("--all", "everything", is_flag=True, help="remove every cached build")
@REGISTRY
@JSON
@handles_errors
def cache_rm(ref: str | None, everything: bool, registry_path: Path | None, as_json: bool) -> None:
    """Remove a variant's cached builds (VARIANT or VARIANT@REV), or --all."""
    if not ref and not everything:
        raise click.UsageError("name a variant, or pass --all")
    freed = api.cache_remove(None if everything else ref, registry_path)
    _emit(as_json, {"freed_bytes": freed}, lambda: f"freed {_size(freed)}")


@cache_group.command("prune")
@click.option(
    "--orphans",
    is_flag=True,
    help="also remove builds this registry does not pin (another registry may)",
)
@REGISTRY
@JSON
@handles_errors
def cache_prune(orphans: bool, registry_path: Path | None, as_json: bool) -> None:
    """Remove builds this runtime cannot load, yanked builds and interrupted downloads."""
    data = api.cache_prune(registry_path, orphans=orphans)
    kept = [f"kept {ref}: not pinned by this registry (--orphans removes it)"
            for ref in data["kept_orphans"]]  # fmt: skip
    freed = f"freed {_size(data['freed_bytes'])}"
    _emit(as_json, data, lambda: "\n".join(data["removed"] + kept + [freed]))


if __name__ == "__main__":
    main()
