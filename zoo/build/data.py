"""Loading code for the official CIFAR-10 / CIFAR-100 python archives.

The archives published at https://www.cs.toronto.edu/~kriz/cifar.html are Python pickles:

- ``cifar-10-batches-py/{data_batch_1..5, test_batch}``: dicts with ``b"data"`` (N x 3072 uint8,
  channel-major rows: R plane, G plane, B plane) and ``b"labels"`` (list of int);
  ``batches.meta`` holds ``b"label_names"``.
- ``cifar-100-python/{train, test}``: dicts with ``b"data"``, ``b"fine_labels"`` and
  ``b"coarse_labels"``; ``meta`` holds ``b"fine_label_names"`` / ``b"coarse_label_names"``.

Unpickling arbitrary files can execute arbitrary code, so every file goes through
:class:`RestrictedUnpickler`, which only lets through what these archives need (numpy array
reconstruction and dtypes; dicts, lists, bytes and numbers need no globals at all) and refuses
everything else with :class:`UnsafePickleError`.

This module depends on numpy only (no torch), so that listing commands stay fast.
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from zoo.errors import (
    DatasetNotFoundError,
    IntegrityError,
    PartialDatasetError,
    UnsafePickleError,
)

__all__ = [
    "CIFAR_URL",
    "CIFAR10_DIRNAME",
    "CIFAR100_DIRNAME",
    "CIFAR10_TRAIN_SIZE",
    "CIFAR100_TRAIN_SIZE",
    "CIFAR100_TEST_SIZE",
    "CifarSplit",
    "RestrictedUnpickler",
    "cifar_class_names",
    "fingerprint",
    "load_cifar10",
    "load_cifar100",
    "load_cifar100_split",
    "require_complete",
    "restricted_load",
]

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
CIFAR10_DIRNAME = "cifar-10-batches-py"
CIFAR100_DIRNAME = "cifar-100-python"
CIFAR10_TRAIN_SIZE = 50_000
CIFAR10_TEST_SIZE = 10_000
CIFAR10_BATCH_SIZE = 10_000  # every file of the official archive
CIFAR100_TRAIN_SIZE = 50_000
CIFAR100_TEST_SIZE = 10_000
_CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR10_TEST_FILES = ("test_batch",)

Split = Literal["train", "test"]
Dataset = Literal["cifar10", "cifar100"]

# The only globals the official archives (python 2 pickles, and the numpy >= 1.x / 2.x
# re-pickled copies) reference. Everything else is refused.
_ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        # Protocol-5 pickles rebuild arrays from a buffer.
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        # Protocol-2 pickles written by python 3 encode bytes payloads via _codecs.encode
        # (a pure str -> bytes conversion).
        ("_codecs", "encode"),
    }
)


class RestrictedUnpickler(pickle.Unpickler):
    """A ``pickle.Unpickler`` that resolves only numpy array reconstruction globals.

    Containers (dict, list, tuple), bytes, str and numbers are built by pickle opcodes without
    any global lookup, so they need no allow-list entry.
    """

    def find_class(self, module: str, name: str) -> Any:
        """Resolve ``module.name`` only if it is on the allow-list, else raise."""
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"refusing to unpickle global {module}.{name}: CIFAR archives only need numpy "
            "array reconstruction (numpy.core.multiarray._reconstruct, numpy.ndarray, "
            "numpy.dtype and friends); this file is not an official CIFAR archive and may "
            "try to run code"
        )


def _how_to_get(dirname: str) -> str:
    return (
        f"Download and extract the official python archive from {CIFAR_URL} "
        f"(it unpacks to '{dirname}/'), or in this workspace run "
        "`python ../shared/data/materialize_cifar.py DIR` and pass DIR as the data directory."
    )


def restricted_load(path: Path) -> Any:
    """Unpickle ``path`` with :class:`RestrictedUnpickler` (bytes keys kept as bytes).

    ``encoding="bytes"`` reads the python-2 pickles of the official archives as they were
    written (keys such as ``b"data"``); python-3 pickles are unaffected by it.
    """
    with open(path, "rb") as f:
        obj = RestrictedUnpickler(f, encoding="bytes").load()
    return obj


def _get(d: dict[Any, Any], key: str, path: Path) -> Any:
    """Look up ``key`` as bytes or str (archives re-pickled under python 3 may use str)."""
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise KeyError(f"{path}: missing key {key!r} (found {sorted(map(repr, d))})")


def _dataset_dir(data_dir: Path, dirname: str) -> Path:
    data_dir = Path(data_dir)
    root = data_dir / dirname
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"expected the directory '{dirname}/' under '{data_dir}' ({root} does not exist). "
            + _how_to_get(dirname)
        )
    return root


def _read_batch(
    path: Path, label_key: str, dirname: str, n_classes: int, size: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One batch file: its images and labels, checked (labels in ``0..n_classes-1``; exactly
    ``size`` images if given) or refused as damaged."""
    if not path.is_file():
        raise DatasetNotFoundError(
            f"expected the archive file '{path.name}' in '{path.parent}' ({path} does not "
            "exist). " + _how_to_get(dirname)
        )
    try:
        images, labels = _parse_batch(restricted_load(path), path, label_key)
        if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
            raise ValueError(f"labels outside 0..{n_classes - 1}")
        if size is not None and len(labels) != size:
            raise ValueError(f"{len(labels)} images, not the official {size}")
        return images, labels
    except UnsafePickleError:
        raise
    except (EOFError, pickle.UnpicklingError, ValueError, KeyError, TypeError,
            RecursionError) as exc:  # fmt: skip
        raise IntegrityError(
            f"{path} is damaged or not a CIFAR batch ({type(exc).__name__}: {exc})",
            hint=_how_to_get(dirname),
        ) from None


def _parse_batch(batch: Any, path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a dict, got {type(batch).__name__}")
    data = np.asarray(_get(batch, "data", path))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(
            f"{path}: expected uint8 data of shape (N, 3072), got {data.dtype} {data.shape}"
        )
    labels = np.asarray(_get(batch, label_key, path), dtype=np.int64)
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{path}: {len(labels)} labels for {data.shape[0]} images")
    # Rows are channel-major (3 x 32 x 32); the loader returns NHWC.
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def load_cifar10(data_dir: Path, split: Split) -> tuple[np.ndarray, np.ndarray]:
    """Load CIFAR-10 from ``data_dir/cifar-10-batches-py``.

    Args:
        data_dir: directory that contains ``cifar-10-batches-py/``.
        split: ``"train"`` (data_batch_1..5, 50,000 images) or ``"test"`` (10,000 images).

    Returns:
        ``(images, labels)``: uint8 array (N, 32, 32, 3) in NHWC / RGB order and int64 labels
        (N,) in 0..9, in the official file order.
    """
    _check_split(split)
    root = _dataset_dir(data_dir, CIFAR10_DIRNAME)
    files = _CIFAR10_TRAIN_FILES if split == "train" else _CIFAR10_TEST_FILES
    parts = [_read_batch(root / name, "labels", CIFAR10_DIRNAME, 10, CIFAR10_BATCH_SIZE)
             for name in files]  # fmt: skip
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


@dataclass(frozen=True)
class CifarSplit:
    """One split of a CIFAR archive plus whether it is the complete official split."""

    images: np.ndarray
    labels: np.ndarray
    expected_size: int

    @property
    def is_complete(self) -> bool:
        """True if the split holds as many images as the official archive."""
        return len(self.labels) >= self.expected_size

    @property
    def n(self) -> int:
        """Number of images."""
        return len(self.labels)


def load_cifar100_split(
    data_dir: Path, split: Split, label: Literal["fine", "coarse"] = "fine"
) -> CifarSplit:
    """Like :func:`load_cifar100` but returns a :class:`CifarSplit` exposing ``is_complete``."""
    images, labels = load_cifar100(data_dir, split, label)
    expected = CIFAR100_TRAIN_SIZE if split == "train" else CIFAR100_TEST_SIZE
    return CifarSplit(images, labels, expected)


def load_cifar100(
    data_dir: Path, split: Split, label: Literal["fine", "coarse"] = "fine"
) -> tuple[np.ndarray, np.ndarray]:
    """Load CIFAR-100 from ``data_dir/cifar-100-python/{train,test}``.

    Args:
        data_dir: directory that contains ``cifar-100-python/``.
        split: ``"train"`` or ``"test"``.
        label: ``"fine"`` (100 classes) or ``"coarse"`` (20 super-classes).

    Returns:
        ``(images, labels)`` as in :func:`load_cifar10`. A partial copy (such as the one in
        this workspace) loads fine; use :func:`load_cifar100_split` / :func:`require_complete`
        to detect it.
    """
    _check_split(split)
    if label not in ("fine", "coarse"):
        raise ValueError(f"label must be 'fine' or 'coarse', got {label!r}")
    root = _dataset_dir(data_dir, CIFAR100_DIRNAME)
    n_classes = 100 if label == "fine" else 20
    return _read_batch(root / split, f"{label}_labels", CIFAR100_DIRNAME, n_classes)


def require_complete(split_data: CifarSplit, what: str = "CIFAR-100") -> CifarSplit:
    """Return ``split_data`` if complete, else raise :class:`PartialDatasetError`."""
    if not split_data.is_complete:
        raise PartialDatasetError(
            f"{what} has only {split_data.n} of {split_data.expected_size} images in this "
            "split: this is a partial copy (enough for loader tests and small evaluations, "
            f"not for training). Get the full official archive from {CIFAR_URL}."
        )
    return split_data


def load_split(data_dir: Path, dataset: Dataset, split: Split) -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)`` of ``dataset`` ("cifar10" or "cifar100", fine labels)."""
    if dataset == "cifar10":
        return load_cifar10(data_dir, split)
    if dataset == "cifar100":
        return load_cifar100(data_dir, split)
    raise ValueError(f"unknown dataset {dataset!r}; use 'cifar10' or 'cifar100'")


def cifar_class_names(data_dir: Path, dataset: Dataset, label: str = "fine") -> list[str]:
    """Class names from ``batches.meta`` (CIFAR-10) or ``meta`` (CIFAR-100, fine or coarse)."""
    if dataset == "cifar10":
        root = _dataset_dir(data_dir, CIFAR10_DIRNAME)
        path, key, dirname = root / "batches.meta", "label_names", CIFAR10_DIRNAME
    elif dataset == "cifar100":
        root = _dataset_dir(data_dir, CIFAR100_DIRNAME)
        path, key, dirname = root / "meta", f"{label}_label_names", CIFAR100_DIRNAME
    else:
        raise ValueError(f"dataset must be 'cifar10' or 'cifar100', got {dataset!r}")
    if not path.is_file():
        raise DatasetNotFoundError(
            f"expected the metadata file '{path.name}' in '{root}'. " + _how_to_get(dirname)
        )
    meta = restricted_load(path)
    names = _get(meta, key, path)
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def fingerprint(images: np.ndarray, labels: np.ndarray) -> str:
    """``"sha256:<hex>"`` over the exact arrays: dtype, shape and bytes of images then labels."""
    h = hashlib.sha256()
    for arr in (images, labels):
        arr = np.ascontiguousarray(arr)
        h.update(f"{arr.dtype.str}|{arr.shape}|".encode())
        h.update(arr.tobytes())
    return "sha256:" + h.hexdigest()
