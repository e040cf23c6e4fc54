"""Deterministic client/server zips of a real compiled model, and real FHE on them.

The model is tiny (3-bit input, one 4->4 3x3 conv with 2-bit weights, one linear layer, exact
4-bit rounding), so compiling takes under a second and key generation a couple of seconds.

Run as a script (``python tests/test_package.py OUT_DIR``) it compiles the same model and writes
the zips into OUT_DIR: the cross-process determinism test does that in a fresh interpreter.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # for the script mode
    sys.path.insert(0, str(ROOT))

from zoo.build.package import (  # noqa: E402
    ZIP_DATE_TIME,
    canonical_skops_bytes,
    circuit_statistics,
    write_fhe_zips,
)

ROUNDING = {"n_bits": 4, "method": "exact"}
INPUT_SHAPE = (4, 6, 6)


def build_tiny_module() -> tuple[Any, np.ndarray]:
    """Compile the tiny brevitas model on seeded random data; return (module, calibration)."""
    import brevitas.nn as qnn
    import torch
    from concrete.ml.torch.compile import compile_brevitas_qat_model
    from torch import nn

    class Tiny(nn.Module):
        """QuantIdentity -> QuantConv2d(4->4) -> QuantIdentity -> flatten -> QuantLinear(->10)."""

        def __init__(self) -> None:
            super().__init__()
            self.q_in = qnn.QuantIdentity(bit_width=3, return_quant_tensor=True)
            self.conv = qnn.QuantConv2d(4, 4, 3, weight_bit_width=2, bias=False)
            self.q_mid = qnn.QuantIdentity(bit_width=3, return_quant_tensor=True)
            self.fc = qnn.QuantLinear(4 * 4 * 4, 10, bias=True, weight_bit_width=2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            """Forward pass."""
            return self.fc(self.q_mid(self.conv(self.q_in(x))).flatten(1))

    torch.manual_seed(0)
    model = Tiny().eval()
    calibration = np.random.default_rng(0).standard_normal((20, *INPUT_SHAPE)).astype(np.float32)
    module = compile_brevitas_qat_model(model, calibration, rounding_threshold_bits=ROUNDING)
    return module, calibration


def sha256(path: Path) -> str:
    """Hex sha256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def zip_digests(out_dir: Path) -> dict[str, str]:
    """sha256 of client.zip and server.zip in ``out_dir``."""
    return {name: sha256(out_dir / name) for name in ("client.zip", "server.zip")}


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, np.ndarray]:
    """The compiled tiny model (compiled once for this module)."""
    return build_tiny_module()


@pytest.fixture(scope="module")
def zips(tiny: tuple[Any, np.ndarray], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the model's rewritten client.zip and server.zip."""
    out = tmp_path_factory.mktemp("fhe-zips")
    paths = write_fhe_zips(tiny[0], out)
    assert set(paths) == {"client.zip", "server.zip"}
    return out


def test_zips_are_identical_when_written_twice(zips: Path, tiny: Any, tmp_path: Path) -> None:
    write_fhe_zips(tiny[0], tmp_path)
    assert zip_digests(tmp_path) == zip_digests(zips)


def test_zips_are_identical_across_processes(zips: Path, tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONHASHSEED="12345")
    subprocess.run(
        [sys.executable, __file__, str(tmp_path)], check=True, env=env, capture_output=True
    )
    assert zip_digests(tmp_path) == zip_digests(zips)


def test_zip_container_is_normalised(zips: Path) -> None:
    for name in ("client.zip", "server.zip"):
        with zipfile.ZipFile(zips / name) as archive:
            infos = archive.infolist()
            assert [i.filename for i in infos] == sorted(i.filename for i in infos)
            for info in infos:
                assert info.date_time == ZIP_DATE_TIME
                assert info.external_attr >> 16 == 0o100644
                assert info.compress_type == zipfile.ZIP_DEFLATED
                assert info.extra == b""
    with zipfile.ZipFile(zips / "server.zip") as archive:
        assert "circuit.mlir" in archive.namelist()
        assert not any(n.endswith(".so") for n in archive.namelist())


def test_embedded_skops_blob_is_canonical(zips: Path) -> None:
    with zipfile.ZipFile(zips / "client.zip") as archive:
        processing = json.loads(archive.read("serialized_processing.json"))
    blob = bytes.fromhex(processing["model_type"]["serialized_value"])
    assert canonical_skops_bytes(blob) == blob
    with zipfile.ZipFile(io.BytesIO(blob)) as inner:
        assert inner.getinfo("schema.json").date_time == ZIP_DATE_TIME
        schema = json.loads(inner.read("schema.json"))
    assert schema["__id__"] == 1


def test_real_fhe_from_rewritten_zips_matches_simulation(zips: Path, tiny: Any) -> None:
    from concrete.ml.deployment import FHEModelClient, FHEModelServer

    module, calibration = tiny
    x = calibration[:1]
    client = FHEModelClient(str(zips))
    server = FHEModelServer(str(zips))
    client.generate_private_and_evaluation_keys()
    evaluation_keys = client.get_serialized_evaluation_keys()
    encrypted = client.quantize_encrypt_serialize(x)
    result = client.deserialize_decrypt_dequantize(server.run(encrypted, evaluation_keys))
    np.testing.assert_array_equal(result, module.forward(x, fhe="simulate"))


def test_circuit_statistics_shape(tiny: Any) -> None:
    stats = circuit_statistics(tiny[0])
    assert json.loads(json.dumps(stats)) == stats
    assert list(stats) == sorted(stats)
    assert stats["max_bit_width"] == tiny[0].fhe_circuit.graph.maximum_integer_bit_width()
    assert stats["pbs_count"] == tiny[0].fhe_circuit.statistics["programmable_bootstrap_count"]
    assert sum(stats["pbs_count_by_bit_width"].values()) == stats["pbs_count"]
    assert stats["pbs_count_by_bit_width_unattributed"] == 0
    assert stats["pbs_count_by_bit_width"]["4"] == 4 * 4 * 4  # one 4-bit lookup per conv output
    assert stats["eval_key_bytes"] == (
        stats["size_of_bootstrap_keys"] + stats["size_of_keyswitch_keys"]
    )
    assert stats["rounding_threshold_n_bits"] == [4]
    assert {"p_error", "global_p_error", "concrete_statistics"} <= set(stats)
    parameter = stats["pbs_count_per_parameter"][0]["parameter"]
    assert {"polynomial_size", "glwe_dimension", "input_lwe_dimension", "level", "base_log"} <= set(
        parameter
    )


if __name__ == "__main__":
    write_fhe_zips(build_tiny_module()[0], Path(sys.argv[1]))
