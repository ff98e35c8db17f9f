"""The pull's chain of trust: nothing the store says is used until it is checked.

The pointer (`latest.json`) or, for an explicit version, the release record (`_releases/<N>.json`)
pins the manifest's SHA-256; the manifest pins every artifact's size and SHA-256. Names from the
store are only used as plain file names. A pointer older than the newest release record is refused
(a rolled-back or frozen pointer).

With trusted keys the store itself is not trusted either (TUF's attack list, see pointer.py): the
pointer's signature and expiry and then rollback (`fetch_pinned_manifest`), the manifest's SHA-256
against the signed pointer, the release signature pinned by the signed pointer
(`verified_signature`). An explicit version is a choice, not a pointer to follow: its release record
replaces the pointer, so neither expiry nor rollback applies; its signature is still required.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from botocore.exceptions import ClientError

from mitra_model.errors import (
    BadSignatureError,
    ChecksumMismatchError,
    MitraBuildError,
    PullError,
    StoreDocumentError,
    UnsignedReleaseError,
)
from mitra_model.release import layout
from mitra_model.release.layout import (
    POINTER_SCHEMA_ID,
    READABLE_MANIFEST_SCHEMA_IDS,
    SIGNATURE_NAME,
)
from mitra_model.release.local import LocalRelease
from mitra_model.release.log import newest_release_record
from mitra_model.release.objects import parse_json, read_object
from mitra_model.release.pointer import check_not_rolled_back, verify_pointer
from mitra_model.release.rules import (
    LATEST,
    Pointer,
    file_name_problem,
    manifest_schema_errors,
    pointer_problems,
    segment_problem,
    sha256_bytes,
)
from mitra_model.release.signature import SignedContent, verify_release_signature
from mitra_model.release.store import (
    StoreConfig,
    describe_client_error,
    is_not_found,
    list_common_prefixes,
    list_objects,
    store_errors,
)


@dataclass(frozen=True)
class VerifiedSignature:
    """A verified release signature: its bytes (written into DEST) and what it signs."""

    bundle: bytes
    sha256: str
    content: SignedContent


def _verified_pointer(
    client: Any, store: StoreConfig, variant: str, raw: bytes, trusted: tuple[bytes, ...], local: LocalRelease
) -> dict[str, Any]:
    """The signed pointer's fields, after its signature, its expiry and rollback were checked."""
    pointer = verify_pointer(raw, trusted, datetime.now(UTC))
    if pointer.variant != variant:  # a validly signed pointer of another variant, put in this one's place
        raise PullError(
            f"{store.url(layout.pointer_key(store.prefix, variant))} is the signed pointer of {pointer.variant!r}, not "
            f"of {variant!r}: it was copied over this variant's pointer. Refusing to follow it; nothing was pulled.")
    try:
        newest = newest_release_record(client, store, variant, after=pointer.manifest_version)
    except StoreDocumentError as exc:  # e.g. the signed pointer names a record that does not exist
        raise PullError(f"{exc} Nothing was pulled.") from None
    check_not_rolled_back(
        pointer, newest, known_manifest_version=local.record.manifest_version if local.record else None
    )
    return pointer.model_dump(by_alias=True, exclude={"expires", "dsse", "key_id"})


def verified_signature(client: Any, store: StoreConfig, pin: dict[str, Any], trusted: tuple[bytes, ...], *,
                       pinned_by: str = "its release record") -> VerifiedSignature:
    """Read the release signature the (verified) pointer or release record pins, and verify it.

    Args:
        pinned_by: what `pin` is, for messages: "its release record" (@VERSION) or "the signed pointer".
    """
    variant, version = pin["variant"], pin["version"]
    what = f"{variant} {version} (manifest_version {pin['manifest_version']})"
    key, pinned = pin.get("signature_key"), pin.get("signature_sha256")
    if key is None or pinned is None:
        raise UnsignedReleaseError(
            f"{what} is not signed ({pinned_by} names no {SIGNATURE_NAME}), and trusted keys "
            "are configured. Refusing it; nothing was pulled. The publisher must sign it (publish "
            "with a signing key, or `mitra-build revert` to a signed release); or pull without "
            "trusted keys to accept unsigned releases."
        )
    expected = layout.signature_key(store.prefix, variant, version)
    if key != expected:
        raise BadSignatureError(
            f"{pinned_by[0].upper()}{pinned_by[1:]} of {what} names the signature {store.url(key)}, not "
            f"{store.url(expected)}: it was tampered with. Refusing it; nothing was pulled."
        )
    bundle = _read(client, store, key)
    if bundle is None:
        raise BadSignatureError(
            f"{store.url(key)}, the signature of {what}, does not exist: it was deleted from the "
            "store. Refusing the release; nothing was pulled. The publisher must restore it."
        )
    actual = sha256_bytes(bundle)
    if actual != pinned:
        raise BadSignatureError(
            f"{store.url(key)} has sha256 {actual}, but {pinned_by} pins {pinned}: the "
            "signature was replaced in the store. Refusing the release; nothing was pulled."
        )
    return VerifiedSignature(bundle=bundle, sha256=actual, content=verify_release_signature(bundle, trusted))


def refuse_stale_pointer(client: Any, store: StoreConfig, variant: str, pin: dict[str, Any]) -> None:
    """Refuse a pointer older than the release log (rolled back, or frozen at an old release).

    Release records are claimed consecutively, so a pointer is current iff record N+1 is absent:
    one HEAD, and no list permission needed. Only when it exists is the log listed, to name the
    newest record.
    """
    mv = pin["manifest_version"]
    if _head_exists(client, store, layout.release_record_key(store.prefix, variant, mv + 1)):
        newest = mv + 1
        with contextlib.suppress(MitraBuildError, ClientError):  # listing may not be allowed
            folder = layout.join_key(layout.variant_folder(store.prefix, variant), layout.RELEASES_DIR)
            numbers = [_record_number(o["Key"]) for o in list_objects(client, store, folder)]
            newest = max([n for n in numbers if n is not None] + [newest])
        raise PullError(
            f"{store.url(layout.pointer_key(store.prefix, variant))} names manifest_version {mv}, "
            f"but the release log already holds manifest_version {newest} "
            f"({store.url(layout.release_record_key(store.prefix, variant, newest))}): the pointer "
            "was rolled back or is frozen at an old release. Nothing was pulled. If a publish is "
            "running right now, retry in a minute; otherwise the store's pointer must be repaired "
            "(re-run the publish of the newest build)."
        )


def _record_number(key: str) -> int | None:
    name = key.rsplit("/", 1)[-1]
    stem = name.removesuffix(".json")
    return int(stem) if name.endswith(".json") and stem.isdigit() else None


def _head_exists(client: Any, store: StoreConfig, key: str) -> bool:
    with store_errors(client, store, f"checking {store.url(key)}"):
        try:
            client.head_object(Bucket=store.bucket, Key=key)
        except ClientError as exc:
            if is_not_found(exc):
                return False
            raise PullError(f"Checking {store.url(key)} failed: {describe_client_error(exc, store, client)}") from exc
    return True


def _read(client: Any, store: StoreConfig, key: str) -> bytes | None:
    found = read_object(client, store, key)
    return None if found is None else found[0]


def _json(raw: bytes, what: str) -> Any:
    return parse_json(raw, what)


def _checked_pointer(raw: bytes, what: str) -> dict[str, Any]:
    doc = _json(raw, what)
    if isinstance(doc, dict) and doc.get("schema") != POINTER_SCHEMA_ID:
        raise PullError(
            f"{what} has schema id {doc.get('schema')!r}; this mitra-build only reads "
            f"{POINTER_SCHEMA_ID!r}. Upgrade mitra-build to pull it."
        )
    if problems := pointer_problems(doc):
        raise PullError(f"{what} is not a valid pointer: " + "; ".join(problems))
    return Pointer.model_validate(doc).model_dump(by_alias=True)


def _variants_here(client: Any, store: StoreConfig) -> str:
    """What a user who misspelt a variant reads: the variants this bucket and prefix do have."""
    try:
        names = [n for n in list_common_prefixes(client, store, store.prefix) if segment_problem(n, "variant") is None
                 and _read(client, store, layout.pointer_key(store.prefix, n)) is not None]
    except Exception:  # noqa: BLE001 - a listing refused or failing must not hide the first error
        return "Check the variant's name in the URL."
    if not names:
        return f"{store.url(store.prefix)} has no released variant: check the bucket and prefix of the URL."
    return f"Variants released there: {', '.join(names)}."


def fetch_pinned_manifest(
    client: Any, store: StoreConfig, variant: str, version: str, *, trusted: tuple[bytes, ...], local: LocalRelease
) -> tuple[bytes, dict[str, Any]]:
    """The manifest's bytes and the pointer / release record that pins their SHA-256 (with trusted
    keys, the pointer's fields are those it signs)."""
    if version == LATEST:
        pin_key = layout.pointer_key(store.prefix, variant)
        pin_raw = _read(client, store, pin_key)
        if pin_raw is None:
            raise PullError(f"No release of {variant!r} in {store.url(pin_key)}: nothing was published under "
                            f"that name. {_variants_here(client, store)}")
        if trusted:
            pin = _verified_pointer(client, store, variant, pin_raw, trusted, local)
        else:
            pin = _checked_pointer(pin_raw, f"Pointer {store.url(pin_key)}")
        manifest_key = layout.manifest_key(store.prefix, variant, pin["version"])
    else:
        manifest_key = layout.manifest_key(store.prefix, variant, version)
        pin_key = ""
        pin = {}
    if pin and (pin["variant"] != variant or pin["manifest_key"] != manifest_key):
        raise PullError(
            f"{store.url(pin_key)} names {pin['variant']!r} / {pin['manifest_key']!r}, expected "
            f"{variant!r} / {manifest_key!r}; refusing to follow it"
        )

    raw = _read(client, store, manifest_key)
    if raw is None:
        if pin:
            raise PullError(f"{store.url(pin_key)} names {store.url(manifest_key)}, which does not exist")
        raise PullError(f"{variant} version {version!r} not found: {store.url(manifest_key)} does not exist")

    if not pin:  # explicit version: its release record pins the manifest
        doc = _json(raw, store.url(manifest_key))
        mv = doc.get("manifest_version") if isinstance(doc, dict) else None
        if not isinstance(mv, int) or isinstance(mv, bool) or mv < 1:
            raise PullError(f"{store.url(manifest_key)} has no valid manifest_version")
        pin_key = layout.release_record_key(store.prefix, variant, mv)
        pin_raw = _read(client, store, pin_key)
        pin = _checked_pointer(pin_raw, f"Release record {store.url(pin_key)}") if pin_raw else {}
        if not pin or pin["manifest_key"] != manifest_key or pin["variant"] != variant:
            raise PullError(
                f"{variant} version {version!r} was never released ({store.url(pin_key)} does not "
                "name it); its publish did not finish. Re-run the publish or pull 'latest'."
            )

    actual = sha256_bytes(raw)
    if actual != pin["manifest_sha256"]:
        raise ChecksumMismatchError(
            f"{store.url(manifest_key)} has sha256 {actual}, but {store.url(pin_key)} pins "
            f"{pin['manifest_sha256']}: the manifest was modified in the store. Nothing was pulled."
        )
    return raw, pin


def _key_problem(key: Any) -> str | None:
    if not isinstance(key, str) or not key:
        return f"s3_key must be a non-empty string, got {key!r}"
    if key.startswith("/") or "\\" in key or (len(key) >= 2 and key[1] == ":"):
        return f"s3_key {key!r} is absolute or has a backslash or drive letter"
    if any(part in ("", ".", "..") for part in key.split("/")):
        return f"s3_key {key!r} has an empty, '.' or '..' segment"
    return None


def _artifact_key_problem(key: str, store: StoreConfig, variant: str, file: str) -> str | None:
    """Why `key` is not `<prefix>/<variant>/<V>/<file>` for a safe version V.

    Any version, not only the manifest's own: a revert (`publish.revert_release`) is a new version
    whose manifest names the artifacts where the reverted-to version stored them. The SHA-256 the
    manifest pins (and, with trusted keys, the release signature) decide what the bytes must be.
    """
    folder = layout.variant_folder(store.prefix, variant) + "/"
    held_version = key[len(folder):].split("/")[0] if key.startswith(folder) else ""
    if segment_problem(held_version, "version") is None and key == layout.artifact_key(
        store.prefix, variant, held_version, file
    ):
        return None
    example = layout.artifact_key(store.prefix, variant, "VERSION", file)
    return f"s3_key {key!r} is not {example!r} (another variant, prefix or file name)"


MAX_LISTED_PROBLEMS = 10  # a hostile manifest can have 100k bad entries: the message names the first few


def _listed(problems: list[str]) -> str:
    shown = "".join(f"\n  - {p[:300]}" for p in problems[:MAX_LISTED_PROBLEMS])
    more = len(problems) - MAX_LISTED_PROBLEMS
    return shown + (f"\n  ... and {more} more" if more > 0 else "")


def checked_manifest(raw: bytes, pin: dict[str, Any], store: StoreConfig) -> dict[str, Any]:
    what = f"Manifest {store.url(pin['manifest_key'])}"
    doc = _json(raw, what)
    if not isinstance(doc, dict):
        raise PullError(f"{what} is not a JSON object")
    if doc.get("schema") not in READABLE_MANIFEST_SCHEMA_IDS:
        raise PullError(
            f"{what} has schema id {doc.get('schema')!r}; this mitra-build only reads "
            f"{', '.join(map(repr, READABLE_MANIFEST_SCHEMA_IDS))}. Upgrade mitra-build to pull it."
        )
    problems: list[str] = []
    for section in ("artifacts", "documents"):
        entries = doc.get(section) if isinstance(doc.get(section), list) else []
        for index, artifact in enumerate(entries):
            if not isinstance(artifact, dict):
                continue
            file = artifact.get("file")
            if problem := file_name_problem(file):
                problems.append(f"{section}[{index}]: {problem}")
                continue
            if problem := _key_problem(artifact.get("s3_key")):
                problems.append(f"{section}[{index}]: {problem}")
                continue
            if problem := _artifact_key_problem(artifact["s3_key"], store, pin["variant"], file):
                problems.append(f"{section}[{index}]: {problem}")
    if problems:
        raise PullError(f"{what} names unsafe files; nothing was pulled:" + _listed(problems))
    if errors := manifest_schema_errors(doc):
        raise PullError(f"{what} does not match the manifest schema:" + _listed(errors))
    for field_name in ("variant", "version", "manifest_version"):
        if doc[field_name] != pin[field_name]:
            raise PullError(f"{what} says {field_name}={doc[field_name]!r}, but its pointer says {pin[field_name]!r}")
    names = [a["name"] for a in doc["artifacts"]]
    files = [a["file"] for a in (*doc["artifacts"], *doc.get("documents", []))]
    if len(set(names)) != len(names) or len(set(files)) != len(files):
        raise PullError(f"{what} lists an artifact name or file twice")
    return doc
