"""Where a variant's weights come from: the hub (pinned to a commit), a local snapshot folder, or —
only when asked for — a synthetic snapshot because the hub is unreachable.

The synthetic fallback is never silent: it must be enabled explicitly, it logs a banner, and the
`SourceInfo.synthetic` flag travels into the manifest and the ONNX metadata.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from mitra_model.build.config import BuildConfig, Variant
from mitra_model.build.hub import ResolvedRevision, download_snapshot, resolve_revision
from mitra_model.errors import ChecksumMismatchError, HubUnreachableError
from mitra_model.model.snapshot import WEIGHTS_FILE, Snapshot, read_snapshot, write_synthetic_snapshot

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceInfo:
    """Where the weights came from, as recorded in the manifest."""

    repo_id: str | None  # None for a variant built from a local folder
    requested_revision: str | None  # None for a local folder
    resolved_commit: str | None  # None for a local or synthetic snapshot
    synthetic: bool
    digests: dict[str, str]  # path -> "sha256:<hex>" | "gitsha1:<hex>", as known before download
    path: str | None = None  # the local snapshot folder built, if any

SYNTHETIC_SEED = 0
SYNTHETIC_BANNER = (
    "SYNTHETIC BUILD: {variant} is built from a synthetic snapshot (Mitra's architecture, RANDOM weights). "
    "Its artifacts are marked synthetic everywhere; they are NOT the published Mitra model."
)


def _local_digests(snapshot: Snapshot) -> dict[str, str]:
    return {f.path: f"sha256:{f.sha256}" for f in snapshot.files}


def resolve_source(
    variant: Variant,
    config: BuildConfig,
    *,
    cache_root: Path,
    snapshot_dir: Path | None = None,
    endpoint: str | None = None,
    token: str | None = None,
    synthetic_fallback: bool = False,
) -> tuple[SourceInfo, ResolvedRevision | None, Snapshot | None]:
    """Pin the variant's source and return its digests (what decides whether to rebuild).

    Returns:
        (source, revision, snapshot): `revision` is set for the hub (download still to do);
        `snapshot` is set when the files are already local (a given folder, or the synthetic one).

    Raises:
        HubError subclasses, unless the hub is unreachable and `synthetic_fallback` is True.
    """
    if snapshot_dir is not None or variant.path is not None:
        folder = Path(snapshot_dir if snapshot_dir is not None else variant.path).resolve()
        snapshot = read_snapshot(folder)
        revision = variant.revision if variant.repo_id else None
        source = SourceInfo(variant.repo_id, revision, None, snapshot.synthetic, _local_digests(snapshot), str(folder))
        return source, None, snapshot
    assert variant.repo_id is not None  # a Variant has a repo_id or a path
    try:
        revision = resolve_revision(variant.repo_id, variant.revision, endpoint=endpoint, token=token)
    except HubUnreachableError:
        if not synthetic_fallback:
            raise
        log.warning("HUB UNREACHABLE for %s@%s; falling back as asked (synthetic_fallback).", variant.repo_id, variant.revision)
        log.warning(SYNTHETIC_BANNER.format(variant=variant.name))
        snapshot = synthetic_snapshot(variant, config, cache_root)
        source = SourceInfo(variant.repo_id, variant.revision, None, True, _local_digests(snapshot))
        return source, None, snapshot
    source = SourceInfo(variant.repo_id, variant.revision, revision.commit, False, revision.digests())
    return source, revision, None


def synthetic_snapshot(variant: Variant, config: BuildConfig, cache_root: Path) -> Snapshot:
    """The full-size synthetic snapshot for this variant's task (generated once, then reused)."""
    folder = Path(cache_root) / "synthetic" / f"{variant.task}-full-seed{SYNTHETIC_SEED}"
    if (folder / WEIGHTS_FILE).is_file():
        snapshot = read_snapshot(folder)
        if snapshot.synthetic:
            return snapshot
    return write_synthetic_snapshot(folder, task=variant.task, size_name="full", size=config.sizes["full"], seed=SYNTHETIC_SEED)


def fetch_snapshot(
    revision: ResolvedRevision, *, cache_root: Path, endpoint: str | None = None, token: str | None = None, progress: bool = True
) -> Snapshot:
    """Download the pinned revision (checksummed by the download itself) and read it back."""
    downloaded = download_snapshot(revision, Path(cache_root) / "hub", endpoint=endpoint, token=token, progress=progress)
    return read_snapshot(downloaded.path)


def verify_checksums(snapshot: Snapshot, source: SourceInfo) -> None:
    """Check the bytes about to be exported against the digests the source was pinned with.

    Raises:
        ChecksumMismatchError: naming the file, the expected and the found digest.
    """
    for name, expected in source.digests.items():
        path = snapshot.path / name
        kind, _, want = expected.partition(":")
        if kind == "sha256":
            found = snapshot.digest(name).sha256
        elif kind == "gitsha1":
            data = path.read_bytes()
            found = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        else:
            raise ChecksumMismatchError(f"{path}: unknown digest kind {kind!r} in {expected!r}")
        if found != want:
            raise ChecksumMismatchError(
                f"{path}: {kind} is {found}, but {source.repo_id or source.path}@{source.resolved_commit or source.requested_revision} "
                f"says {want}. The file changed after it was pinned; delete it and re-run to download it again."
            )
