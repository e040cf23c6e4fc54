"""The FHE cost model: per-parameter estimates, where the calibration comes from, `zoo bench pbs`.

`zoo bench pbs` runs for real here (concrete compile, keygen and runs of 2- and 3-bit circuits,
about 10 s); no assertion is about speed.
"""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from zoo.catalog import versions
from zoo.cli import main
from zoo.cost import machine
from zoo.cost import model as cost
from zoo.fhe import sigpipe

ROOT = Path(__file__).resolve().parent.parent

PARAM_A = {"polynomial_size": 8192, "glwe_dimension": 1, "input_lwe_dimension": 896, "level": 2,
           "base_log": 15}  # fmt: skip
PARAM_B = {"polynomial_size": 2048, "glwe_dimension": 1, "input_lwe_dimension": 965, "level": 1,
           "base_log": 23}  # fmt: skip
CIRCUIT = {
    "pbs_count_by_bit_width": {"4": 256, "6": 1408},
    "pbs_count_per_parameter": [
        {"parameter": PARAM_A, "count": 1408},
        {"parameter": PARAM_B, "count": 256},
    ],
}


def _calibration(
    coefficient: float, overhead: float = 0.0, concrete: str | None = None, level_free: float = 0.0
) -> dict:
    have = versions.installed()
    return {
        "schema": 1,
        "created": "2025-01-01T00:00:00+00:00",
        "machine": {**machine.cpu(), "cpu_model": "test CPU"},  # this kind of machine
        "versions": {**have, "concrete-python": concrete or have["concrete-python"]},
        "fit": {
            "formula": cost.FORMULA,
            "linear_formula": cost.LINEAR_FORMULA,
            "coefficient": coefficient,
            "level_free_coefficient": level_free,
            "overhead_seconds": overhead,
        },
        "points": [],
    }


def _write_user(calibration: dict) -> Path:
    path = cost.user_calibration_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(calibration))
    return path


def _ship(default: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder of shipped calibrations holding ``default`` alone, in place of the package's."""
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    (shipped / "default.json").write_text(json.dumps(default))
    monkeypatch.setattr(cost, "CALIBRATION_DIR", shipped)
    monkeypatch.setattr(cost, "DEFAULT_CALIBRATION", shipped / "default.json")
    return shipped


def _pbs_seconds(param: dict, c: float, e: float) -> float:
    """c × n × level × (k + 1)² × N × log2(N) + e × n × (k + 1) × N × log2(N), by hand."""
    n, level, k, size = (param[key] for key in ("input_lwe_dimension", "level", "glwe_dimension",
                                                "polynomial_size"))  # fmt: skip
    return (c * level * (k + 1) + e) * n * (k + 1) * size * math.log2(size)


def test_estimate_is_the_hand_computed_sum_over_parameter_sets() -> None:
    c, e, overhead = 2e-10, 3e-10, 0.05
    by_hand = (
        1408 * (c * 896 * 2 * 2**2 + e * 896 * 2) * 8192 * 13  # log2(8192) = 13
        + 256 * (c * 965 * 1 * 2**2 + e * 965 * 2) * 2048 * 11  # log2(2048) = 11
        + overhead
    )
    calibration = _calibration(c, overhead, level_free=e)
    assert cost.estimate_seconds(CIRCUIT, calibration=calibration) == pytest.approx(by_hand)
    result = cost.breakdown(CIRCUIT, calibration)
    assert result["method"] == "per-parameter"
    assert [row["count"] for row in result["rows"]] == [1408, 256]  # most expensive first
    first = result["rows"][0]
    assert first["parameter"] == PARAM_A
    assert first["seconds_each"] == pytest.approx(_pbs_seconds(PARAM_A, c, e))
    assert first["seconds"] == pytest.approx(1408 * first["seconds_each"])
    assert result["calibration"]["cpu_model"] == "test CPU"


def test_counts_are_also_read_from_concrete_statistics() -> None:
    rows = CIRCUIT["pbs_count_per_parameter"]
    circuit = {"concrete_statistics": {"programmable_bootstrap_count_per_parameter": rows}}
    calibration = _calibration(1e-10)
    assert cost.estimate_seconds(circuit, calibration=calibration) == pytest.approx(
        cost.estimate_seconds(CIRCUIT, calibration=calibration)
    )


def test_fallback_order_user_then_default_then_bit_width_table(
    zoo_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    default = json.loads(cost.DEFAULT_CALIBRATION.read_text())
    _write_user(_calibration(1e-9))
    user = cost.current_calibration()
    assert user["source"]["kind"] == "user"
    assert cost.breakdown(CIRCUIT)["calibration"]["source"] == "user"
    assert cost.estimate_seconds(CIRCUIT) == pytest.approx(
        cost.estimate_seconds(CIRCUIT, calibration=_calibration(1e-9))
    )

    cost.user_calibration_path().unlink()
    monkeypatch.setattr(cost, "CALIBRATION_DIR", zoo_home / "shipped")  # the default alone
    shipped = cost.current_calibration()
    assert shipped["source"]["kind"] == "shipped"
    assert shipped["fit"]["coefficient"] == default["fit"]["coefficient"]
    assert cost.breakdown(CIRCUIT)["calibration"]["source"] == "shipped"

    # a build recorded before per-parameter counts existed: the per-bit-width table
    old = {"pbs_count_by_bit_width": CIRCUIT["pbs_count_by_bit_width"]}
    assert cost.breakdown(old)["method"] == "bit-width-table"
    assert cost.estimate_seconds(old) == pytest.approx(256 * 0.019 + 1408 * 0.070)
    # no calibration readable at all: the table for every circuit
    monkeypatch.setattr(cost, "DEFAULT_CALIBRATION", zoo_home / "missing.json")
    assert cost.current_calibration() is None
    assert cost.breakdown(CIRCUIT)["method"] == "bit-width-table"
    assert cost.estimate_seconds({}) is None


def test_a_calibration_fitted_with_another_formula_is_refitted_from_its_points(
    zoo_home: Path,
) -> None:
    shipped = json.loads(cost.DEFAULT_CALIBRATION.read_text())
    old = {**shipped, "fit": {**shipped["fit"], "formula": "c * n * level * N", "coefficient": 1.0},
           "machine": machine.cpu()}  # fmt: skip
    _write_user(old)
    calibration = cost.current_calibration()
    assert calibration["source"]["kind"] == "user"
    assert calibration["fit"]["formula"] == cost.FORMULA
    assert calibration["fit"]["coefficient"] == pytest.approx(shipped["fit"]["coefficient"])


@pytest.mark.parametrize(
    "damage",
    [
        {"fit": {"coefficient": None}},
        {"fit": {"overhead_seconds": "0.1"}},
        {"points": {"a": 1}},
        {"points": [1, 2]},
    ],  # fmt: skip
)
def test_a_malformed_user_calibration_is_unreadable_not_a_crash(
    zoo_home: Path, damage: dict
) -> None:
    good = _calibration(1e-9)
    damaged = {**good, **{k: {**good[k], **v} if k == "fit" else v for k, v in damage.items()}}
    _write_user(damaged)
    assert cost.current_calibration()["source"]["kind"] == "shipped"  # the user's is skipped
    assert cost.estimate_seconds(CIRCUIT) > 0


def test_a_circuit_without_the_key_switch_work_its_calibration_prices_is_a_lower_bound() -> None:
    """Builds from before circuits recorded key_switch_work: their key switches are not priced,
    so the total is at least that, not a full estimate."""
    calibration = _calibration(1e-10)
    calibration["fit"]["key_switch_coefficient"] = 1e-9
    whole = {**CIRCUIT, "key_switch_count": 1664, "key_switch_work": 1e9}
    old = {**CIRCUIT, "key_switch_count": 1664}
    full, partial = cost.breakdown(whole, calibration), cost.breakdown(old, calibration)
    assert not full["lower_bound"] and any(r.get("key_switch") for r in full["rows"])
    assert partial["lower_bound"] and partial["total_seconds"] < full["total_seconds"]


def test_shipped_default_describes_its_machine() -> None:
    default = json.loads(cost.DEFAULT_CALIBRATION.read_text())
    assert default["machine"]["cpu_model"] and default["machine"]["cpu_count"]
    assert default["machine"]["isa"]  # FHE speed follows it: estimates elsewhere must say so
    assert default["versions"]["concrete-python"] and default["created"] and default["note"]
    assert default["fit"]["coefficient"] > 0 and default["points"]
    # and prices WoP circuits from WoP points measured on the same machine
    assert default["wop_fit"]["formula"] == cost.WOP_FORMULA
    assert {p["bits"] for p in default["points"] if p.get("kind") == "wop"} == {4, 12, 14}
    for key in ("cpu_model", "isa", "cpu_count"):
        assert default["wop_measured"]["machine"][key] == default["machine"][key]
    assert cost.breakdown(WOP_CIRCUIT, default)["method"] == "wop"


def test_the_shipped_calibration_of_this_kind_of_machine_comes_before_the_default(
    zoo_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for path in cost.CALIBRATION_DIR.glob("*.json"):  # each says where it was measured
        document = json.loads(path.read_text())
        assert all(document["machine"].get(k) for k in cost.MACHINE_KIND), path
        assert document["note"] and document["points"], path
    here = machine.cpu()
    other = "avx2" if here["isa"] == "avx512" else "avx512"
    default = json.loads(cost.DEFAULT_CALIBRATION.read_text())
    shipped = _ship({**default, "machine": {**here, "isa": other}}, tmp_path, monkeypatch)
    assert cost.current_calibration()["source"]["other_machine"]  # only another kind's
    ours = {**_calibration(1e-9), "machine": here, "note": "this kind"}
    (shipped / "ours.json").write_text(json.dumps(ours))
    calibration = cost.current_calibration()
    source = {k: v for k, v in calibration["source"].items() if k != "wop_other_machine"}
    assert source == {"kind": "shipped", "path": str(shipped / "ours.json"), "ignored": [],
                      "stale": None, "other_machine": None}  # fmt: skip
    _write_user(_calibration(2e-9))  # this host's own measurement still comes first
    assert cost.current_calibration()["source"]["kind"] == "user"


def test_without_one_of_its_generation_the_shipped_calibration_of_its_isa_is_used(
    zoo_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two AVX-512 hosts of other CPU generations ran the same lookups 1.5-2.2x apart: the
    exact kind comes first, then one of this instruction set and core count, which says so."""
    here = machine.cpu()
    other = "avx2" if here["isa"] == "avx512" else "avx512"
    default = json.loads(cost.DEFAULT_CALIBRATION.read_text())
    shipped = _ship({**default, "machine": {**here, "isa": other}}, tmp_path, monkeypatch)
    older = {**_calibration(1e-9), "machine": {**here, "cpu_model_number": "older"}}
    (shipped / "b-older.json").write_text(json.dumps(older))
    calibration = cost.current_calibration()
    assert calibration["source"]["path"] == str(shipped / "b-older.json")
    assert "model older" in calibration["source"]["other_machine"]
    (shipped / "c-ours.json").write_text(json.dumps({**_calibration(2e-9), "note": "ours"}))
    calibration = cost.current_calibration()
    assert calibration["note"] == "ours" and calibration["source"]["other_machine"] is None


def test_a_calibration_from_another_kind_of_machine_says_so(
    zoo_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    here = machine.cpu()
    same = {"machine": {**here, "cpu_model": "renamed"}}
    assert cost.other_machine(same) is None  # the kind decides, not the name
    other = "avx2" if here["isa"] == "avx512" else "avx512"  # hosts of both kinds are seen
    wider = {"machine": {**here, "isa": other}}
    cpu = f"{here['cpu_model']} (family {here['cpu_family']} model {here['cpu_model_number']})"
    assert cost.other_machine(wider, here) == (
        f"measured on {cpu}, {other}, {here['cpu_count']} cores; "
        f"this is {cpu}, {here['isa']}, {here['cpu_count']} cores"
    )
    newer = {"machine": {**here, "cpu_model_number": "another"}}  # same ISA, other generation
    assert "model another" in cost.other_machine(newer, here)
    unrecorded = {"machine": {"cpu_model": "old CPU", "cpu_count": here["cpu_count"]}}
    assert "old CPU, instruction set not recorded" in cost.other_machine(unrecorded)

    # nothing shipped for this kind of machine either: the user's own is used, not silently
    default = json.loads(cost.DEFAULT_CALIBRATION.read_text())
    shipped = _ship({**default, "machine": wider["machine"]}, tmp_path, monkeypatch)
    user = _write_user({**_calibration(1e-9), "machine": wider["machine"]})
    calibration = cost.current_calibration()
    assert calibration["source"]["kind"] == "user"
    assert other in calibration["source"]["other_machine"]
    text = CliRunner().invoke(main, ["info", "cifar10-split-tiny"]).output
    assert "warning: another kind of machine: measured on" in text
    assert "calibrate this one with `zoo bench pbs`" in text
    listing = CliRunner().invoke(main, ["list"]).output
    assert "warning: † est. s/img from calibration points of another kind of machine" in listing
    rows = json.loads(CliRunner().invoke(main, ["list", "--json"]).output)
    assert rows and all(other in row["est_other_machine"] for row in rows)

    # a shipped calibration of this kind of machine comes before it, and says why
    (shipped / "ours.json").write_text(json.dumps({**_calibration(2e-9), "note": "this kind"}))
    calibration = cost.current_calibration()
    assert calibration["source"]["kind"] == "shipped" and calibration["note"] == "this kind"
    assert calibration["source"]["other_machine"] is None
    (ignored,) = calibration["source"]["ignored"]
    assert ignored["path"] == str(user) and other in ignored["reason"]


def test_a_calibration_without_wop_points_borrows_the_defaults_and_says_where_from(
    zoo_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A WoP circuit priced from the default's WoP fit, not as a lower bound of classic PBS."""
    here = machine.cpu()
    other = "avx2" if here["isa"] == "avx512" else "avx512"
    default = json.loads(cost.DEFAULT_CALIBRATION.read_text())
    default["wop_measured"] = {**default["wop_measured"], "machine": {**here, "isa": other}}
    _ship(default, tmp_path, monkeypatch)
    _write_user(_calibration(1e-9))  # this machine's classic PBS, no WoP points
    calibration = cost.current_calibration()
    assert calibration["source"]["kind"] == "user"
    assert calibration["source"]["other_machine"] is None
    assert calibration["wop_fit"] == default["wop_fit"]
    assert other in calibration["source"]["wop_other_machine"]
    estimate = cost.breakdown(WOP_CIRCUIT, calibration)
    assert estimate["method"] == "wop" and not estimate["lower_bound"]
    assert estimate["total_seconds"] == pytest.approx(
        cost.breakdown(WOP_CIRCUIT, default)["total_seconds"]
        - default["fit"].get("overhead_seconds", 0.0)
    )  # our overhead is 0
    without = {k: v for k, v in calibration.items() if k not in ("wop_fit", "wop_measured")}
    assert cost.breakdown(WOP_CIRCUIT, without)["lower_bound"]  # what it would be without
    own = {**_calibration(1e-9), "wop_fit": {**default["wop_fit"], "a": 1.0}}
    _write_user(own)  # WoP points of its own: kept
    calibration = cost.current_calibration()
    assert calibration["wop_fit"]["a"] == 1.0 and calibration["source"]["wop_other_machine"] is None


def test_stale_user_calibration_is_ignored_with_a_warning(zoo_home: Path) -> None:
    path = _write_user(_calibration(1e-9, concrete="0.0.1"))
    with pytest.warns(cost.StaleCalibrationWarning, match="concrete-python 0.0.1"):
        calibration = cost.current_calibration()
    assert calibration["source"]["kind"] == "shipped"
    (ignored,) = calibration["source"]["ignored"]
    assert ignored["path"] == str(path) and "concrete-python 0.0.1" in ignored["reason"]


def test_zoo_info_reports_breakdown_and_ignored_calibration(
    zoo_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ZOO_REGISTRY", raising=False)  # the project's registry, with its builds
    _write_user(_calibration(1e-9, concrete="0.0.1"))
    runner = CliRunner()
    with pytest.warns(cost.StaleCalibrationWarning):
        result = runner.invoke(main, ["info", "cifar10-split-tiny", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    estimate = data["resolved"]["cost"]
    assert estimate["method"] == "per-parameter"
    assert estimate["calibration"]["source"] == "shipped"
    assert "0.0.1" in estimate["calibration"]["ignored"][0]["reason"]
    pbs = [row for row in estimate["rows"] if "parameter" in row]  # not KS, not linear work
    assert sum(row["count"] for row in pbs) == 1664
    assert data["resolved"]["est_fhe_seconds_per_image"] == pytest.approx(estimate["total_seconds"])
    with pytest.warns(cost.StaleCalibrationWarning):
        text = runner.invoke(main, ["info", "cifar10-split-tiny"]).output
    assert "cost model:" in text and "shipped calibration" in text and "ignored" in text
    assert "1,408 PBS" in text and "N=8192 k=1 n=896 level=2" in text


def test_list_uses_the_per_parameter_model(zoo_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ZOO_REGISTRY", raising=False)
    _write_user(_calibration(1e-10))
    rows = {r["variant"]: r for r in json.loads(
        CliRunner().invoke(main, ["list", "--json"]).output)}  # fmt: skip
    registry = json.loads((ROOT / "registry.json").read_text())
    circuit = registry["variants"]["cifar10-split-tiny"]["builds"][-1]["circuit"]
    expected = cost.estimate_seconds(circuit, calibration=_calibration(1e-10))
    assert rows["cifar10-split-tiny"]["est_fhe_seconds"] == pytest.approx(expected)


LIGHT = """
import sys, warnings
warnings.simplefilter("ignore")
from zoo.cli import main
try:
    main(["info", "cifar10-split-tiny"])
except SystemExit as exc:
    assert exc.code in (0, None), exc.code
print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'concrete', 'brevitas')))
"""


def test_info_with_cost_breakdown_imports_neither_torch_nor_concrete(
    zoo_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ZOO_REGISTRY", raising=False)
    out = subprocess.run([sys.executable, "-c", LIGHT], capture_output=True, text=True,
                         check=True)  # fmt: skip
    assert "cost model:" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def _synthetic_points(c: float, overhead: float, e: float = 5e-11) -> list[dict[str, Any]]:
    points = []
    for i, (param, count) in enumerate([(PARAM_A, 12), (PARAM_B, 32), (PARAM_B, 1)]):
        seconds = overhead + count * _pbs_seconds(param, c, e)
        points.append({"circuit": f"p{i}", "pbs_count": count,
                       "pbs_count_per_parameter": [{"parameter": param, "count": count}],
                       "run_seconds_median": seconds})  # fmt: skip
    return points


def test_fit_recovers_coefficients_and_overhead() -> None:
    """Level-2 and level-1 points weigh the two PBS terms differently: both come back."""
    document = cost.make_calibration(_synthetic_points(3e-10, 0.04, e=5e-11))
    assert document["fit"]["coefficient"] == pytest.approx(3e-10)
    assert document["fit"]["level_free_coefficient"] == pytest.approx(5e-11)
    assert document["fit"]["overhead_seconds"] == pytest.approx(0.04)
    assert document["fit"]["max_abs_relative_error"] == pytest.approx(0.0, abs=1e-9)
    first = document["points"][0]
    assert first["seconds_per_pbs"] == pytest.approx(_pbs_seconds(PARAM_A, 3e-10, 5e-11))
    assert first["relative_error"] == pytest.approx(0.0, abs=1e-9)


def test_fit_tells_key_switches_from_bootstraps(zoo_home: Path) -> None:
    """Points whose key switches weigh differently (levels 4 and 8, as at p_error 2**-40 and
    0.01) give back the three coefficients; the estimate then prices a circuit's key switches
    on a row of their own, from the key dimensions its PBS parameter sets name."""
    c, e, d, overhead = 2.4e-11, 3e-11, 2.2e-10, 0.03
    points = []
    for i, (param, count, ks_level) in enumerate(
        [(PARAM_A, 12, 4), (PARAM_B, 32, 8), (PARAM_B, 1, 8), (PARAM_A, 40, 3), (PARAM_B, 64, 4)]
    ):
        pbs = {**param, "input_secret_key_id": 1, "output_secret_key_id": 0}
        ks = {"level": ks_level, "base_log": 2, "input_secret_key_id": 0, "output_secret_key_id": 1}
        ks_work = (
            count
            * param["glwe_dimension"]
            * param["polynomial_size"]
            * ks_level
            * (param["input_lwe_dimension"] + 1)
        )
        points.append({
            "circuit": f"p{i}", "pbs_count": count,
            "pbs_count_per_parameter": [{"parameter": pbs, "count": count}],
            "key_switch_count_per_parameter": [{"parameter": ks, "count": count}],
            "run_seconds_median": overhead + count * _pbs_seconds(param, c, e) + d * ks_work,
        })  # fmt: skip
        assert cost.key_switch_work(points[-1]) == pytest.approx(ks_work)
    fit = cost.make_calibration(points)["fit"]
    assert fit["coefficient"] == pytest.approx(c)
    assert fit["level_free_coefficient"] == pytest.approx(e)
    assert fit["key_switch_coefficient"] == pytest.approx(d)
    assert fit["overhead_seconds"] == pytest.approx(overhead)
    circuit = {**points[1], "key_switch_count": 32}
    rows = cost.breakdown(circuit, _calibration(c) | {"fit": fit})["rows"]
    (ks_row,) = [r for r in rows if r.get("key_switch")]
    assert ks_row["count"] == 32 and ks_row["seconds"] == pytest.approx(
        d * cost.key_switch_work(points[1])
    )
    # without key switches in the points (older calibrations) the fit is the PBS one alone
    assert cost.fit(_synthetic_points(3e-10, 0.04))["key_switch_coefficient"] == 0.0
    # a calibration fitted with the one-term PBS formula is refitted from its points when read
    old_fit = {"formula": "c * n * (level + 1) * (k + 1)**2 * N * log2(N)", "coefficient": 1.0,
               "overhead_seconds": 0.0}  # fmt: skip
    _write_user(_calibration(1.0) | {"fit": old_fit, "points": points})
    assert cost.current_calibration()["fit"]["key_switch_coefficient"] == pytest.approx(d)


def test_fit_prices_linear_work_when_the_points_state_it() -> None:
    """A point with many multiply-adds per PBS (the bench's dense layer) sets the linear
    coefficient; the estimate gives the linear work a row of its own."""
    c, e, g, overhead = 2.4e-11, 3e-11, 4e-10, 0.03
    points = []
    for i, (param, count, macs) in enumerate(
        [
            (PARAM_A, 12, 0),
            (PARAM_B, 32, 64),
            (PARAM_B, 1, 0),
            (PARAM_A, 40, 500),
            (PARAM_B, 64, 9000),
        ]
    ):
        linear = {"dimension": param["glwe_dimension"] * param["polynomial_size"]}
        stats = {f"{key}_count_per_parameter": [{"parameter": linear, "count": macs}]
                 for key in ("clear_multiplication", "encrypted_addition")}  # fmt: skip
        work = 2 * macs * (linear["dimension"] + 1)
        assert cost.linear_work(stats) == work
        seconds = overhead + count * _pbs_seconds(param, c, e) + g * work
        points.append({"circuit": f"p{i}", "pbs_count": count, **stats,
                       "pbs_count_per_parameter": [{"parameter": param, "count": count}],
                       "run_seconds_median": seconds})  # fmt: skip
    fit = cost.fit(points)
    assert fit["linear_coefficient"] == pytest.approx(g) and fit["coefficient"] == pytest.approx(c)
    assert fit["linear_formula"] == cost.LINEAR_FORMULA
    rows = cost.breakdown(points[-1], _calibration(c) | {"fit": fit})["rows"]
    (linear_row,) = [r for r in rows if r.get("linear")]
    assert linear_row["seconds"] == pytest.approx(g * cost.linear_work(points[-1]))
    # points without linear statistics (older calibrations): no linear term
    assert cost.fit(_synthetic_points(3e-10, 0.04))["linear_coefficient"] == 0.0
    # the registry's catalogue states it; a circuit that says nothing gets no row
    assert cost.linear_work({"linear_work": 5.0}) == 5.0 and cost.linear_work({}) is None


def test_bench_pbs_really_runs_and_writes_a_calibration(zoo_home: Path) -> None:
    result = CliRunner().invoke(main, ["bench", "pbs", "--max-bits", "3", "--repetitions", "2",
                                       "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    # concrete's runtime now runs in this process; a peer that hangs up must still raise
    # BrokenPipeError here, not abort the process (its handler replaces SIG_IGN on first run)
    assert sigpipe.ignored()
    left, right = socket.socketpair()
    right.close()
    with pytest.raises(BrokenPipeError), left:
        left.sendall(b"x" * (1 << 20))
    data = json.loads(result.output)
    path = zoo_home / "calibration" / "pbs.json"
    assert data["path"] == str(path) and path.is_file()
    stored = json.loads(path.read_text())
    assert stored["machine"]["cpu_model"] and stored["machine"]["cpu_count"] >= 1
    assert stored["machine"]["isa"] == machine.cpu()["isa"]
    assert stored["versions"]["concrete-python"] == versions.installed()["concrete-python"]
    assert stored["versions"]["concrete-ml"] == versions.installed()["concrete-ml"]
    assert stored["created"] and stored["p_error"] == 2**-40
    assert {p["bits"] for p in stored["points"]} == {2, 3}
    for point in stored["points"]:
        assert point["pbs_count"] >= 1 and len(point["run_seconds"]) == 2
        (row,) = point["pbs_count_per_parameter"]
        assert row["count"] == point["pbs_count"]
        assert {"polynomial_size", "glwe_dimension", "input_lwe_dimension", "level",
                "base_log"} <= set(row["parameter"])  # fmt: skip
        assert point["seconds_per_pbs"] >= 0 and math.isfinite(point["relative_error"])
    fit = stored["fit"]
    assert fit["coefficient"] > 0 and fit["formula"] == cost.FORMULA
    assert len(fit["errors"]) == len(stored["points"])
    # the new calibration is the one estimates now use
    assert cost.current_calibration()["source"]["kind"] == "user"
    assert cost.breakdown(CIRCUIT)["calibration"]["source"] == "user"


# -- WoP-PBS circuits (lookups of 11+ bits) ---------------------------------------------------

PARAM_WOP = {"polynomial_size": 1024, "glwe_dimension": 2, "input_lwe_dimension": 762,
             "level": 8, "base_log": 5}  # fmt: skip
WOP_CIRCUIT = {
    "max_bit_width": 12,
    "packing_key_switch_count": 15,
    "pbs_count_by_bit_width": {"4": 10, "12": 5},
    "pbs_count_per_parameter": [{"parameter": PARAM_WOP, "count": 15}],
}


def _with_wop(calibration: dict, a: float, b: float) -> dict:
    return {**calibration, "wop_fit": {"formula": cost.WOP_FORMULA, "a": a, "b": b,
                                       "max_abs_relative_error": 0.1}}  # fmt: skip


def test_the_per_width_table_interpolates_and_takes_one_entry() -> None:
    table = {4: 0.01, 8: 0.16}
    assert cost.seconds_per_pbs(4, table) == 0.01
    assert cost.seconds_per_pbs(6, table) == pytest.approx(0.04)  # log-linear: halfway = x4
    assert cost.seconds_per_pbs(10, table) == pytest.approx(0.64)  # extrapolated
    assert cost.seconds_per_pbs(6, {8: 0.16}) == 0.16


def test_wop_lookups_are_counted_once() -> None:
    """What the graph does not attribute is already in the widest bucket (the packager puts it
    there): it is not added again, and a negative remainder takes nothing away."""
    work = cost.pbs_work(PARAM_WOP)
    packaged = {**WOP_CIRCUIT, "pbs_count_per_parameter": [{"parameter": PARAM_WOP, "count": 18}],
                "pbs_count_by_bit_width": {"4": 10, "12": 8},
                "pbs_count_by_bit_width_unattributed": 3}  # fmt: skip
    assert cost.wop_work(packaged) == [(4, 10, work), (12, 8, work)]
    over = {**packaged, "pbs_count_by_bit_width": {"4": 10, "12": 11},
            "pbs_count_by_bit_width_unattributed": -3}  # fmt: skip
    assert cost.wop_work(over) == [(4, 10, work), (12, 11, work)]
    short = {**packaged, "pbs_count_by_bit_width": {"4": 10, "12": 5}}  # an older table
    assert cost.wop_work(short) == [(4, 10, work), (12, 8, work)]
    assert cost.wop_work({**packaged, "pbs_count_by_bit_width": {}}) == [(12, 18, work)]


def test_wop_lookups_are_priced_by_width_and_parameter_set() -> None:
    a, b, overhead = 1e-9, 2e-10, 0.05
    calibration = _with_wop(_calibration(1e-10, overhead), a, b)
    work = 762 * 9 * 3**2 * 1024 * 10  # n × (level + 1) × (k + 1)² × N × log2(N)
    by_hand = (10 * (a + 4 * b) + 5 * (a + 12 * b)) * work + overhead
    result = cost.breakdown(WOP_CIRCUIT, calibration)
    assert result["method"] == "wop" and result["lower_bound"] is False
    assert result["total_seconds"] == pytest.approx(by_hand)
    # most expensive first: 10 × (a + 4b) against 5 × (a + 12b)
    assert [(r["bit_width"], r["count"]) for r in result["rows"]] == [(4, 10), (12, 5)]
    assert result["rows"][0]["parameter"] == PARAM_WOP
    # a classic circuit is priced as before, whatever WoP fit the calibration carries
    assert cost.estimate_seconds(CIRCUIT, calibration=calibration) == pytest.approx(
        cost.estimate_seconds(CIRCUIT, calibration=_calibration(1e-10, overhead))
    )


def test_wop_circuit_without_wop_calibration_is_a_lower_bound(
    zoo_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = cost.breakdown(WOP_CIRCUIT, _calibration(1e-10))
    assert result["method"] == "per-parameter" and result["lower_bound"] is True
    assert cost.breakdown(CIRCUIT, _calibration(1e-10))["lower_bound"] is False
    # zoo list marks it, zoo info says why and what to run (when no WoP fit can be borrowed)
    monkeypatch.setattr(cost, "CALIBRATION_DIR", tmp_path)
    monkeypatch.setattr(cost, "DEFAULT_CALIBRATION", tmp_path / "missing.json")
    monkeypatch.delenv("ZOO_REGISTRY", raising=False)
    _write_user(_calibration(1e-10))
    runner = CliRunner()
    rows = {r["variant"]: r for r in json.loads(runner.invoke(main, ["list", "--json"]).output)}
    assert rows["cifar10-cnv-2w2a"]["est_fhe_lower_bound"] is True
    assert rows["cifar10-split-tiny"]["est_fhe_lower_bound"] is False
    assert "≥" in runner.invoke(main, ["list"]).output
    text = runner.invoke(main, ["info", "cifar10-cnv-2w2a"]).output
    assert "lower bound" in text and "zoo bench pbs --wop" in text


def test_fit_wop_recovers_its_coefficients_apart_from_the_classic_fit() -> None:
    a, b = 1e-9, 2e-10
    classic = _synthetic_points(3e-10, 0.04)
    wop = []
    for bits, elements in [(4, 8), (8, 4), (12, 2)]:
        lookups = {str(bits): elements, "12": 1} if bits != 12 else {"12": elements + 1}
        count = sum(lookups.values())
        seconds = sum(n * (a + b * int(w)) for w, n in lookups.items()) * cost.pbs_work(PARAM_WOP)
        wop.append({"circuit": f"wop-{bits}", "kind": "wop", "pbs_count": count,
                    "lookups_by_bit_width": lookups,
                    "pbs_count_per_parameter": [{"parameter": PARAM_WOP, "count": count}],
                    "run_seconds_median": 0.04 + seconds})  # fmt: skip
    document = cost.make_calibration(classic + wop)
    assert document["fit"]["coefficient"] == pytest.approx(3e-10)  # WoP points left out
    assert len(document["fit"]["errors"]) == len(classic)
    assert document["wop_fit"]["a"] == pytest.approx(a)
    assert document["wop_fit"]["b"] == pytest.approx(b)
    assert document["wop_fit"]["max_abs_relative_error"] == pytest.approx(0.0, abs=1e-9)
    assert all(p["relative_error"] == pytest.approx(0.0, abs=1e-9) for p in document["points"])


def test_bench_wop_circuit_is_really_compiled_as_wop_and_timed(zoo_home: Path) -> None:
    from zoo.cost import bench

    spec = bench.PointSpec("wop", 4, (2,))
    (point,) = bench.measure([spec], repetitions=1)
    assert point["kind"] == "wop" and point["lookups_by_bit_width"] == {"4": 2, "12": 1}
    assert point["pbs_count"] == 3 and point["run_seconds_median"] > 0
    (row,) = point["pbs_count_per_parameter"]
    assert row["parameter"]["glwe_dimension"] >= 2  # WoP parameters, not a classic N=2^16 PBS


def test_bench_add_wop_needs_a_calibration_to_add_to(zoo_home: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["bench", "pbs", "--add-wop", "--out",
                                       str(tmp_path / "none.json")])  # fmt: skip
    assert result.exit_code == 2
    assert "--add-wop needs a calibration" in result.output
