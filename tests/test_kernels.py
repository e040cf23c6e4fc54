"""CPU kernels held to AVX2 for builds, and recorded as they really ran."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from zoo.build import kernels
from zoo.cost import machine
from zoo.errors import BuildError

RECORD = (
    "import json; from zoo.build import kernels; kernels.pin(); print(json.dumps(kernels.check()))"
)


def _record_in_fresh_process(**env: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if k not in kernels.PINS}
    out = subprocess.run([sys.executable, "-c", RECORD], env={**clean, **env},
                         capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(out.stdout)


def test_a_fresh_process_is_pinned_and_records_what_torch_runs() -> None:
    record = _record_in_fresh_process()
    assert {k: record[k] for k in kernels.PINS} == kernels.PINS
    assert record["torch"] == torch.backends.cpu.get_cpu_capability()  # this process is pinned
    assert not record["torch"].startswith(kernels.ABOVE_PIN)


def test_a_setting_from_the_environment_wins_and_is_recorded() -> None:
    """Set on purpose (here: torch's plain C++ kernels), it is kept, and the build's config
    says so, hence its manifest differs from an AVX2 build's."""
    record = _record_in_fresh_process(ATEN_CPU_CAPABILITY="default")
    assert record["ATEN_CPU_CAPABILITY"] == "default"
    assert record["torch"] == "NO AVX"


def test_a_build_refuses_kernels_above_the_pin(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch started before pin() on an AVX-512 machine (no such CPU here: the capability is
    faked) must not build silently."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    with pytest.raises(BuildError, match="AVX512 kernels") as info:
        kernels.check()
    assert "zoo.build.kernels.pin()" in info.value.hint


def test_numpy_started_before_the_pin_is_refused() -> None:
    """OpenBLAS reads its pin when numpy starts: a build in a process that imported numpy
    first (the Python API, not `zoo build`) must not record a pin it does not run."""
    clean = {k: v for k, v in os.environ.items() if k not in kernels.PINS}
    own = ("import numpy, threadpoolctl; print(*{i['architecture'] for i in "
           "threadpoolctl.threadpool_info() if i['internal_api'] == 'openblas'})")  # fmt: skip
    core = subprocess.run([sys.executable, "-c", own], env=clean, capture_output=True,
                          text=True, check=True).stdout.strip()  # fmt: skip
    if core.lower() == kernels.PINS["OPENBLAS_CORETYPE"].lower():
        pytest.skip(f"this CPU's own OpenBLAS kernels ({core}) are the pinned ones")
    late = "import numpy; from zoo.build import kernels; kernels.pin(); kernels.check()"
    out = subprocess.run([sys.executable, "-c", late], env=clean, capture_output=True, text=True)
    assert out.returncode != 0 and f"OpenBLAS runs its {core} kernels" in out.stderr


def test_steal_and_others_are_shares_of_the_machines_cpu_time() -> None:
    Ticks = machine.Ticks
    before, after = Ticks(10, 1_000, 400, 300), Ticks(60, 1_200, 560, 400)
    assert machine.steal(before, after) == 0.25  # 50 of 200 ticks went to other guests
    assert machine.others(before, after) == 0.3  # 160 busy, 100 of them this process's own
    assert machine.steal(before, before) is None  # no time passed: nothing to tell
    assert machine.others(None, after) is None
    # /proc/stat's first line: user nice system idle iowait irq softirq steal guest guest_nice
    stat = "cpu  700 1 100 150 20 0 4 25 9 9\ncpu0 350 0 50 75 10 0 2 12 0 0\n"
    ticks = machine.cpu_ticks(stat)
    assert ticks is not None and ticks[:3] == (25, 1_000, 805)  # guest time is in user time
    assert machine.cpu_ticks("intr 12 3") is None and machine.cpu_ticks("") is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/stat")
def test_a_busy_process_beside_a_timed_run_shows_as_others() -> None:
    """A process spinning on one core while this one sleeps counts as others' CPU time (a core's
    worth, 0.5 of a 2-core machine; at least a quarter of a core where tests share the cores),
    not as this process's."""
    spin = "import time\nend = time.time() + 1.5\nwhile time.time() < end: pass"
    child = subprocess.Popen([sys.executable, "-c", spin])
    try:
        before = machine.cpu_ticks()
        time.sleep(1.0)
        after = machine.cpu_ticks()
    finally:
        child.wait()
    share = machine.others(before, after)
    assert share is not None and share >= 0.25 / (os.cpu_count() or 1)
    assert after is not None and before is not None and after.own - before.own < 20  # slept
