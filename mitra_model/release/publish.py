"""Publish a verified build to S3 so that consumers only ever see complete releases.

Where things go is `layout.py`; what the pointer and release records hold is `release.py`.
Artifacts are created with If-None-Match: *, the manifest is immutable once released, a release
record `_releases/<N>.json` (also immutable) is the commit point, and the pointer `latest.json`
moves by compare-and-swap and never goes back.

Order of writes: artifacts -> manifest -> [release.sig] -> release record -> pointer. With a
signer (`keys.Signer`), the complete release folder (artifacts + manifest.json) is signed in
OpenSSF model-signing format into `<version>/release.sig` (created like the artifacts, replaced
only while its manifest is unreleased), the release record pins its key and SHA-256, and the
pointer carries `expires` and a DSSE signature (TUF's timestamp role; `refresh_pointer` renews
it). `revert_release` brings old artifacts back as a *new* release, so consumers never go back.
Consumers only follow the
pointer (or, for an explicit version, the release record), and each is written after everything it
names exists and was re-checked, so a crash at any point leaves the old complete release visible;
re-running `publish_build` finishes the job.

Why release records: `manifest_version` is the release's sequence number and goes *inside* the
manifest (with `previous_manifest_sha256`), so it must be chosen before the manifest is written.
Creating `_releases/<N>.json` with If-None-Match is an atomic "claim" of N: of two racing
publishers exactly one gets it; the loser's manifest was never released (no record names it), so
it may be rewritten (compare-and-swap on its ETag) with N+1 and the loser tries again. A manifest
named by a release record is never rewritten, so its SHA-256 can be pinned downstream.

Republishing a version that was already released is a no-op (nothing uploaded). If that release is
no longer the latest, the pointer stays where it is: publishing never rolls a variant back.
"""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from mitra_model.errors import (
    PublishError,
    SignatureError,
    UntrustedKeyError,
    VersionConflictError,
)
from mitra_model.fileutil import sha256_file
from mitra_model.release import layout
from mitra_model.release.index import rewrite_indexes
from mitra_model.release.keys import Signer
from mitra_model.release.layout import MANIFEST_NAME, MANIFEST_SCHEMA_ID, SIGNATURE_NAME
from mitra_model.release.log import log_tail, record_fields, release_record
from mitra_model.release.pointer import DEFAULT_POINTER_TTL, sign_pointer
from mitra_model.release.rules import (
    LATEST,
    MANIFEST_SCHEMA_PATH,
    canonical_json,
    file_name_problem,
    is_sha256_hex,
    manifest_schema_errors,
    segment_problem,
    sha256_bytes,
)
from mitra_model.release.signature import sign_release_files, verify_release_signature
from mitra_model.release.store import (
    StoreConfig,
)
from mitra_model.release.writes import MAX_CAS_ATTEMPTS, ConditionalWriter, backoff

PUBLISH_FIELDS = ("manifest_version", "previous_manifest_sha256")

# Renders a release's documents (file name -> bytes: the model card, the report page) from its final
# manifest, without `documents`, the manifest of the release before it (None for the first) and the
# variant's URL (s3://BUCKET/PREFIX/VARIANT): `mitra_model.report.release_documents`. Injected, so
# publishing needs no plotting library.
DocumentRenderer = Callable[[dict[str, Any], dict[str, Any] | None, str], dict[str, bytes]]
DOCUMENT_TYPES = {".md": "text/markdown; charset=utf-8", ".html": "text/html; charset=utf-8"}

_MAX_RELEASE_ATTEMPTS = 12  # lost manifest_version claims before giving up


@dataclass(frozen=True)
class PublishResult:
    """What `publish_build` did.

    Attributes:
        manifest_version: the release's sequence number (an older one when the version had
            already been released and was superseded since).
        uploaded: keys written by this call, in order; empty when everything was already there.
        already_published: nothing had to be written (`uploaded` is empty).
        signature_key / signature_sha256: the release signature object (`<version>/release.sig`)
            and its SHA-256, as the release record pins them; None for an unsigned release.
    """

    variant: str
    version: str
    manifest_key: str
    manifest_sha256: str
    manifest_version: int
    pointer_key: str
    uploaded: list[str]
    already_published: bool
    signature_key: str | None = None
    signature_sha256: str | None = None


# -- digests and identity ------------------------------------------------------------------






def _release_identity(doc: dict[str, Any]) -> dict[str, Any]:
    """What makes two manifests "the same release": names and digests of sources and artifacts."""
    source = doc.get("source") or {}
    return {
        "variant": doc.get("variant"),
        "version": doc.get("version"),
        "source_files": sorted(
            (str(f.get("path")), f.get("size"), f.get("sha256")) for f in source.get("files") or []
        ),
        "artifacts": sorted(
            (str(a.get("name")), str(a.get("file")), a.get("size"), a.get("sha256"))
            for a in doc.get("artifacts") or []
        ),
    }


# -- the draft ----------------------------------------------------------------------------------


def _read_draft(build_dir: Path) -> tuple[dict[str, Any], list[tuple[dict[str, Any], Path]]]:
    """Load and check the draft manifest and its files; raise once listing every problem."""
    path = build_dir / MANIFEST_NAME
    try:
        draft = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PublishError(f"{path} does not exist: publish needs a finished build directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PublishError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(draft, dict):
        raise PublishError(f"{path} must hold a JSON object")

    problems: list[str] = []
    if draft.get("schema") != MANIFEST_SCHEMA_ID:
        problems.append(f"schema is {draft.get('schema')!r}, expected {MANIFEST_SCHEMA_ID!r}")
    for field in ("variant", "version"):
        if problem := segment_problem(draft.get(field), field):
            problems.append(problem)
    if draft.get("version") == LATEST:
        problems.append(f"version {draft.get('version')!r} is reserved")

    verification = draft.get("verification")
    if not isinstance(verification, dict) or not verification:
        problems.append("verification is missing or empty: only verified builds are published")
        verification = {}
    for precision, result in sorted(verification.items()):
        passed = isinstance(result, dict) and result.get("passed") is True
        if not passed:
            detail = ""
            if isinstance(result, dict):
                detail = (
                    f" (failed_cells={result.get('failed_cells')!r} of {result.get('cells')!r}, "
                    f"max_abs_err={result.get('max_abs_err')!r}, report {result.get('report')!r})"
                )
            problems.append(f"verification of {precision!r} did not pass{detail}")

    artifacts = draft.get("artifacts")
    files: list[tuple[dict[str, Any], Path]] = []
    if not isinstance(artifacts, list) or not artifacts:
        problems.append("artifacts is missing or empty")
        artifacts = []
    seen_names: set[str] = set()
    seen_files: set[str] = set()
    for index, artifact in enumerate(artifacts):
        if not isinstance(artifact, dict):
            problems.append(f"artifacts[{index}] is not an object")
            continue
        name, file = artifact.get("name"), artifact.get("file")
        label = f"artifact {name!r}"
        if problem := segment_problem(name, f"artifacts[{index}].name"):
            problems.append(problem)
        if problem := file_name_problem(file):
            problems.append(f"{label}: {problem}")
            continue
        if name in seen_names or file in seen_files:
            problems.append(f"{label}: name or file {file!r} is listed twice")
        seen_names.add(str(name))
        seen_files.add(file)
        if name not in verification and artifact.get("precision") not in verification:
            problems.append(
                f"{label}: no verification entry for its name or precision "
                f"{artifact.get('precision')!r}"
            )
        size, sha = artifact.get("size"), artifact.get("sha256")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or not is_sha256_hex(sha):
            problems.append(f"{label}: size must be an integer and sha256 64 lowercase hex digits")
            continue
        local = build_dir / file
        if not local.is_file():
            problems.append(f"{label}: file {local} is missing")
            continue
        actual_size = local.stat().st_size
        if actual_size != size:
            problems.append(f"{label}: {local} is {actual_size} bytes, the manifest says {size}")
            continue
        actual_sha = sha256_file(local)
        if actual_sha != sha:
            problems.append(f"{label}: {local} has sha256 {actual_sha}, the manifest says {sha}")
            continue
        files.append((artifact, local))

    if problems:
        raise PublishError(
            f"Refusing to publish {build_dir}: nothing was uploaded.\n  - " + "\n  - ".join(problems)
        )
    return draft, files


def _final_manifest(
    draft: dict[str, Any], store: StoreConfig, manifest_version: int, previous: str | None
) -> dict[str, Any]:
    doc = copy.deepcopy(draft)
    doc["manifest_version"] = manifest_version
    doc["previous_manifest_sha256"] = previous
    for artifact in doc["artifacts"]:
        # A revert keeps its artifacts' keys (under the reverted-to version); a build has none.
        if "s3_key" not in artifact:
            artifact["s3_key"] = layout.artifact_key(store.prefix, doc["variant"], doc["version"], artifact["file"])
    return doc


# -- the release protocol -----------------------------------------------------------------------

def _pointer_body(target: dict[str, Any], signer: Signer | None, ttl: timedelta) -> bytes:
    if signer is None:
        return canonical_json(target)
    return sign_pointer(target, signer, expires=datetime.now(UTC) + ttl)


def _advance_pointer(
    s3: ConditionalWriter, store: StoreConfig, target: dict[str, Any], signer: Signer | None, ttl: timedelta
) -> bool:
    """Move the pointer to `target` unless it already names this or a newer release."""
    key = layout.pointer_key(store.prefix, target["variant"])
    body = _pointer_body(target, signer, ttl)
    sha = sha256_bytes(body)
    for attempt in range(MAX_CAS_ATTEMPTS):
        current = s3.read_pointer(key)
        if current is not None:
            doc, etag = current
            if doc["manifest_version"] > target["manifest_version"]:
                return False  # a newer release won: never roll back
            if doc["manifest_version"] == target["manifest_version"]:
                if doc["manifest_sha256"] != target["manifest_sha256"]:
                    raise PublishError(
                        f"{s3.url(key)} names manifest_version {doc['manifest_version']} with "
                        f"manifest {doc['manifest_sha256']}, but release record "
                        f"{target['manifest_version']} names {target['manifest_sha256']}: the store "
                        "is inconsistent (was the pointer edited by hand?)."
                    )
                return False
        else:
            etag = None
        if s3.put_if_match(key, sha, body, etag):
            # Read back: ours, or already replaced by a newer release; anything else is wrong.
            after = s3.read_pointer(key)
            if after is None or after[0]["manifest_version"] < target["manifest_version"]:
                raise PublishError(f"{s3.url(key)} does not hold the pointer just written")
            if after[0]["manifest_version"] == target["manifest_version"] and record_fields(after[0]) != target:
                raise PublishError(f"{s3.url(key)} does not hold the pointer just written")
            return True
        backoff(attempt)
    raise PublishError(
        f"Gave up moving {s3.url(key)} after {MAX_CAS_ATTEMPTS} lost compare-and-swaps; "
        "another publisher is very busy. Re-run the publish."
    )


def _store_signature(
    s3: ConditionalWriter, store: StoreConfig, variant: str, version: str, files: dict[str, str], signer: Signer
) -> tuple[str, str]:
    """Sign the release folder `files` and store `<version>/release.sig`; its (key, sha256).

    Created with If-None-Match like the artifacts. A signature already there is reused when it is
    ours for exactly these files (a crashed run's: ECDSA signatures differ at every signing, so
    signing again would not give the same bytes). One that signs other files belongs to a
    manifest that was renumbered before it was ever released (released manifests never change),
    so it is replaced by compare-and-swap. The same files signed by another key are refused.
    """
    key = layout.artifact_key(store.prefix, variant, version, SIGNATURE_NAME)
    for attempt in range(MAX_CAS_ATTEMPTS):
        existing = s3.read(key)
        etag = None
        if existing is not None:
            raw, etag = existing
            try:
                if dict(verify_release_signature(raw, [signer.public_key_pem()]).files) == files:
                    return key, sha256_bytes(raw)
            except UntrustedKeyError:
                if _unverified_signed_files(raw) == files:
                    raise VersionConflictError(
                        f"{s3.url(key)} already signs this release with another key. A released "
                        "version's signature is immutable: publish with the key that signed it, or "
                        "revert_release to this version to sign a new release of the same files."
                    ) from None
            except SignatureError:
                pass  # damaged, or signs other files: stale, replaced below
        body = sign_release_files(files, signer, name=version)
        sha = sha256_bytes(body)
        if s3.put_if_match(key, sha, body, etag):
            s3.check_written(key, sha)
            return key, sha
        backoff(attempt)
    raise PublishError(f"Gave up writing {s3.url(key)}: other publishers kept replacing it")


def _unverified_signed_files(bundle: bytes) -> dict[str, str] | None:
    """The files a bundle lists, without checking who signed it (only to tell a conflict apart)."""
    try:
        envelope = json.loads(bundle)["dsseEnvelope"]
        statement = json.loads(base64.b64decode(envelope["payload"]))
        return {r["name"]: r["digest"] for r in statement["predicate"]["resources"]}
    except (ValueError, KeyError, TypeError):
        return None


def _signed_files(doc: dict[str, Any], manifest_sha: str) -> dict[str, str]:
    """The complete release folder of a manifest: every artifact and document, and manifest.json."""
    files = {a["file"]: a["sha256"] for a in (*doc["artifacts"], *(doc.get("documents") or []))}
    files[MANIFEST_NAME] = manifest_sha
    return files


def publish_build(
    build_dir: Path,
    *,
    client: Any,
    store: StoreConfig,
    signer: Signer | None = None,
    pointer_ttl: timedelta = DEFAULT_POINTER_TTL,
    documents: DocumentRenderer | None = None,
) -> PublishResult:
    """Upload a verified build and make it the variant's latest release.

    Idempotent and crash-safe: re-running after any failure completes the publish; publishing an
    already released version writes nothing.

    Args:
        build_dir: folder with the artifact files and the draft `manifest.json`.
        client: a boto3 S3 client (`store.make_s3_client(store)`).
        store: bucket and prefix to publish under.
        signer: the release signing key. With it, the release folder (artifacts + manifest.json)
            is signed (`<version>/release.sig`, pinned by the release record) before the pointer
            moves, and the pointer is signed with an expiry. Without it the release is unsigned,
            which consumers that trust a key refuse.
        pointer_ttl: how long the signed pointer stays valid; the scheduled `refresh_pointer`
            must run well within it.
        documents: renders the release's documents (README.md, report.html) from its final
            manifest; they are published beside the artifacts, listed in the manifest and signed
            with the release. None: a release without documents.

    Returns:
        PublishResult with the manifest key, its SHA-256, `manifest_version` and signature key.

    Raises:
        PublishError: the draft failed verification, a file is missing or differs from the draft
            (nothing is written then), or the store misbehaved.
        VersionConflictError: this version already exists in the store with different content.
        StoreAuthError / StoreUnreachableError: credentials refused / endpoint unreachable.
    """
    build_dir = Path(build_dir)
    draft, files = _read_draft(build_dir)
    for field in (*PUBLISH_FIELDS, "documents"):
        draft.pop(field, None)
    for artifact in draft["artifacts"]:
        artifact.pop("s3_key", None)  # a build's artifacts live under its own version
    if errors := manifest_schema_errors(_final_manifest(draft, store, 1, None)):
        raise PublishError(
            f"Refusing to publish {build_dir}: the manifest would not match "
            f"{MANIFEST_SCHEMA_PATH.name}; nothing was uploaded.\n  - " + "\n  - ".join(errors)
        )

    s3 = ConditionalWriter(client, store)
    for artifact, local in files:
        key = layout.artifact_key(store.prefix, draft["variant"], draft["version"], artifact["file"])
        s3.put_immutable(key, artifact["sha256"], local, "application/octet-stream")
    return publish_manifest(s3, store, draft, signer, pointer_ttl, documents)


def publish_manifest(
    s3: ConditionalWriter, store: StoreConfig, draft: dict[str, Any], signer: Signer | None, ttl: timedelta,
    documents: DocumentRenderer | None = None,
) -> PublishResult:
    """Write the manifest of `draft` (artifacts already in place) and its documents, sign, claim a
    number, move the pointer."""
    variant, version = draft["variant"], draft["version"]
    manifest_key = layout.manifest_key(store.prefix, variant, version)
    identity = _release_identity(draft)
    for attempt in range(_MAX_RELEASE_ATTEMPTS):
        existing = s3.read_json(manifest_key)
        manifest_etag: str | None = None
        if existing is not None:
            doc, raw, manifest_etag = existing
            if not isinstance(doc, dict) or _release_identity(doc) != identity:
                raise VersionConflictError(
                    f"{store.url(manifest_key)} already exists for a different build: its source "
                    "or artifact digests differ from this build's. Objects under a version are "
                    "immutable; a different build must get a different version id."
                )
            mv = doc.get("manifest_version")
            if not isinstance(mv, int) or mv < 1:
                raise PublishError(f"{store.url(manifest_key)} has no valid manifest_version")
            sha = sha256_bytes(raw)
            record_key = layout.release_record_key(store.prefix, variant, mv)
            record = s3.read_pointer(record_key)
            if record is not None and record[0]["manifest_key"] == manifest_key:
                if record[0]["manifest_sha256"] != sha:
                    raise PublishError(
                        f"Release record {store.url(record_key)} pins "
                        f"manifest sha256 {record[0]['manifest_sha256']} but "
                        f"{store.url(manifest_key)} now has {sha}: the released manifest was "
                        "modified in the store. Restore it; do not republish over it."
                    )
                # Released before (signed or not, as it was then): at most move the pointer.
                return move_pointer(s3, store, record_fields(record[0]), signer, ttl)
            if record is None:
                # Written by a publish that stopped before claiming its number: claim it now.
                _check_documents(s3, doc)
                signature = _sign(s3, store, doc, sha, signer)
                if (claimed := _claim(s3, store, release_record(variant, version, manifest_key, sha, mv, signature))):
                    return move_pointer(s3, store, claimed, signer, ttl)
                backoff(attempt)
                continue
            # Its number went to another release: this manifest was never released; renumber it.

        tail = log_tail(s3.client, store, variant)
        mv = tail["manifest_version"] + 1 if tail else 1
        previous = tail["manifest_sha256"] if tail else None
        doc = _final_manifest(draft, store, mv, previous)
        if signer is not None:  # so the documents can say who signs the release; the signature proves it
            doc["signed_by"] = signer.key_id
        if documents is not None:
            doc["documents"] = _publish_documents(s3, store, doc, _manifest_of(s3, tail), documents)
        if errors := manifest_schema_errors(doc):
            raise PublishError("The final manifest does not match the schema:\n  - " + "\n  - ".join(errors))
        body = canonical_json(doc)
        sha = sha256_bytes(body)
        if not s3.put_if_match(manifest_key, sha, body, manifest_etag):
            backoff(attempt)  # another publisher of this version wrote it first: look again
            continue
        s3.check_written(manifest_key, sha)
        signature = _sign(s3, store, doc, sha, signer)
        if (claimed := _claim(s3, store, release_record(variant, version, manifest_key, sha, mv, signature))):
            return move_pointer(s3, store, claimed, signer, ttl)
        backoff(attempt)  # lost manifest_version `mv` to a racing release: renumber and retry
    raise PublishError(
        f"Gave up publishing {variant}/{version} after {_MAX_RELEASE_ATTEMPTS} lost races for a "
        "manifest_version; other publishers are very busy. Re-run the publish."
    )


def _manifest_of(s3: ConditionalWriter, record: dict[str, Any] | None) -> dict[str, Any] | None:
    """The released manifest a release record names, checked against the sha256 it pins."""
    if record is None:
        return None
    found = s3.read_json(record["manifest_key"])
    if found is None or sha256_bytes(found[1]) != record["manifest_sha256"] or not isinstance(found[0], dict):
        raise PublishError(
            f"{s3.url(record['manifest_key'])} is missing or does not have the sha256 release "
            f"{record['manifest_version']} pins: the released manifest was modified in the store. Restore it first."
        )
    return found[0]


def _publish_documents(s3: ConditionalWriter, store: StoreConfig, doc: dict[str, Any],
                       previous: dict[str, Any] | None, render: DocumentRenderer) -> list[dict[str, Any]]:
    """Render and upload the documents of the final manifest `doc`; their entries for its `documents`.

    Written before the manifest that names them, so until then they may be replaced (a renumbered
    manifest renders them again: its number and predecessor changed).
    """
    artifact_files = {a["file"] for a in doc["artifacts"]}
    entries = []
    where = store.url(layout.variant_folder(store.prefix, doc["variant"]))
    for name, body in sorted(render(doc, previous, where).items()):
        suffix = "." + name.rsplit(".", 1)[-1]
        problem = (file_name_problem(name) or ("an artifact has that name" if name in artifact_files else None)
                   or (None if suffix in DOCUMENT_TYPES else f"only {', '.join(DOCUMENT_TYPES)} documents are published"))
        if problem:
            raise PublishError(f"Cannot publish the document {name!r}: {problem}")
        key = layout.artifact_key(store.prefix, doc["variant"], doc["version"], name)
        sha = sha256_bytes(body)
        s3.put_unreleased(key, sha, body, DOCUMENT_TYPES[suffix])
        entries.append({"file": name, "size": len(body), "sha256": sha, "media_type": DOCUMENT_TYPES[suffix],
                        "s3_key": key})
    return entries


def _check_documents(s3: ConditionalWriter, doc: dict[str, Any]) -> None:
    """Refuse to release a manifest whose documents are not what it lists (a racing publisher of
    the same version replaced them between writing them and writing its manifest)."""
    for entry in doc.get("documents") or []:
        stored = s3.stored_sha256(entry["s3_key"])
        if stored != entry["sha256"]:
            raise PublishError(
                f"{s3.url(entry['s3_key'])} {'is missing' if stored is None else f'has sha256 {stored}'}, but the "
                f"unreleased manifest of {doc['variant']} {doc['version']} lists {entry['sha256']} (another "
                "publisher of this version replaced it). Re-run the publish."
            )


def _sign(
    s3: ConditionalWriter, store: StoreConfig, doc: dict[str, Any], manifest_sha: str, signer: Signer | None
) -> tuple[str, str] | None:
    if signer is None:
        return None
    return _store_signature(s3, store, doc["variant"], doc["version"], _signed_files(doc, manifest_sha), signer)


def _claim(s3: ConditionalWriter, store: StoreConfig, target: dict[str, Any]) -> dict[str, Any] | None:
    """Create the release record of `target`; the record if this manifest holds the number, else None.

    The stored record wins over `target`: a racing publisher of the same manifest may have claimed
    it first (then with its own signature, which is the one the release keeps).
    """
    key = layout.release_record_key(store.prefix, target["variant"], target["manifest_version"])
    body = canonical_json(target)
    if s3.put_if_match(key, sha256_bytes(body), body, None):
        s3.check_written(key, sha256_bytes(body))
        return target
    found = s3.read_pointer(key)
    if found is not None and (
        found[0]["manifest_key"] == target["manifest_key"]
        and found[0]["manifest_sha256"] == target["manifest_sha256"]
    ):
        return record_fields(found[0])
    return None


def move_pointer(
    s3: ConditionalWriter, store: StoreConfig, target: dict[str, Any], signer: Signer | None, ttl: timedelta
) -> PublishResult:
    _advance_pointer(s3, store, target, signer, ttl)
    rewrite_indexes(s3, target["variant"])
    return PublishResult(
        variant=target["variant"],
        version=target["version"],
        manifest_key=target["manifest_key"],
        manifest_sha256=target["manifest_sha256"],
        manifest_version=target["manifest_version"],
        pointer_key=layout.pointer_key(store.prefix, target["variant"]),
        uploaded=list(s3.uploaded),
        already_published=not s3.uploaded,
        signature_key=target.get("signature_key"),
        signature_sha256=target.get("signature_sha256"),
    )
