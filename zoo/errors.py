"""The exceptions `zoo` raises. Each carries a message (what went wrong) and a hint (what to do).

The CLI turns them into one line plus the hint, and exits with the class's ``exit_code``.
"""

from __future__ import annotations

import pickle


class ZooError(Exception):
    """Base class: a failure the user can act on."""

    exit_code: int = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class InputError(ZooError):
    """Bad input or usage: a malformed name, an image of the wrong shape, a bad option."""

    exit_code = 2


class KeyIdError(InputError):
    """A key id that is not 64 lowercase hex digits (the sha256 of the keys)."""


class RegistryError(ZooError):
    """registry.json is missing or fails its schema."""

    exit_code = 3


class NotFoundError(ZooError):
    """A variant, build, revision or file that does not exist."""

    exit_code = 3


class YankedError(NotFoundError):
    """A build withdrawn from the registry (its entry says why)."""


class DatasetNotFoundError(NotFoundError, FileNotFoundError):
    """A CIFAR archive folder or file that is not where the data directory says."""


class PartialDatasetError(NotFoundError):
    """The full data set is required but only a partial copy is present."""


class IntegrityError(ZooError):
    """Bytes that do not match their pinned size or sha256."""

    exit_code = 4


class UnsafeArchiveError(IntegrityError):
    """A zip archive that tries to escape its destination or exceed limits."""


class UnsafeArtifactError(IntegrityError):
    """A zip of a build holds what the artifact gate does not allow to be deserialized."""


class UnsafePickleError(IntegrityError, pickle.UnpicklingError):
    """A CIFAR pickle that references a global outside the allow-list."""


class RuntimeMismatchError(ZooError):
    """No build matches the installed concrete-ml / concrete-python / Python versions."""

    exit_code = 5


class OfflineError(ZooError):
    """Offline mode, and the cache lacks what is needed."""

    exit_code = 6


class HubError(ZooError):
    """A hub refused a request or could not be reached."""

    exit_code = 7


class BuildError(ZooError):
    """A build failed a check (bit-width bound, manifest mismatch, data missing)."""

    exit_code = 8


class RecipeConfigError(BuildError, ValueError):
    """A recipe's config that cannot be built: an unknown arch, parameter or profile key, a
    value out of range (from registry.json's ``recipe.params`` or the recipe's tables)."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(
            message,
            hint
            or "fix the variant's recipe.params (profile_overrides "
            "included) in registry.json, or the recipe's own tables",
        )


class BitWidthBoundError(BuildError):
    """The compiled circuit needs wider integers than the variant's accumulator bound."""


class BuildPaused(ZooError):
    """Not a failure: a build stopped at a checkpoint as asked (``--stop-after``,
    ``--train-only``); the same command with ``--resume`` continues it."""

    exit_code = 10


class ServerError(ZooError):
    """A `zoo serve` server refused a request, could not be reached, or runs another build."""

    exit_code = 9
