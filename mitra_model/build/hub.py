"""Download stage: pin a Hugging Face repo revision to a commit and fetch a verified snapshot.

Two steps, both plain functions:

1. `resolve_revision` turns a branch, tag or commit into the full commit sha with one
   `HfApi.model_info(files_metadata=True)` call and records, for each required file, its size, its
   LFS sha256 and its git blob id. `ResolvedRevision.digests()` is what decides rebuilds: a commit
   that only edits README.md has a new sha but the same digests.
2. `download_snapshot` fetches only `REQUIRED_FILES`, by the resolved commit sha (never by branch
   name, so a push between the two steps cannot mix revisions), checks every byte against the hub's
   metadata (`hf_hub_download` itself only checks the size), and moves the folder into place
   atomically as `dest_root/<org>--<name>/<commit>/`.

Configuration comes from huggingface_hub, not from this module, which never reads `os.environ`:

- `endpoint=None` means huggingface_hub's default endpoint. huggingface_hub reads `HF_ENDPOINT`
  (e.g. a mirror) once, when it is first imported, so the variable must be set before the process
  starts (or before anything imports huggingface_hub); pass `endpoint=` to choose one per call.
- `token=None` means huggingface_hub's default token: `HF_TOKEN` (read at call time), else the token
  saved by `hf auth login`.
- `HF_HUB_OFFLINE=1` (also read at import) makes every request fail; we report it as unreachable.
- `HF_HUB_DOWNLOAD_TIMEOUT` (seconds without data while streaming a file, default 10) and
  `HF_HUB_DISABLE_PROGRESS_BARS` are honoured by huggingface_hub as usual.

Retries: `max_attempts` tries with exponential backoff (`retry_delay_s`, 2x, 4x, ...) on transient
failures only: connection errors, timeouts and HTTP 429/500/502/503/504. 401/403/404 are never
retried. Note that `hf_hub_download` already retries its own metadata (HEAD) request with a fixed
1-8 s backoff before it gives up with `LocalEntryNotFoundError`; we do not retry on top of that.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import huggingface_hub
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import (
    FileMetadataError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RevisionNotFoundError,
)
from tqdm.auto import tqdm

from mitra_model.errors import (
    ChecksumMismatchError,
    ConfigError,
    HubAuthError,
    HubError,
    HubNotFoundError,
    HubUnreachableError,
    MitraBuildError,
)

try:  # huggingface_hub 2.x talks HTTP through httpx2, 1.x through httpx: same exception names.
    import httpx2 as _http
except ImportError:  # pragma: no cover - depends on the installed huggingface_hub
    import httpx as _http  # type: ignore[no-redef]

__all__ = [
    "REQUIRED_FILES",
    "DownloadedSnapshot",
    "RemoteFile",
    "ResolvedRevision",
    "download_snapshot",
    "resolve_revision",
]

logger = logging.getLogger(__name__)

REQUIRED_FILES = ("config.json", "model.safetensors")

_TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
# The same set huggingface_hub retries on; ProxyError and UnsupportedProtocol are configuration errors.
_TRANSIENT_EXCEPTIONS = (_http.TimeoutException, _http.NetworkError, _http.RemoteProtocolError)
_COMMIT_RE = re.compile(r"[0-9a-f]{40}")
_CHUNK = 1 << 20  # bytes read per hashing step
_SNAPSHOT_HINT = (
    "To build without the hub, pass a local snapshot folder holding config.json and model.safetensors "
    "with `--snapshot DIR`, or set HF_ENDPOINT to a reachable mirror."
)

T = TypeVar("T")


@dataclass(frozen=True)
class RemoteFile:
    """One file of a repo at one commit, as the hub describes it.

    Attributes:
        path: path inside the repo, e.g. "model.safetensors".
        size: size of the real content in bytes (for LFS files: of the LFS object, not the pointer).
        sha256: hex sha256 of the content for LFS files; None for files stored in git itself.
        blob_id: git object id (for LFS files: of the pointer file).
    """

    path: str
    size: int
    sha256: str | None
    blob_id: str

    @property
    def digest(self) -> str:
        """Content digest: "sha256:<hex>" for LFS files, "gitsha1:<hex>" (git blob id) otherwise."""
        return f"sha256:{self.sha256}" if self.sha256 is not None else f"gitsha1:{self.blob_id}"


@dataclass(frozen=True)
class ResolvedRevision:
    """A requested revision pinned to its commit, with the metadata of the required files only.

    Attributes:
        repo_id: "org/name" on the hub.
        requested_revision: what the caller asked for (branch, tag or commit).
        commit: the full 40-hex commit sha the revision pointed to.
        files: one `RemoteFile` per entry of `REQUIRED_FILES`, in that order.
    """

    repo_id: str
    requested_revision: str
    commit: str
    files: tuple[RemoteFile, ...]

    def digests(self) -> dict[str, str]:
        """Path -> content digest; equal digests mean equal bytes, whatever the commit sha says.

        Returns:
            e.g. {"config.json": "gitsha1:…", "model.safetensors": "sha256:…"}.
        """
        return {f.path: f.digest for f in self.files}


@dataclass(frozen=True)
class DownloadedSnapshot:
    """A verified checkpoint folder.

    Attributes:
        path: `dest_root/<org>--<name>/<commit>/`, holding exactly `REQUIRED_FILES`.
        revision: the resolved revision it was downloaded from.
        sha256: path -> hex sha256 of the bytes on disk (for every required file, LFS or not).
    """

    path: Path
    revision: ResolvedRevision
    sha256: dict[str, str]


# --------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------


def resolve_revision(
    repo_id: str,
    revision: str = "main",
    *,
    endpoint: str | None = None,
    token: str | None = None,
    max_attempts: int = 4,
    retry_delay_s: float = 1.0,
    timeout_s: float = 30.0,
) -> ResolvedRevision:
    """Pin `revision` of `repo_id` to its commit sha and read the required files' metadata.

    Makes one `HfApi.model_info(repo_id, revision=..., files_metadata=True)` call (retried on
    transient failures).

    Args:
        repo_id: model repo on the hub, "org/name".
        revision: branch, tag or full commit sha.
        endpoint: hub URL; None means huggingface_hub's default (HF_ENDPOINT at import time, else
            https://huggingface.co).
        token: access token; None means huggingface_hub's default (HF_TOKEN, else the saved login).
        max_attempts: tries in all for transient failures (connection, timeout, 429, 5xx).
        retry_delay_s: wait before the first retry; doubled before each further one.
        timeout_s: seconds to wait for the hub to answer one request.

    Returns:
        The pinned revision with one `RemoteFile` per required file.

    Raises:
        HubAuthError: the hub answered 401/403 (private or gated repo, missing or wrong token).
        HubNotFoundError: the repo or the revision does not exist, or a required file is missing at
            that commit.
        HubUnreachableError: the endpoint could not be reached (or kept answering 429/5xx) after
            `max_attempts` tries, or HF_HUB_OFFLINE is set.
        HubError: the endpoint answered something that is not the hub API.
        ConfigError: `repo_id` or `revision` is malformed.
    """
    endpoint = endpoint.rstrip("/") if endpoint else None
    where = _Where.of(repo_id, revision, endpoint, token)
    api = HfApi(endpoint=endpoint, token=token)
    try:
        info = _with_retries(
            lambda: api.model_info(repo_id, revision=revision, files_metadata=True, timeout=timeout_s),
            max_attempts=max_attempts,
            retry_delay_s=retry_delay_s,
            what=f"model_info {repo_id}@{revision}",
            where=where,
        )
    except Exception as exc:  # noqa: BLE001 - translated into our hierarchy
        # not chained: the original's text may echo the token (tracebacks reach logs and Prefect's database)
        raise _translate(exc, where, action="resolve", attempts=max_attempts) from None

    commit = info.sha
    if not isinstance(commit, str) or not _COMMIT_RE.fullmatch(commit):
        raise HubError(
            f"The hub at {where.endpoint} answered model_info for {repo_id}@{revision} without a valid "
            f"commit sha (got {commit!r}, expected 40 hex digits). Check that the endpoint is a "
            "Hugging Face hub or a faithful mirror (HF_ENDPOINT / endpoint=)."
        )
    siblings = {s.rfilename: s for s in info.siblings or []}
    files = []
    for path in REQUIRED_FILES:
        sibling = siblings.get(path)
        if sibling is None:
            raise HubNotFoundError(
                f"{repo_id} has no {path} at revision {revision!r} (commit {commit}); a Mitra checkpoint "
                f"needs {' and '.join(REQUIRED_FILES)} at the repo root (found: "
                f"{', '.join(sorted(siblings)) or 'no files'}). Pick a revision that has them, or "
                "pass a local snapshot folder with `--snapshot DIR`."
            )
        if sibling.blob_id is None or (sibling.size is None and sibling.lfs is None):
            raise HubError(
                f"The hub at {where.endpoint} did not return the size and blob id of {path} in "
                f"{repo_id}@{commit} although files_metadata=True was asked; check that HF_ENDPOINT "
                "points to a Hugging Face hub or a faithful mirror."
            )
        if sibling.lfs is not None:
            files.append(RemoteFile(path, int(sibling.lfs.size), sibling.lfs.sha256.lower(), sibling.blob_id))
        else:
            files.append(RemoteFile(path, int(sibling.size), None, sibling.blob_id))  # type: ignore[arg-type]
    return ResolvedRevision(repo_id=repo_id, requested_revision=revision, commit=commit, files=tuple(files))


def download_snapshot(
    revision: ResolvedRevision,
    dest_root: Path,
    *,
    endpoint: str | None = None,
    token: str | None = None,
    progress: bool = True,
    max_attempts: int = 4,
    retry_delay_s: float = 1.0,
    timeout_s: float = 30.0,
) -> DownloadedSnapshot:
    """Download the required files of a resolved revision into a verified, immutable folder.

    Files are fetched by `revision.commit` into a temporary folder under `dest_root` (with its own
    huggingface_hub cache, so ~/.cache is neither read nor written), each file's bytes are checked
    against the hub's metadata (sha256 for LFS files, git blob sha1 otherwise), and only then is the
    folder renamed to `dest_root/<org>--<name>/<commit>/`. If that folder already exists and its
    files match, it is reused without any request; if it exists but does not match, it is replaced.

    Args:
        revision: result of `resolve_revision`.
        dest_root: folder that holds snapshots; created if missing.
        endpoint: hub URL; None means huggingface_hub's default (HF_ENDPOINT at import time).
        token: access token; None means huggingface_hub's default (HF_TOKEN, else the saved login).
        progress: show huggingface_hub's tqdm progress bars (they also honour
            HF_HUB_DISABLE_PROGRESS_BARS); False silences them for this call only.
        max_attempts: tries in all per file for transient failures (connection, timeout, 429, 5xx).
        retry_delay_s: wait before the first retry; doubled before each further one.
        timeout_s: seconds to wait for the hub to answer a file's metadata request.

    Returns:
        The snapshot folder, the revision, and the sha256 of each file on disk.

    Raises:
        ChecksumMismatchError: a downloaded file's bytes differ from the hub's metadata; nothing is
            left under `dest_root`.
        HubAuthError: the hub answered 401/403.
        HubNotFoundError: the repo, commit or a file disappeared since `resolve_revision`.
        HubUnreachableError: the endpoint could not be reached, or kept failing transiently.
        HubError: any other failure of the hub or of huggingface_hub.
    """
    endpoint = endpoint.rstrip("/") if endpoint else None
    dest_root = Path(dest_root)
    final = dest_root / revision.repo_id.replace("/", "--") / revision.commit
    if final.is_dir():
        found = _matching_sha256(final, revision)
        if found is not None:
            logger.info("reusing verified snapshot %s", final)
            return DownloadedSnapshot(path=final, revision=revision, sha256=found)
        logger.warning("snapshot %s does not match %s@%s: downloading it again", final, revision.repo_id,
                       revision.commit)

    dest_root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".incoming-", dir=dest_root))
    try:
        staged = work / "snapshot"
        staged.mkdir()
        for remote in revision.files:
            _download_one(remote, revision, work / "hf-cache", staged, endpoint, token, progress,
                          max_attempts, retry_delay_s, timeout_s)
        sha256 = _verify(staged, revision, dest_root)
        _move_into_place(staged, final, work, revision)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return DownloadedSnapshot(path=final, revision=revision, sha256=sha256)


# --------------------------------------------------------------------------------------------------
# Downloading
# --------------------------------------------------------------------------------------------------


class _SilentTqdm(tqdm):
    """Progress bar that never draws: passed as `tqdm_class` when progress=False (no global switch)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.pop("name", None)
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


def _download_one(
    remote: RemoteFile,
    revision: ResolvedRevision,
    cache_dir: Path,
    staged: Path,
    endpoint: str | None,
    token: str | None,
    progress: bool,
    max_attempts: int,
    retry_delay_s: float,
    timeout_s: float,
) -> None:
    """Fetch one file by commit sha into a private hub cache and move its blob to `staged/`."""
    where = _Where.of(revision.repo_id, revision.commit, endpoint, token)
    try:
        cached = _with_retries(
            lambda: hf_hub_download(
                revision.repo_id,
                remote.path,
                revision=revision.commit,  # the sha, never the branch: no mixing of revisions
                endpoint=endpoint,
                token=token,
                cache_dir=cache_dir,
                etag_timeout=timeout_s,
                tqdm_class=None if progress else _SilentTqdm,
            ),
            max_attempts=max_attempts,
            retry_delay_s=retry_delay_s,
            what=f"download {remote.path} from {revision.repo_id}@{revision.commit}",
            where=where,
        )
    except Exception as exc:  # noqa: BLE001 - translated into our hierarchy, not chained (see above)
        raise _translate(exc, where, action=f"download {remote.path} of", attempts=max_attempts) from None
    # The cache holds `snapshots/<sha>/<path>` -> `blobs/<etag>`; move the blob itself (no copy).
    target = staged / remote.path
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(os.path.realpath(cached), target)


def _verify(staged: Path, revision: ResolvedRevision, dest_root: Path) -> dict[str, str]:
    """Hash every staged file and compare with the hub's metadata; raise once listing all mismatches."""
    sha256: dict[str, str] = {}
    problems = []
    for remote in revision.files:
        size, sha, git = _hash_file(staged / remote.path)
        sha256[remote.path] = sha
        found = f"sha256:{sha}" if remote.sha256 is not None else f"gitsha1:{git}"
        if found != remote.digest or size != remote.size:
            problems.append(
                f"{remote.path}: expected {remote.digest} ({remote.size} bytes), found {found} ({size} bytes)"
            )
    if problems:
        raise ChecksumMismatchError(
            f"Downloaded files of {revision.repo_id}@{revision.commit} do not match the hub's metadata: "
            f"{'; '.join(problems)}. The bytes were corrupted in transit or by a proxy or mirror; "
            f"nothing was kept under {dest_root}. Run the download again, and if it keeps failing check "
            "HF_ENDPOINT and your proxy, or pass a verified local snapshot with `--snapshot DIR`."
        )
    return sha256


def _move_into_place(staged: Path, final: Path, work: Path, revision: ResolvedRevision) -> None:
    """Atomically rename `staged` to `final`; a stale `final` is swapped out, a good one kept."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        if _matching_sha256(final, revision) is not None:
            return  # another process finished the same snapshot first: keep theirs
        os.replace(final, work / f"stale-{uuid.uuid4().hex}")  # removed with `work`
    try:
        os.replace(staged, final)
    except OSError:
        # Lost a race to a concurrent download of the same commit: accept it if it is good.
        if _matching_sha256(final, revision) is None:
            raise


def _matching_sha256(folder: Path, revision: ResolvedRevision) -> dict[str, str] | None:
    """sha256 of each required file in `folder` if all match the hub's metadata, else None."""
    sha256 = {}
    for remote in revision.files:
        path = folder / remote.path
        if not path.is_file():
            return None
        size, sha, git = _hash_file(path)
        found = f"sha256:{sha}" if remote.sha256 is not None else f"gitsha1:{git}"
        if size != remote.size or found != remote.digest:
            return None
        sha256[remote.path] = sha
    return sha256


def _hash_file(path: Path) -> tuple[int, str, str]:
    """(size, sha256 hex, git blob sha1 hex) of a file in one read.

    The git blob id is sha1(b"blob <size>\\0" + content), which is what the hub lists as blobId and
    serves as ETag for files stored in git.
    """
    size = path.stat().st_size
    sha = hashlib.sha256()
    git = hashlib.sha1(b"blob %d\0" % size)
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            sha.update(chunk)
            git.update(chunk)
    return size, sha.hexdigest(), git.hexdigest()


# --------------------------------------------------------------------------------------------------
# Retries and error translation
# --------------------------------------------------------------------------------------------------


def _is_transient(exc: BaseException) -> bool:
    """Connection problems, timeouts and 429/5xx answers; never 4xx, never offline mode."""
    if isinstance(exc, _TRANSIENT_EXCEPTIONS):
        return True
    return isinstance(exc, HfHubHTTPError) and exc.response.status_code in _TRANSIENT_STATUS


def _with_retries(call: Callable[[], T], *, max_attempts: int, retry_delay_s: float, what: str, where: _Where) -> T:
    """Run `call`, retrying transient failures with exponential backoff; re-raise the last error."""
    for attempt in range(1, max_attempts + 1):
        try:
            return call()
        except Exception as exc:
            if attempt >= max_attempts or not _is_transient(exc):
                raise
            delay = retry_delay_s * 2 ** (attempt - 1)
            logger.warning("%s failed (%s); retry %d/%d in %.2fs", what, where.redact(_short(exc)), attempt,
                           max_attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable: max_attempts must be >= 1")  # pragma: no cover


@dataclass(frozen=True)
class _Where:
    """What a request was about, for error messages. `token` is the token the request actually
    sent (the one passed, else HF_TOKEN or the saved login): it is only used to say whether one was
    sent and to redact it from anything the hub echoes back."""

    repo_id: str
    revision: str
    endpoint_arg: str | None
    token: str | None

    @classmethod
    def of(cls, repo_id: str, revision: str, endpoint: str | None, token: str | None) -> _Where:
        return cls(repo_id, revision, endpoint, effective_token(token))

    @property
    def endpoint(self) -> str:
        return self.endpoint_arg or huggingface_hub.constants.ENDPOINT

    def redact(self, text: str) -> str:
        return redact(text, self.token)


def effective_token(token: str | None) -> str | None:
    """The token a request sends: `token`, else huggingface_hub's default (HF_TOKEN, then the saved login)."""
    return token or huggingface_hub.get_token()


def redact(text: str, token: str | None) -> str:
    """`text` with the token (and its Bearer header form) replaced by <token>."""
    return text.replace(token, "<token>") if token else text


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and the exceptions it was raised from (huggingface_hub wraps HEAD failures)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _translate(exc: Exception, where: _Where, *, action: str, attempts: int) -> MitraBuildError:
    """Map a huggingface_hub / HTTP-client exception to our error hierarchy with a fix-it message."""
    subject = f"{where.repo_id} at revision {where.revision!r}"
    if isinstance(exc, HFValidationError):
        return ConfigError(f"Invalid repo id or revision {where.repo_id!r}@{where.revision!r}: "
                           f"{where.redact(str(exc))} Use 'org/name' and a branch, tag or commit sha.")
    for cause in _causes(exc):
        if isinstance(cause, OfflineModeIsEnabled):
            return HubUnreachableError(
                f"Cannot {action} {subject}: HF_HUB_OFFLINE is set, so huggingface_hub refuses "
                "every request. Unset HF_HUB_OFFLINE, or pass a local snapshot folder holding "
                "config.json and model.safetensors with `--snapshot DIR`."
            )
        if isinstance(cause, HfHubHTTPError):
            return _translate_http(cause, exc, where, subject, action, attempts)
        if isinstance(cause, _http.TransportError):  # connection, DNS, timeout, protocol, proxy
            return HubUnreachableError(
                f"Could not reach the hub at {where.endpoint} to {action} {subject} "
                f"({type(cause).__name__}: {where.redact(_short(cause))}; {_tries(exc, attempts)}). "
                f"Check the network connection and proxy settings. {_SNAPSHOT_HINT}"
            )
        if isinstance(cause, FileMetadataError):
            return HubError(
                f"The endpoint {where.endpoint} does not behave like a Hugging Face hub while trying to "
                f"{action} {subject}: {where.redact(_short(cause))} Check HF_ENDPOINT / endpoint=. "
                f"{_SNAPSHOT_HINT}"
            )
    if isinstance(exc, (LocalEntryNotFoundError, ConnectionError)):
        return HubUnreachableError(f"Could not {action} {subject} from {where.endpoint}: "
                                   f"{where.redact(_short(exc))} {_SNAPSHOT_HINT}")
    if isinstance(exc, (ValueError, KeyError, TypeError)):
        return HubError(
            f"The endpoint {where.endpoint} gave an answer that is not the hub API while trying to "
            f"{action} {subject} ({type(exc).__name__}: {where.redact(_short(exc))}). "
            "Check HF_ENDPOINT / endpoint=."
        )
    return HubError(f"Failed to {action} {subject} from {where.endpoint}: "
                    f"{type(exc).__name__}: {where.redact(_short(exc))}")


def _translate_http(
    err: HfHubHTTPError, outer: Exception, where: _Where, subject: str, action: str, attempts: int
) -> MitraBuildError:
    """Map an HTTP error answer (by status code: the hub sends 401 for missing repos too)."""
    status = err.response.status_code
    said = ""
    if err.server_message:
        said = f" The hub said: {where.redact(err.server_message).rstrip('.')}."
    if status in (401, 403):
        token_state = (
            "the token sent (from token=, HF_TOKEN or the saved login) was refused"
            if where.token
            else "no token was sent (none passed, no HF_TOKEN, no saved login)"
        )
        return HubAuthError(
            f"The hub at {where.endpoint} refused to {action} {subject} (HTTP {status}): the repo is "
            f"private or gated, or does not exist, and {token_state}.{said} Set HF_TOKEN to a token with "
            f"access to {where.repo_id} (and accept the repo's terms on its page if it is gated)."
        )
    if status == 404:
        if isinstance(err, RevisionNotFoundError):
            return HubNotFoundError(
                f"Revision {where.revision!r} does not exist in {where.repo_id} on "
                f"{where.endpoint}.{said} Pass an existing branch, tag or full commit sha."
            )
        if isinstance(err, RemoteEntryNotFoundError):
            return HubNotFoundError(
                f"Cannot {action} {subject}: the file is missing on {where.endpoint}.{said} "
                f"A Mitra checkpoint needs {' and '.join(REQUIRED_FILES)} at the repo root."
            )
        return HubNotFoundError(
            f"Repository {where.repo_id} was not found on {where.endpoint} (asked for revision "
            f"{where.revision!r}).{said} Check the repo id ('org/name'); if it is private, set HF_TOKEN "
            "to a token with access to it."
        )
    if status in _TRANSIENT_STATUS:
        return HubUnreachableError(
            f"The hub at {where.endpoint} kept answering HTTP {status} while trying to {action} "
            f"{subject} ({_tries(outer, attempts)}).{said} Try again later. {_SNAPSHOT_HINT}"
        )
    return HubError(f"The hub at {where.endpoint} answered HTTP {status} while trying to {action} "
                    f"{subject}.{said} Check the repo id, revision and HF_ENDPOINT.")


def _tries(outer: BaseException, attempts: int) -> str:
    """How hard we tried, for messages: huggingface_hub retries its HEAD requests itself."""
    if isinstance(outer, LocalEntryNotFoundError):
        return "after huggingface_hub's own retries"
    return f"after {attempts} attempt{'s' if attempts != 1 else ''}"


def _short(exc: BaseException) -> str:
    """First line of an exception's message (huggingface_hub messages span several lines)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
