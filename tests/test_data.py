"""The CIFAR loader (zoo.build.data) on the real materialized archives."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from zoo import errors
from zoo.build import data

SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def test_cifar10_shapes_and_labels(cifar_dir: Path) -> None:
    """Train/test splits have the official sizes, dtypes and label range."""
    x, y = data.load_cifar10(cifar_dir, "train")
    assert x.shape == (50_000, 32, 32, 3) and x.dtype == np.uint8
    assert y.shape == (50_000,) and y.dtype == np.int64
    assert y.min() == 0 and y.max() == 9
    assert np.bincount(y).tolist() == [5000] * 10
    xt, yt = data.load_cifar10(cifar_dir, "test")
    assert xt.shape == (10_000, 32, 32, 3) and yt.shape == (10_000,)
    assert np.bincount(yt).tolist() == [1000] * 10


def test_cifar10_official_order(cifar_dir: Path) -> None:
    """Labels are in the official order (compared with the shared offline copy)."""
    ref = np.load(SHARED_DATA / "cifar10_jpeg_q75_official_order.npz")
    _, y = data.load_cifar10(cifar_dir, "train")
    _, yt = data.load_cifar10(cifar_dir, "test")
    np.testing.assert_array_equal(y, ref["train_labels"].astype(np.int64))
    np.testing.assert_array_equal(yt, ref["test_labels"].astype(np.int64))
    # The well-known first labels of the official files.
    assert yt[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    assert y[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]


def test_cifar10_layout_is_nhwc(cifar_dir: Path) -> None:
    """Rows (R plane, G plane, B plane) are turned into NHWC pixels."""
    raw = data.restricted_load(cifar_dir / data.CIFAR10_DIRNAME / "test_batch")
    row = raw[b"data"][0]
    x, _ = data.load_cifar10(cifar_dir, "test")
    assert x[0, 0, 0].tolist() == [row[0], row[1024], row[2048]]
    assert x[0, 0, 1, 0] == row[1]


def test_class_names(cifar_dir: Path) -> None:
    """Class names come from batches.meta / meta."""
    names = data.cifar_class_names(cifar_dir, "cifar10")
    assert names[:3] == ["airplane", "automobile", "bird"] and len(names) == 10
    fine = data.cifar_class_names(cifar_dir, "cifar100")
    assert len(fine) == 100 and fine[0] == "apple"
    assert len(data.cifar_class_names(cifar_dir, "cifar100", label="coarse")) == 20


def test_cifar100_partial_is_detected(cifar_dir: Path) -> None:
    """The partial CIFAR-100 copy loads, says it is partial, and refuses full-set use."""
    x, y = data.load_cifar100(cifar_dir, "test")
    assert x.shape[1:] == (32, 32, 3) and 0 < len(y) < 10_000
    assert y.max() < 100
    _, yc = data.load_cifar100(cifar_dir, "test", label="coarse")
    assert yc.max() < 20
    split = data.load_cifar100_split(cifar_dir, "train")
    assert not split.is_complete and split.n < 50_000
    with pytest.raises(errors.PartialDatasetError, match="partial"):
        data.require_complete(split)


def test_missing_data_message(tmp_path: Path) -> None:
    """A missing directory names what was expected and how to get it, as a zoo error (exit
    code 3 with its message, not a traceback) that is also a FileNotFoundError."""
    with pytest.raises(FileNotFoundError) as err:
        data.load_cifar10(tmp_path, "train")
    assert isinstance(err.value, errors.NotFoundError) and err.value.exit_code == 3
    msg = str(err.value)
    assert "cifar-10-batches-py" in msg and data.CIFAR_URL in msg
    assert "materialize_cifar.py" in msg
    (tmp_path / "cifar-100-python").mkdir()
    with pytest.raises(FileNotFoundError, match="'train'"):
        data.load_cifar100(tmp_path, "train")


def test_bad_split() -> None:
    """Only 'train' and 'test' exist."""
    with pytest.raises(ValueError):
        data.load_cifar10(Path("."), "valid")  # type: ignore[arg-type]


class _Evil:
    """Unpickling this would run a shell command."""

    def __reduce__(self):  # noqa: D105
        return (os.system, ("echo pwned > /dev/null",))


def test_restricted_unpickler_refuses_code(tmp_path: Path) -> None:
    """A pickle that calls os.system is refused before anything runs."""
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": _Evil(), b"labels": [0]}))
    with pytest.raises(errors.UnsafePickleError, match="system"):
        data.restricted_load(path)
    # The same file inside a data directory fails the load the same way.
    root = tmp_path / "d" / data.CIFAR10_DIRNAME
    root.mkdir(parents=True)
    path.replace(root / "test_batch")
    with pytest.raises(errors.UnsafePickleError):
        data.load_cifar10(tmp_path / "d", "test")


@pytest.mark.parametrize("target", ["builtins.eval", "subprocess.Popen", "numpy.load"])
def test_restricted_unpickler_refuses_other_globals(tmp_path: Path, target: str) -> None:
    """Any global outside the numpy-array allow-list is refused, numpy's own included."""
    module, name = target.rsplit(".", 1)
    payload = f"c{module}\n{name}\n(S'1'\ntR.".encode()  # protocol-0 GLOBAL + REDUCE
    path = tmp_path / "p"
    path.write_bytes(payload)
    with pytest.raises(errors.UnsafePickleError):
        data.restricted_load(path)


def test_restricted_unpickler_reads_numpy_arrays(tmp_path: Path) -> None:
    """Plain containers and numpy arrays (all protocols) still load."""
    obj = {b"data": np.arange(12, dtype=np.uint8).reshape(2, 6), b"labels": [1, 2], "s": "x"}
    for protocol in (2, 4, 5):
        path = tmp_path / f"p{protocol}"
        path.write_bytes(pickle.dumps(obj, protocol=protocol))
        back = data.restricted_load(path)
        np.testing.assert_array_equal(back[b"data"], obj[b"data"])
        assert back[b"labels"] == [1, 2]


def test_fingerprint() -> None:
    """The fingerprint covers dtype, shape and bytes."""
    x = np.zeros((2, 32, 32, 3), np.uint8)
    y = np.array([0, 1], np.int64)
    fp = data.fingerprint(x, y)
    assert fp.startswith("sha256:") and len(fp) == 7 + 64
    assert data.fingerprint(x.copy(), y.copy()) == fp
    assert data.fingerprint(x, y.astype(np.int32)) != fp
    assert data.fingerprint(x.reshape(2, 3, 32, 32), y) != fp
    x2 = x.copy()
    x2[1, 5, 5, 1] = 1
    assert data.fingerprint(x2, y) != fp


def test_data_module_does_not_import_torch() -> None:
    """Listing commands stay fast: zoo.build.data needs numpy only."""
    code = "import sys, zoo.build.data; assert 'torch' not in sys.modules"
    subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent
    )


def test_a_damaged_batch_is_an_integrity_error(cifar_dir: Path, tmp_path: Path) -> None:
    """A truncated or reshaped batch file fails as damaged data (exit 4, with how to get it
    again), not as a traceback of the unpickler."""
    root = tmp_path / data.CIFAR10_DIRNAME
    root.mkdir()
    real = (cifar_dir / data.CIFAR10_DIRNAME / "test_batch").read_bytes()
    batch = data.restricted_load(cifar_dir / data.CIFAR10_DIRNAME / "test_batch")
    half = {b"data": batch[b"data"][:5000], b"labels": batch[b"labels"][:5000]}  # truncated
    eleven = {b"data": batch[b"data"][:2], b"labels": [0, 11]}  # a label CIFAR-10 lacks
    for damage in (real[: len(real) // 2], pickle.dumps({b"data": [1, 2], b"labels": [0]}),
                   pickle.dumps([1, 2, 3]), pickle.dumps(half), pickle.dumps(eleven)):  # fmt: skip
        (root / "test_batch").write_bytes(damage)
        with pytest.raises(errors.IntegrityError, match="damaged or not a CIFAR batch") as err:
            data.load_cifar10(tmp_path, "test")
        assert err.value.exit_code == 4 and "materialize_cifar.py" in err.value.hint
