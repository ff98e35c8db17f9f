"""The consumer's Python API: list and pull verified releases by URL, with no build config.

    from mitra_model.release.client import pull_artifact
    path = pull_artifact("s3://mitra-build/releases/mitra-classifier@latest", "int8")

    # Signed releases only, by this publisher's key (see mitra_model.pull for what is checked):
    keys = load_trusted_keys([Path("release-signing.pub")])   # from mitra_model.release.keys
    path = pull_artifact("s3://mitra-build/releases/mitra-classifier", "int8", trusted_keys=keys)

A release URL is `s3://BUCKET/PREFIX/VARIANT[@VERSION|@latest]` (the prefix may be empty or hold
several segments; no version means latest). Credentials and, unless `endpoint_url` is given, the
endpoint come from boto3's standard chain (`AWS_ACCESS_KEY_ID`, `AWS_ENDPOINT_URL`, profiles ...).

Light on purpose: the standard library, boto3, pydantic, jsonschema, tqdm and mitra_model's light
modules only (no torch, onnx or numpy), so a service that only pulls needs none of the build
toolchain.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from botocore.exceptions import ClientError
from pydantic import ValidationError

from mitra_model.errors import (
    ChecksumMismatchError,
    MitraBuildError,
    PullError,
    StoreDocumentError,
    StoreUnreachableError,
)
from mitra_model.release import layout
from mitra_model.release.keys import TRUSTED_KEYS_ENV, TrustedKey, signature_required, trusted_keys_from
from mitra_model.release.local import LocalRelease
from mitra_model.release.objects import read_document
from mitra_model.release.pull import PullResult, pull_release, require_trusted_keys, verified_copy
from mitra_model.release.rules import (
    LATEST,
    Pointer,
    is_synthetic,
    manifest_schema_errors,
    segment_problem,
    sha256_bytes,
)
from mitra_model.release.store import (
    StoreConfig,
    describe_client_error,
    list_common_prefixes,
    list_objects,
    make_s3_client,
)
from mitra_model.release.trust import checked_manifest, fetch_pinned_manifest

DEFAULT_CACHE_DIR = Path("~/.cache/mitra-build")


class SyntheticReleaseWarning(UserWarning):
    """A pulled release has SYNTHETIC (random) weights: fine for tests, useless for predictions."""


class UncheckedSignatureWarning(UserWarning):
    """A signed release was pulled without a trusted key: its signature was not checked."""


class OfflineCopyWarning(UserWarning):
    """The store could not be reached: the last verified copy in DEST was returned instead."""


OFFLINE_ENV = "MITRA_OFFLINE"  # "1": use the last verified copy, never the store (like HF_HUB_OFFLINE)


def offline_mode(environ: Any = None) -> bool:
    """$MITRA_OFFLINE is set to 1 / true / yes."""
    env = os.environ if environ is None else environ
    return env.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class ReleaseURL:
    """A parsed `s3://BUCKET/PREFIX/VARIANT[@VERSION]`.

    Attributes:
        bucket / prefix: where the releases live (prefix may be "").
        variant: the last path segment; None for a URL that names only a bucket/prefix (`ls`).
        version: a version id or "latest".
    """

    bucket: str
    prefix: str
    variant: str | None
    version: str = LATEST

    def store(self, endpoint_url: str | None = None) -> StoreConfig:
        """The StoreConfig of this URL's bucket and prefix at `endpoint_url` (None: boto3 decides)."""
        try:
            return StoreConfig(bucket=self.bucket, prefix=self.prefix, endpoint_url=endpoint_url)
        except ValidationError as exc:
            problems = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors(include_url=False))
            raise PullError(f"Cannot use {self}: {problems}") from None

    def __str__(self) -> str:
        path = layout.join_key(self.prefix, self.variant or "")
        suffix = f"@{self.version}" if self.variant and self.version != LATEST else ""
        return f"s3://{self.bucket}/{path}{suffix}"


def parse_release_url(url: str, *, variant_required: bool = True) -> ReleaseURL:
    """Parse `s3://BUCKET/PREFIX/VARIANT[@VERSION|@latest]`.

    Args:
        url: the URL.
        variant_required: the last segment is the variant (pull). With False the URL may stop at
            the prefix and the caller decides (ls); `variant` is then the last segment or None.

    Returns:
        The parsed URL.

    Raises:
        PullError: not an s3:// URL, no bucket, an unsafe variant or version.
    """
    parts = urlsplit(url)
    example = "s3://mitra-build/releases/mitra-classifier@latest"
    if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
        raise PullError(f"{url!r} is not a release URL; write s3://BUCKET/PREFIX/VARIANT[@VERSION], e.g. {example}")
    path, version = parts.path, LATEST
    if "@" in path:
        path, version = path.rsplit("@", 1)
        if version != LATEST and (problem := segment_problem(version, "version")):
            raise PullError(f"{url!r}: {problem}")
    if "//" in path or (path.endswith("/") and path != "/"):
        raise PullError(f"{url!r} has an empty path segment ('//' or a trailing '/'): write "
                        f"s3://BUCKET/PREFIX/VARIANT[@VERSION], e.g. {example}")
    segments = [s for s in path.split("/") if s]
    if not segments:
        if variant_required:
            raise PullError(f"{url!r} names no variant; write s3://BUCKET/PREFIX/VARIANT, e.g. {example}")
        return ReleaseURL(bucket=parts.netloc, prefix="", variant=None)
    variant = segments[-1]
    if problem := segment_problem(variant, "variant"):
        raise PullError(f"{url!r}: {problem}")
    return ReleaseURL(bucket=parts.netloc, prefix="/".join(segments[:-1]), variant=variant, version=version)


@dataclass(frozen=True)
class ArtifactInfo:
    """One artifact of a release: its name, file and size in bytes."""

    name: str
    file: str
    size: int


@dataclass(frozen=True)
class ReleaseInfo:
    """One entry of a variant's release log (`_releases/<N>.json`) and its manifest.

    Attributes:
        date: when the release record was written (the store's LastModified), ISO 8601 UTC.
        synthetic: the release's weights are SYNTHETIC (random).
        latest: the pointer names this release.
        problem: why the release could not be read (its other fields may then be partial).
        source_revision: the source's resolved commit (hub) or folder (a local snapshot).
        signed: the release carries a signature (`release.sig`, pinned by its record).
        reverted: this release re-publishes an earlier one (`mitra-build revert`).
        documents: the release's documents (e.g. README.md, report.html), by file name.
    """

    variant: str
    version: str
    manifest_version: int
    date: str
    synthetic: bool
    artifacts: tuple[ArtifactInfo, ...]
    latest: bool = False
    problem: str | None = None
    source_revision: str = ""
    signed: bool = False
    reverted: bool = False
    documents: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class VariantInfo:
    """A variant under a prefix and how many releases its log holds."""

    name: str
    releases: int


def _client(store: StoreConfig) -> Any:
    return make_s3_client(store)


def list_variants(url: str, *, endpoint_url: str | None = None, client: Any = None) -> list[VariantInfo]:
    """The variants published under `s3://BUCKET/PREFIX` (those with at least one release record).

    Args:
        url: `s3://BUCKET/PREFIX` (or `s3://BUCKET`).
        endpoint_url: the S3 endpoint; None lets boto3 decide (AWS, or AWS_ENDPOINT_URL).
        client: a boto3 S3 client to reuse (default: a new one).

    Returns:
        One VariantInfo per variant, sorted by name.

    Raises:
        PullError: a bad URL or a refused listing.
        StoreAuthError / StoreUnreachableError: credentials refused / endpoint unreachable.
    """
    parsed = parse_release_url(url, variant_required=False)
    prefix = layout.join_key(parsed.prefix, parsed.variant or "")
    store = ReleaseURL(parsed.bucket, prefix, None).store(endpoint_url)
    client = client or _client(store)
    found = []
    for name in _listed(client, store, lambda: list_common_prefixes(client, store, prefix)):
        if segment_problem(name, "variant") is not None:
            continue  # _prefect-results and anything else that cannot be a variant
        folder = layout.join_key(layout.variant_folder(prefix, name), layout.RELEASES_DIR)
        records = [o for o in _listed(client, store, lambda f=folder: list_objects(client, store, f)) if _number(o["Key"])]
        if records:
            found.append(VariantInfo(name=name, releases=len(records)))
    return found


def list_releases(url: str, *, endpoint_url: str | None = None, client: Any = None) -> list[ReleaseInfo]:
    """Every release in a variant's log, oldest first, each read and checked against its record.

    Args:
        url: `s3://BUCKET/PREFIX/VARIANT` (a version suffix is ignored).
        endpoint_url: the S3 endpoint; None lets boto3 decide.
        client: a boto3 S3 client to reuse (default: a new one).

    Returns:
        One ReleaseInfo per release record; a record or manifest that fails its checks is listed
        with `problem` set rather than hidden.

    Raises:
        PullError: a bad URL, or no release of this variant.
        StoreAuthError / StoreUnreachableError: credentials refused / endpoint unreachable.
    """
    parsed = parse_release_url(url)
    store = parsed.store(endpoint_url)
    client = client or _client(store)
    variant = parsed.variant or ""
    folder = layout.join_key(layout.variant_folder(store.prefix, variant), layout.RELEASES_DIR)
    records = [o for o in _listed(client, store, lambda: list_objects(client, store, folder)) if _number(o["Key"])]
    if not records:
        raise PullError(f"No release of {variant!r} under {store.url(folder)}: nothing was published there")
    latest_sha = None
    try:  # a damaged pointer only means no release is marked latest; pull says what is wrong with it
        pointer = read_document(client, store, layout.pointer_key(store.prefix, variant))
        latest_sha = Pointer.model_validate(pointer[0]).manifest_sha256 if pointer else None
    except (ValidationError, StoreDocumentError):
        pass
    return [_release_info(client, store, variant, record, latest_sha) for record in records]


def _number(key: str) -> int | None:
    name = key.rsplit("/", 1)[-1]
    stem = name.removesuffix(".json")
    return int(stem) if name.endswith(".json") and stem.isdigit() and int(stem) >= 1 else None


def _listed(client: Any, store: StoreConfig, list_call: Any) -> list[Any]:
    try:
        return list_call()
    except ClientError as exc:
        raise PullError(f"Listing {store.url(store.prefix)} failed: {describe_client_error(exc, store, client)}") from exc


def _release_info(client: Any, store: StoreConfig, variant: str, listed: dict[str, Any], latest_sha: str | None) -> ReleaseInfo:
    number = _number(listed["Key"]) or 0
    modified = listed.get("LastModified")
    date = modified.isoformat() if isinstance(modified, datetime) else str(modified or "")
    base = ReleaseInfo(variant=variant, version="?", manifest_version=number, date=date, synthetic=False, artifacts=())
    try:
        record = read_document(client, store, listed["Key"])
        pin = Pointer.model_validate(record[0] if record else None)
        base = dataclasses.replace(base, version=pin.version, signed=pin.signature_key is not None)
        if pin.manifest_version != number or pin.variant != variant:
            raise PullError(f"{store.url(listed['Key'])} claims {pin.variant} manifest_version {pin.manifest_version}")
        if pin.manifest_key != layout.manifest_key(store.prefix, variant, pin.version):
            raise PullError(f"{store.url(listed['Key'])} names an unexpected manifest key {pin.manifest_key!r}")
        found = read_document(client, store, pin.manifest_key)
        if found is None:
            raise PullError(f"{store.url(pin.manifest_key)} does not exist")
        manifest, raw, _ = found
        if sha256_bytes(raw) != pin.manifest_sha256:
            raise ChecksumMismatchError(f"{store.url(pin.manifest_key)} does not have the sha256 its record pins")
        if errors := manifest_schema_errors(manifest):
            raise PullError(f"{store.url(pin.manifest_key)} does not match the manifest schema: {errors[0]}")
    except (MitraBuildError, ValidationError) as exc:
        problem = str(exc).splitlines()[0] if not isinstance(exc, ValidationError) else "invalid release record"
        return dataclasses.replace(base, problem=problem)
    return dataclasses.replace(
        base,
        synthetic=is_synthetic(manifest),
        artifacts=tuple(ArtifactInfo(a["name"], a["file"], a["size"]) for a in manifest["artifacts"]),
        latest=pin.manifest_sha256 == latest_sha,
        source_revision=str(manifest["source"].get("resolved_commit") or manifest["source"].get("path") or ""),
        reverted=".revert-" in pin.version,  # maintenance.revert_version_id
        documents=tuple(str(d.get("file")) for d in manifest.get("documents") or [] if isinstance(d, dict)),
    )


def is_variant_url(url: str, *, endpoint_url: str | None = None, client: Any = None) -> bool:
    """True when the URL's last segment is a variant with a release log (else it is a prefix).

    Raises:
        PullError / StoreAuthError / StoreUnreachableError: as `list_releases`.
    """
    parsed = parse_release_url(url, variant_required=False)
    if parsed.variant is None:
        return False
    store = parsed.store(endpoint_url)
    client = client or _client(store)
    folder = layout.join_key(layout.variant_folder(store.prefix, parsed.variant), layout.RELEASES_DIR)
    return any(_number(o["Key"]) for o in _listed(client, store, lambda: list_objects(client, store, folder)))


def pull_release_url(
    url: str,
    dest: Path | str,
    *,
    artifacts: Sequence[str] | None = None,
    endpoint_url: str | None = None,
    refuse_synthetic: bool = False,
    progress: bool = False,
    client: Any = None,
    trusted_keys: Sequence[TrustedKey] = (),
    require_signature: bool | None = None,
    offline: bool | None = None,
) -> PullResult:
    """Pull the release a URL names into `dest` (see `mitra_model.pull.pull_release`).

    Args:
        url: `s3://BUCKET/PREFIX/VARIANT[@VERSION|@latest]`.
        dest: the folder consumers read (a symlink switched atomically to each new release).
        artifacts: artifact names to pull (None: all); the manifest is always pulled and checked.
        endpoint_url: the S3 endpoint; None lets boto3 decide (AWS, or AWS_ENDPOINT_URL).
        refuse_synthetic: raise PullError, before downloading anything, for a SYNTHETIC release.
        progress: one tqdm progress bar on stderr.
        client: a boto3 S3 client to reuse (default: a new one).
        trusted_keys: public key file paths or PEM bytes (none: those $MITRA_TRUSTED_KEYS names); with
            any, only releases signed by one of them are accepted, and every file is checked against
            the signature.
        require_signature: refuse to pull without a trusted key (None: $MITRA_REQUIRE_SIGNATURE).
            Without it, a signed release pulled with no key warns (UncheckedSignatureWarning) and
            the result says `signature_checked` False.
        offline: return the copy DEST last verified without touching the store (None:
            $MITRA_OFFLINE). Online, a store that cannot be reached while DEST holds a verified copy
            returns that copy with an OfflineCopyWarning naming its version.

    Returns:
        The PullResult; `synthetic` is True for a release with random weights, which also emits
        a SyntheticReleaseWarning.

    Raises:
        PullError, ChecksumMismatchError, OutputError, StoreAuthError, StoreUnreachableError,
            SignatureError (its subclasses), SigningKeyError: as `pull_release`.
    """
    parsed = parse_release_url(url)
    store = parsed.store(endpoint_url)
    result, stale = pull_or_use_copy(
        parsed.variant or "", parsed.version, Path(dest), store=store, client=client, progress=progress,
        artifacts=artifacts, refuse_synthetic=refuse_synthetic, trusted_keys=trusted_keys_from(trusted_keys),
        require_signature=signature_required() if require_signature is None else require_signature,
        offline=offline_mode() if offline is None else offline)
    if stale is not None:
        warnings.warn(OfflineCopyWarning(stale), stacklevel=2)
    if result.signed and not result.signature_checked:
        warnings.warn(UncheckedSignatureWarning(unchecked_signature_notice(parsed.variant or "", result.version)),
                      stacklevel=2)
    if result.synthetic:
        warnings.warn(
            SyntheticReleaseWarning(
                f"{parsed.variant} {result.version} is a SYNTHETIC release: its weights are random, "
                "not a trained checkpoint; its predictions mean nothing. Pass refuse_synthetic=True "
                "to refuse such releases."
            ),
            stacklevel=2,
        )
    return result


def unchecked_signature_notice(variant: str, version: str) -> str:
    """What a consumer reads when a signed release was pulled without a trusted key."""
    return (f"{variant} {version} is signed, but its signature was NOT checked: no trusted key was given. "
            f"Check it with --trusted-key KEY.pub / trusted_keys=[...] (or ${TRUSTED_KEYS_ENV}); "
            "--require-signature (or $MITRA_REQUIRE_SIGNATURE=1) refuses any pull without one.")


def pull_or_use_copy(variant: str, version: str, dest: Path, *, store: StoreConfig, client: Any, progress: bool,
                     artifacts: Sequence[str] | None, refuse_synthetic: bool, trusted_keys: tuple[bytes, ...],
                     require_signature: bool, offline: bool, verify: bool = False) -> tuple[PullResult, str | None]:
    """`pull_release`, or the copy DEST last verified: when `offline`, or when the store cannot be
    reached. Returns the result and, for a copy used because the store is down, what to warn.

    Raises:
        PullError: offline with no verified copy of the wanted artifacts in DEST, or as `pull_release`.
        StoreUnreachableError: the store is down and DEST holds no verified copy.
    """
    if require_signature:  # offline too
        require_trusted_keys(variant, trusted_keys)

    def copy() -> PullResult | None:
        found = verified_copy(dest, variant, artifacts=artifacts, trusted_keys=trusted_keys, rehash=verify)
        if found is None or version not in (LATEST, found.version):
            return None
        if refuse_synthetic and found.synthetic:
            raise PullError(f"{variant} {found.version} in {dest} is a SYNTHETIC release: refused as asked "
                            "(refuse_synthetic / --refuse-synthetic)")
        return found

    if offline:
        found = copy()
        if found is None:
            raise PullError(f"offline ({OFFLINE_ENV}=1 / --offline): {dest} holds no verified copy of {variant}"
                            f"@{version} ({', '.join(artifacts or ['every artifact'])}); pull it once online, or "
                            f"unset {OFFLINE_ENV}")
        return found, None
    try:
        return pull_release(variant, version=version, dest=dest, client=client or _client(store), store=store,
                            progress=progress, artifacts=artifacts, refuse_synthetic=refuse_synthetic,
                            trusted_keys=trusted_keys, require_signature=require_signature, verify=verify), None
    except StoreUnreachableError as exc:
        found = copy()
        if found is None:
            raise
        return found, (f"{store.url()} cannot be reached ({str(exc).splitlines()[0]}); using the copy of {variant} "
                       f"{found.version} (manifest_version {found.manifest_version}) verified earlier in {dest}")


def default_cache_dir() -> Path:
    """`$MITRA_BUILD_CACHE`, else `$XDG_CACHE_HOME/mitra-build`, else `~/.cache/mitra-build`."""
    if explicit := os.environ.get("MITRA_BUILD_CACHE"):
        return Path(explicit).expanduser()
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg).expanduser() / "mitra-build"
    return DEFAULT_CACHE_DIR.expanduser()


def cache_dest(url: str, *, cache_dir: Path | str | None = None, endpoint_url: str | None = None) -> Path:
    """Where `pull_artifact` keeps a URL's release: `<cache>/<endpoint>/<bucket>/<prefix>/<variant>/<version>`.

    `latest` and each explicit version get folders of their own, so pinning an old version never
    counts as a rollback of the latest one.
    """
    parsed = parse_release_url(url)
    host = urlsplit(endpoint_url).netloc.replace(":", "_") if endpoint_url else "default"
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / host / parsed.bucket / Path(*parsed.prefix.split("/")) / (parsed.variant or "") / parsed.version


def pull_artifact(
    url: str,
    artifact: str,
    *,
    cache_dir: Path | str | None = None,
    endpoint_url: str | None = None,
    refuse_synthetic: bool = False,
    progress: bool = False,
    client: Any = None,
    trusted_keys: Sequence[TrustedKey] = (),
    require_signature: bool | None = None,
    offline: bool | None = None,
) -> Path:
    """The local path of one verified artifact of a release, downloading it only when needed.

    Like huggingface_hub's `hf_hub_download`: repeated calls cost two small GETs (pointer and
    manifest) and no hashing while the cached file is unchanged (same size and mtime).

    Args:
        url: `s3://BUCKET/PREFIX/VARIANT[@VERSION|@latest]`.
        artifact: the artifact's name in the manifest, e.g. "int8" or "fp32".
        cache_dir: the cache root (default: `default_cache_dir()`).
        endpoint_url: the S3 endpoint; None lets boto3 decide.
        refuse_synthetic: raise PullError for a SYNTHETIC release (otherwise: a warning).
        progress: one tqdm progress bar on stderr.
        client: a boto3 S3 client to reuse.
        trusted_keys: public key file paths or PEM bytes (none: those $MITRA_TRUSTED_KEYS names); with
            any, the release must be signed by one of them (see `pull_release_url`).
        require_signature: refuse to pull without a trusted key (None: $MITRA_REQUIRE_SIGNATURE).
        offline: the cached verified copy, without touching the store (None: $MITRA_OFFLINE); a
            store that cannot be reached returns the cached copy too, with a warning.

    Returns:
        The artifact's path under the cache (through the release symlink, so it stays valid
        until a newer release replaces it).

    Raises:
        PullError: an unknown artifact name (the message lists the release's), or as `pull_release`.
        ChecksumMismatchError, OutputError, StoreAuthError, StoreUnreachableError, SignatureError,
            SigningKeyError: as `pull_release`.
    """
    dest = cache_dest(url, cache_dir=cache_dir, endpoint_url=endpoint_url)
    result = pull_release_url(url, dest, artifacts=[artifact], endpoint_url=endpoint_url,
                              refuse_synthetic=refuse_synthetic, progress=progress, client=client,
                              trusted_keys=trusted_keys, require_signature=require_signature, offline=offline)
    return result.files[artifact]


def read_release_manifest(url: str, *, endpoint_url: str | None = None, client: Any = None
                          ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The manifest of a published release and of the release before it, checked against the
    SHA-256 their pointer or release records pin (signatures are not checked: nothing is run).

    Args:
        url: `s3://BUCKET/PREFIX/VARIANT[@VERSION]` (no version: latest).
        endpoint_url: the S3 endpoint; None lets boto3 decide.
        client: a boto3 S3 client to reuse (default: a new one).

    Returns:
        (manifest, previous): previous is None for the variant's first release.

    Raises:
        PullError / ChecksumMismatchError: no such release, or a manifest that is not what its record pins.
        StoreAuthError / StoreUnreachableError: credentials refused / endpoint unreachable.
    """
    parsed = parse_release_url(url)
    store = parsed.store(endpoint_url)
    client = client or _client(store)
    variant = parsed.variant or ""
    nothing_local = LocalRelease(folder=None, record=None)

    def manifest_of(version: str) -> dict[str, Any]:
        raw, pin = fetch_pinned_manifest(client, store, variant, version, trusted=(), local=nothing_local)
        return checked_manifest(raw, pin, store)

    manifest = manifest_of(parsed.version)
    number = manifest["manifest_version"]
    if number <= 1:
        return manifest, None
    record = read_document(client, store, layout.release_record_key(store.prefix, variant, number - 1))
    if record is None or not isinstance(record[0], dict) or segment_problem(record[0].get("version"), "version"):
        raise PullError(f"Release {number - 1} of {variant!r} has no readable release record: the log is damaged")
    return manifest, manifest_of(record[0]["version"])
