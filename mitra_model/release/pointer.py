"""The signed, expiring pointer: `latest.json` as TUF's timestamp role.

The pointer carries `expires` and a DSSE envelope (`"dsse"`) whose payload is the canonical JSON of
every other field of the pointer. The readable fields stay beside the envelope so that tools which
do not verify keep working; a verifying reader trusts only the payload and refuses a pointer whose
readable fields differ from it. One object, so the compare-and-swap that moves the pointer also
moves its signature (a separate `latest.json.sig` could be read half-updated).

What a verifying puller refuses, and with which error (TUF's attack list):
    unsigned release or pointer          UnsignedReleaseError
    signed by a key it does not trust    UntrustedKeyError
    tampered bundle or pointer           BadSignatureError
    arbitrary artifact, mix-and-match    NotSignedContentError  (`signature.SignedContent.check_file`)
    indefinite freeze                    ExpiredPointerError    (`verify_pointer`)
    rollback                             RollbackError          (`check_not_rolled_back`)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import ValidationError, field_validator

from mitra_model.errors import (
    BadSignatureError,
    ExpiredPointerError,
    RollbackError,
    StoreDocumentError,
    UnsignedReleaseError,
)
from mitra_model.release.keys import Signer, trusted_keys_by_id, verify_envelope
from mitra_model.release.layout import SIGNATURE_NAME
from mitra_model.release.objects import parse_json
from mitra_model.release.rules import Pointer, canonical_json, is_sha256_hex, pointer_problems

DEFAULT_POINTER_TTL = timedelta(days=30)
POINTER_PAYLOAD_TYPE = "application/vnd.mitra-build.pointer+json"
POINTER_ENVELOPE_FIELD = "dsse"


RELEASE_SIGNATURE_FIELDS = ("signature_key", "signature_sha256")  # in a signed release's record
POINTER_ONLY_FIELDS = ("expires", POINTER_ENVELOPE_FIELD)  # in a signed pointer only


def record_problems(doc: Any) -> list[str]:
    """Why `doc` is not a valid release record or pointer, signed or not.

    `release.pointer_problems` checks the fields every record has; this also accepts (and checks)
    the signed release's `signature_key` / `signature_sha256` and the signed pointer's `expires`
    and envelope.

    Args:
        doc: a parsed record or pointer (any JSON value).

    Returns:
        One message per problem; empty when `doc` is valid.
    """
    if not isinstance(doc, dict):
        return [f"expected a JSON object, got {type(doc).__name__}"]
    extra = (*RELEASE_SIGNATURE_FIELDS, *POINTER_ONLY_FIELDS)
    problems = pointer_problems({k: v for k, v in doc.items() if k not in extra})
    key, sha = doc.get("signature_key"), doc.get("signature_sha256")
    if (key is None) != (sha is None):
        problems.append("signature_key and signature_sha256 go together")
    if key is not None and (not isinstance(key, str) or not key.endswith("/" + SIGNATURE_NAME)):
        problems.append(f"signature_key must be the key of a {SIGNATURE_NAME}, got {key!r}")
    if sha is not None and not is_sha256_hex(sha):
        problems.append("signature_sha256 must be 64 lowercase hex digits")
    if "expires" in doc and not isinstance(doc["expires"], str):
        problems.append("expires must be an ISO 8601 string")
    return problems


class SignedPointer(Pointer):
    """A verified `latest.json`: the release it names and until when that statement holds.

    The fields of `release.Pointer`, plus:

    Attributes:
        signature_key / signature_sha256: the release signature object and its SHA-256 (None for
            an unsigned release, which a consumer with trusted keys refuses).
        expires: after this (UTC) the pointer must not be trusted: a frozen store is refused.
        key_id: the trusted key that signed the pointer.
    """

    signature_key: str | None = None
    signature_sha256: str | None = None
    expires: datetime
    key_id: str = ""

    @field_validator("expires")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("expires must carry a time zone (UTC, e.g. 2026-12-31T00:00:00Z)")
        return value.astimezone(UTC)


def format_time(moment: datetime) -> str:
    """UTC ISO 8601 with a 'Z', to the second: how `expires` is written."""
    return moment.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def sign_pointer(record: Mapping[str, Any], signer: Signer, *, expires: datetime) -> bytes:
    """The bytes of a signed `latest.json` naming the release of `record`.

    Args:
        record: the release record (pointer fields, and the signature's key and sha256 if any).
        signer: the signing key (the same that signs releases).
        expires: when consumers must stop trusting it (timezone-aware).

    Returns:
        Canonical JSON: the record's fields, `expires`, and `dsse`, an envelope whose payload is
        the canonical JSON of all other fields.

    Raises:
        BadSignatureError: `record` is not a valid pointer.
    """
    body = {k: v for k, v in record.items() if k not in POINTER_ONLY_FIELDS}
    if problems := record_problems(body):
        raise BadSignatureError("Cannot sign an invalid pointer: " + "; ".join(problems))
    if expires.tzinfo is None:
        raise BadSignatureError("Cannot sign a pointer: expires must be timezone-aware (UTC)")
    body["expires"] = format_time(expires)
    envelope = signer.sign_dsse(POINTER_PAYLOAD_TYPE, canonical_json(body))
    return canonical_json({**body, POINTER_ENVELOPE_FIELD: envelope})


def verify_pointer(raw_pointer: bytes, trusted_public_keys: Sequence[bytes], now: datetime) -> SignedPointer:
    """Check a `latest.json`'s signature and expiry; return the pointer it signs.

    Args:
        raw_pointer: the bytes of `latest.json` as read from the store.
        trusted_public_keys: PEM public keys; a signature by any one of them is accepted.
        now: the current time (timezone-aware), e.g. `datetime.now(timezone.utc)`.

    Returns:
        The SignedPointer (its fields come only from the signed payload).

    Raises:
        UnsignedReleaseError: the pointer carries no signature.
        UntrustedKeyError: signed by a key not in `trusted_public_keys`.
        BadSignatureError: malformed, or its readable fields differ from what was signed.
        ExpiredPointerError: `expires` has passed (the store may be frozen on an old release).
        SigningKeyError: no trusted key given.
    """
    trusted = trusted_keys_by_id(trusted_public_keys, "the pointer")
    what = "The pointer (latest.json)"
    try:
        outer = parse_json(raw_pointer, what)
    except StoreDocumentError as exc:
        raise BadSignatureError(f"{exc}: it was damaged or tampered with.") from None
    if not isinstance(outer, dict):
        raise BadSignatureError(f"{what} is not a JSON object.")
    if POINTER_ENVELOPE_FIELD not in outer:
        raise UnsignedReleaseError(
            f"{what} is not signed, and trusted keys are configured. Refusing it: the publisher must "
            "publish with a signing key or run refresh_pointer (the scheduled run) to sign it."
        )
    envelope = outer[POINTER_ENVELOPE_FIELD]
    payload, key_id = verify_envelope(envelope, POINTER_PAYLOAD_TYPE, trusted, [], what)
    try:
        signed = parse_json(payload, f"The payload {what[0].lower()}{what[1:]} signs")
    except StoreDocumentError as exc:
        raise BadSignatureError(f"{exc}.") from None
    readable = {k: v for k, v in outer.items() if k != POINTER_ENVELOPE_FIELD}
    if signed != readable:
        raise BadSignatureError(
            f"{what}'s readable fields differ from the fields it signs: it was edited after "
            "signing (tampered). Refusing it."
        )
    if problems := record_problems(signed):
        raise BadSignatureError(f"{what} signs an invalid pointer: " + "; ".join(problems))
    try:
        pointer = SignedPointer.model_validate({**signed, "key_id": key_id})
    except ValidationError as exc:
        raise BadSignatureError(f"{what} signs an invalid pointer: {exc.errors()[0]['msg']}") from None
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware, e.g. datetime.now(timezone.utc)")
    if pointer.expires <= now:
        raise ExpiredPointerError(
            f"{what} for {pointer.variant} expired at {format_time(pointer.expires)} (now "
            f"{format_time(now)}): the store may be frozen on an old release. Refusing it; the "
            "publisher's scheduled refresh_pointer must run (or check that this mirror is current)."
        )
    return pointer


def check_not_rolled_back(
    pointer: SignedPointer, newest_record: Mapping[str, Any] | None, *, known_manifest_version: int | None = None
) -> None:
    """Refuse a replayed, older pointer (TUF's rollback attack).

    Args:
        pointer: the verified pointer.
        newest_record: the newest release record in the store (`publish.newest_release_record`,
            walked from the pointer's manifest_version), or None.
        known_manifest_version: the newest manifest_version this consumer already holds (e.g. from
            DEST's pull state), if any.

    Raises:
        RollbackError: a newer release exists than the one the pointer names.
    """
    newest = newest_record.get("manifest_version") if newest_record else None
    if isinstance(newest, int) and newest > pointer.manifest_version:
        raise RollbackError(
            f"The pointer of {pointer.variant} names manifest_version {pointer.manifest_version} "
            f"(version {pointer.version!r}), but release record {newest} exists: this is an older "
            "pointer replayed (rollback), or a publish stopped before moving the pointer. Refusing "
            "it; the publisher must re-run the publish or refresh_pointer."
        )
    if known_manifest_version is not None and known_manifest_version > pointer.manifest_version:
        raise RollbackError(
            f"The pointer of {pointer.variant} names manifest_version {pointer.manifest_version}, "
            f"older than manifest_version {known_manifest_version} already pulled: rollback refused."
        )
