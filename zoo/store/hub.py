"""Hubs: where builds are published and pulled from. One small interface, three backends.

- :class:`LocalHub` (the embedded default): a directory under ``$ZOO_HOME/hub`` laid out as
  ``ORG/REPO/revisions/<content hash>/<files>``. Revisions are content-addressed and immutable;
  a publish writes into a temporary folder and appears with one ``rename``.
- :class:`HfHub`: the Hugging Face Hub protocol through ``huggingface_hub``; a publish is one
  ``create_commit`` with ``parent_commit`` (it fails if someone pushed meanwhile) and every
  download names an explicit 40-hex revision.
- :class:`zoo.store.releases.ReleaseStore`: ``releases/`` in the source tree, files by sha256; the
  store a fresh clone pulls from when no hub holds a build.

This is the only module that imports ``huggingface_hub`` (lazily: listing and warm pulls never
pay for it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from zoo import config
from zoo.catalog.registry import FileEntry, HubRef
from zoo.errors import HubError, InputError, IntegrityError, NotFoundError
from zoo.store.atomic import replace_synced, sync
from zoo.store.hashing import copy_hashed, sha256_file

#: A repository name on a hub: ORG/REPO, as the registry schema allows it.
REPO_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
#: A staging folder or file older than this belongs to a publish that was killed.
STALE_SECONDS = 3600


def remove_stale(folder: Path) -> None:
    """Remove what killed publishes left in ``folder`` (``.tmp-*`` older than an hour)."""
    for stale in folder.glob(".tmp-*"):
        with contextlib.suppress(OSError):
            if time.time() - stale.lstat().st_mtime > STALE_SECONDS:
                if stale.is_dir() and not stale.is_symlink():
                    shutil.rmtree(stale)
                else:
                    stale.unlink()


def copy_pinned(source: Path, target: Path, entry: FileEntry) -> None:
    """Copy ``source`` to ``target``, refusing bytes that are not ``entry``'s pinned ones."""
    with open(source, "rb") as src, open(target, "wb") as dst:
        size, digest = copy_hashed(src, dst)
    check_unchanged(source, size, digest, entry)


def check_unchanged(source: Path, size: int, digest: str, entry: FileEntry) -> None:
    """Refuse to publish ``source`` when the bytes about to go (``size``, ``digest``) are no
    longer the ones its manifest pinned."""
    if (size, digest) != (entry.size, entry.sha256):
        raise IntegrityError(
            f"{source} changed while publishing (now {size} bytes, {digest})",
            hint="rebuild, then publish again",
        )


class Hub(Protocol):
    """What `zoo` needs from a hub."""

    kind: str

    def publish(self, repo: str, files: list[tuple[Path, FileEntry]], message: str) -> str:
        """Upload ``files`` as one new immutable revision of ``repo``; return the revision."""
        ...

    def download(
        self, repo: str, revision: str, entries: list[FileEntry], staging: Path, progress: bool
    ) -> dict[str, Path]:
        """Write each entry into ``staging``; return path by file name. No verification here."""
        ...


def content_revision(entries: list[FileEntry]) -> str:
    """The local hub's revision: sha256 over the sorted (path, role, size, sha256) listing."""
    listing = "".join(
        f"{e.path}\t{e.role}\t{e.size}\t{e.sha256}\n" for e in sorted(entries, key=lambda e: e.path)
    )
    return hashlib.sha256(listing.encode()).hexdigest()


def _progress_bar(total: int, desc: str, enabled: bool):  # noqa: ANN202 - tqdm type
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not enabled, leave=False)


@dataclass
class LocalHub:
    """A directory hub (default ``$ZOO_HOME/hub``)."""

    root: Path
    kind: str = "local"

    @classmethod
    def default(cls) -> LocalHub:
        """The hub under ``$ZOO_HOME``."""
        return cls(config.hub_dir())

    def revision_dir(self, repo: str, revision: str) -> Path:
        """Folder holding the files of one revision."""
        return self.root / repo / "revisions" / revision

    def publish(self, repo: str, files: list[tuple[Path, FileEntry]], message: str) -> str:
        """Copy files (verifying them) into a temp folder, then rename it into place."""
        revision = content_revision([entry for _, entry in files])
        final = self.revision_dir(repo, revision)
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(final.parent)
        if final.is_dir():  # content-addressed: the same bytes, unless damaged since
            self._repair(final, files)
            return revision
        staging = final.parent / f".tmp-{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            for source, entry in files:
                copy_pinned(source, staging / entry.path, entry)
            meta = {"message": message, "files": [e.__dict__ for _, e in files]}
            (staging / ".zoo-revision.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
            for written in [*staging.iterdir(), staging]:  # on disk before the rename shows it
                sync(written)
            try:
                os.rename(staging, final)
            except OSError:
                if not final.is_dir():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return revision

    @staticmethod
    def _repair(final: Path, files: list[tuple[Path, FileEntry]]) -> None:
        """Replace the files of a published revision that no longer match their pins."""
        for source, entry in files:
            target = final / entry.path
            if target.is_file() and sha256_file(target) == entry.sha256:
                continue
            tmp = final.parent / f".tmp-{uuid.uuid4().hex}"  # where remove_stale looks
            try:
                copy_pinned(source, tmp, entry)
                replace_synced(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)

    def download(
        self, repo: str, revision: str, entries: list[FileEntry], staging: Path, progress: bool
    ) -> dict[str, Path]:
        """Copy each file out of the revision folder into ``staging``."""
        folder = self.revision_dir(repo, revision)
        if not folder.is_dir():
            raise NotFoundError(
                f"the local hub at {self.root} has no revision {revision[:12]} of {repo}",
                hint="publish it there with `zoo publish BUILD_DIR`, or pull from the hub that "
                "holds it (--hub-dir / ZOO_HOME), or rebuild it with --build-missing",
            )
        out = {}
        with _progress_bar(sum(e.size for e in entries), repo, progress) as bar:
            for entry in entries:
                source = folder / entry.path
                if not source.is_file():
                    raise NotFoundError(f"{repo}@{revision[:12]} has no file {entry.path}")
                with open(source, "rb") as src, open(staging / entry.path, "wb") as dst:
                    copy_hashed(src, dst, bar.update)
                out[entry.path] = staging / entry.path
        return out


@dataclass
class HfHub:
    """A hub speaking the Hugging Face protocol, through ``huggingface_hub``."""

    endpoint: str
    token: str | None = None
    kind: str = "hf"

    @classmethod
    def default(cls, endpoint: str | None = None) -> HfHub:
        """Endpoint from the argument, else ``ZOO_HF_ENDPOINT``; token from ``HF_TOKEN``."""
        return cls(endpoint or config.hf_endpoint(), config.hf_token())

    def _api(self):  # noqa: ANN202 - HfApi, imported lazily
        from huggingface_hub import HfApi

        return HfApi(endpoint=self.endpoint, token=self.token)

    def publish(self, repo: str, files: list[tuple[Path, FileEntry]], message: str) -> str:
        """One atomic commit on ``main`` whose parent is the head we saw; return its sha."""
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        api = self._api()
        with _hub_errors(self.endpoint, repo):
            api.create_repo(repo, exist_ok=True)
            head = api.model_info(repo, revision="main")
            keep = {entry.path for _, entry in files}
            stale = [
                CommitOperationDelete(path_in_repo=s.rfilename)
                for s in head.siblings or []
                if s.rfilename not in keep and s.rfilename != ".gitattributes"
            ]
            adds = [
                CommitOperationAdd(path_in_repo=entry.path, path_or_fileobj=str(source))
                for source, entry in files
            ]
            for add, (source, entry) in zip(adds, files):  # hashed now, as it will be sent
                info = add.upload_info
                check_unchanged(source, info.size, f"sha256:{info.sha256.hex()}", entry)
            info = api.create_commit(
                repo, operations=adds + stale, commit_message=message, parent_commit=head.sha
            )
        return info.oid

    def download(
        self, repo: str, revision: str, entries: list[FileEntry], staging: Path, progress: bool
    ) -> dict[str, Path]:
        """``snapshot_download`` of exactly these files at the pinned revision into ``staging``
        (parallel transfers, huggingface_hub's retries and progress bars); a file that the
        commit lacks is a :class:`NotFoundError` (huggingface_hub only logs it)."""
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

        if len(revision) != 40:
            raise NotFoundError(f"{revision} is not a Hugging Face commit (40 hex digits)")
        (enable_progress_bars if progress else disable_progress_bars)()
        with _hub_errors(self.endpoint, repo):
            snapshot_download(
                repo,
                revision=revision,
                allow_patterns=[entry.path for entry in entries],  # plain names: no glob chars
                endpoint=self.endpoint,
                token=self.token,
                local_dir=staging,
            )
        absent = [entry.path for entry in entries if not (staging / entry.path).is_file()]
        if absent:
            raise NotFoundError(f"{repo}@{revision[:12]} has no file {', '.join(absent)}")
        return {entry.path: staging / entry.path for entry in entries}


#: The HTTP stack under huggingface_hub (its name changes across versions: httpx / httpx2).
TRANSPORT_MODULES = {"httpx", "httpx2", "httpcore", "httpcore2", "h11", "requests", "urllib3"}


@contextlib.contextmanager
def _hub_errors(endpoint: str, repo: str):  # noqa: ANN202
    """Turn huggingface_hub's exceptions into HubError / NotFoundError with a next step."""
    from huggingface_hub import errors

    try:
        yield
    except errors.HFValidationError as exc:  # a name our pattern allows and the Hub does not
        raise HubError(
            f"{repo} is not a repository name {endpoint} accepts: {str(exc).splitlines()[0]}",
            hint="name the repository as the Hub allows (no '--' or '..', no leading or "
            "trailing '-' or '.', at most 96 characters)",
        ) from None
    except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError) as exc:
        raise NotFoundError(
            f"{endpoint} has no {repo} at that revision ({type(exc).__name__}; a private or "
            "gated repository answers so without a token)",
            hint="check --endpoint / ZOO_HF_ENDPOINT, the registry's pin, and HF_TOKEN",
        ) from None
    except errors.LocalEntryNotFoundError as exc:  # a subclass of EntryNotFoundError: first
        cause = exc.__cause__ or exc
        raise HubError(
            f"cannot get a file of {repo} from {endpoint}: {str(cause).splitlines()[0]}",
            hint="retry later, or use --offline with what is cached; the cache was left as it was",
        ) from None
    except errors.EntryNotFoundError as exc:
        raise NotFoundError(f"{endpoint}: a file of {repo} is missing: {exc}") from None
    except errors.HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        raise HubError(
            f"{endpoint} answered HTTP {status} for {repo}: {str(exc).splitlines()[0]}",
            hint="retry later; the cache was left as it was",
        ) from None
    except OSError as exc:
        if isinstance(exc, (FileNotFoundError, PermissionError)):
            raise
        raise HubError(
            f"cannot reach {endpoint} for {repo}: {exc}",
            hint="check the network, or use --offline with what is cached",
        ) from None
    except Exception as exc:
        if type(exc).__module__.split(".")[0] not in TRANSPORT_MODULES:
            raise
        raise HubError(
            f"transfer from {endpoint} for {repo} broke off: {exc}",
            hint="pull again; nothing incomplete was kept in the cache",
        ) from None


def parse_hub(spec: str, variant: str, registry_path: Path | None = None) -> tuple[Hub, str]:
    """``local`` → (LocalHub, "zoo/VARIANT"); ``hf://ORG/REPO`` → (HfHub, "ORG/REPO");
    ``releases`` → (the release store beside the registry, "zoo/VARIANT")."""
    if spec == "local":
        return LocalHub.default(), f"zoo/{variant}"
    if spec == "releases":
        from zoo.store.releases import ReleaseStore

        return ReleaseStore.beside(registry_path), f"zoo/{variant}"
    if spec.startswith("hf://"):
        from huggingface_hub.errors import HFValidationError
        from huggingface_hub.utils import validate_repo_id

        repo = spec[len("hf://") :]
        try:
            valid = bool(REPO_RE.fullmatch(repo)) and ".." not in repo
            validate_repo_id(repo)
        except HFValidationError:
            valid = False
        if not valid:
            raise InputError(
                f"bad hub {spec!r}",
                hint="write it as hf://ORG/REPO (letters, digits, '.', '_' and '-'; no '--' or "
                "'..', no leading or trailing '-' or '.', at most 96 characters)",
            )
        return HfHub.default(), repo
    raise InputError(f"unknown hub {spec!r}", hint="use `releases`, `local` or `hf://ORG/REPO`")


def hub_for(ref: HubRef, endpoint: str | None = None, hub_dir: Path | None = None) -> Hub:
    """The hub that a build's hub record names."""
    if ref.kind == "local":
        return LocalHub(hub_dir) if hub_dir is not None else LocalHub.default()
    return HfHub.default(endpoint)
