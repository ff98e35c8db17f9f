"""The documents of a release and their rules, shared by publish.py (writer) and pull.py (reader).

A pointer (`latest.json`) and a release record (`_releases/<N>.json`) have the same body:
    {"schema": "mitra-build/pointer/v1", "variant", "version", "manifest_key",
     "manifest_sha256", "manifest_version"}
plus, for a signed release, "signature_key" and "signature_sha256" (its `release.sig`), and, in a
signed pointer only, "expires" and "dsse" (the envelope `pointer.verify_pointer` checks).
The manifest follows config/manifest.schema.json. Where they live is `layout.py`'s business;
how they are written and read is publish.py's and pull.py's. No boto3 here, so that both sides
(and tools that only inspect a release) can use these rules without a store.
"""

from __future__ import annotations

import functools
import hashlib
import json
from importlib.resources import files
from typing import Any

from jsonschema import Draft202012Validator
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator, model_validator

from mitra_model.release.layout import MANIFEST_NAME, POINTER_SCHEMA_ID, SIGNATURE_NAME

MANIFEST_SCHEMA_PATH = files("mitra_model") / "data" / "manifest.schema.json"  # package data (config/ in a checkout)
LATEST = "latest"  # `pull_release(version="latest")` follows the pointer, so no version may be named so

_HEX64 = frozenset("0123456789abcdef")


def segment_problem(value: Any, what: str) -> str | None:
    """Why `value` is not a safe single key segment (variant, version, artifact name).

    Args:
        value: the candidate, straight from a file or the store (any type).
        what: its name for the message, e.g. "variant".

    Returns:
        A message naming the problem, or None when `value` is safe.
    """
    if not isinstance(value, str) or not value:
        return f"{what} must be a non-empty string, got {value!r}"
    if ".." in value or "/" in value or "\\" in value or ":" in value:
        return f"{what} {value!r} must not contain '..', '/', '\\' or ':'"
    if not value[0].isalnum() or not all(c.isalnum() or c in "._+-" for c in value):
        return f"{what} {value!r} must start with a letter or digit and use only letters, digits, '.', '_', '+', '-'"
    if len(value) > 128:
        return f"{what} {value!r} is longer than 128 characters"
    return None


def file_name_problem(value: Any) -> str | None:
    """Why `value` is not a safe plain file name inside a release folder.

    Refuses '..', absolute paths, folders, backslashes, drive letters ('C:'), hidden files (which
    also keeps artifacts apart from pull's own `.mitra-pull*` files) and 'manifest.json' (which
    would collide with the manifest).

    Args:
        value: the candidate, straight from a manifest (any type).

    Returns:
        A message naming the problem, or None when `value` is safe.
    """
    if not isinstance(value, str) or not value:
        return f"file name must be a non-empty string, got {value!r}"
    if value.startswith("/") or value.startswith("\\"):
        return f"file name {value!r} is an absolute path"
    if len(value) >= 2 and value[1] == ":":
        return f"file name {value!r} starts with a drive letter"
    if "\\" in value:
        return f"file name {value!r} contains a backslash"
    if ".." in value:
        return f"file name {value!r} contains '..'"
    if "/" in value:
        return f"file name {value!r} names a folder; only plain file names are allowed"
    if value.startswith("."):
        return f"file name {value!r} is hidden (starts with '.')"
    if ":" in value or not all(c.isalnum() or c in "._+-" for c in value):
        return f"file name {value!r} may only use letters, digits, '.', '_', '+', '-'"
    if value == MANIFEST_NAME:
        return f"file name {value!r} is reserved for the manifest"
    return None


def is_sha256_hex(value: Any) -> bool:
    """True when `value` is a SHA-256 digest as we write them: 64 lowercase hex digits."""
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX64


def canonical_json(doc: Any) -> bytes:
    """The exact bytes we store for a JSON document (its SHA-256 is what gets pinned).

    Args:
        doc: a JSON-serialisable document.

    Returns:
        UTF-8 JSON, keys sorted, 2-space indent, one trailing newline.
    """
    return (json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def sha256_bytes(data: bytes) -> str:
    """The SHA-256 of `data` as 64 lowercase hex digits."""
    return hashlib.sha256(data).hexdigest()


@functools.cache
def _validator() -> Draft202012Validator:
    schema = json.loads(MANIFEST_SCHEMA_PATH.read_text(encoding="utf-8"))
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def manifest_schema_errors(doc: Any) -> list[str]:
    """Every way `doc` violates the manifest schema (config/manifest.schema.json).

    Args:
        doc: a parsed manifest (any JSON value).

    Returns:
        One 'path: message' line per violation, sorted by path; empty when `doc` is valid.
    """
    errors = sorted(_validator().iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    lines = []
    for error in errors:
        path = "/".join(str(p) for p in error.absolute_path) or "<root>"
        lines.append(f"{path}: {error.message}")
    return lines


def pointer_doc(
    variant: str, version: str, manifest_key: str, manifest_sha256: str, manifest_version: int
) -> dict[str, Any]:
    """The body of a pointer or release record naming one released manifest."""
    return {
        "schema": POINTER_SCHEMA_ID,
        "variant": variant,
        "version": version,
        "manifest_key": manifest_key,
        "manifest_sha256": manifest_sha256,
        "manifest_version": manifest_version,
    }


class Pointer(BaseModel):
    """A pointer (`latest.json`) or release record (`_releases/<N>.json`), as pull reads it.

    Attributes:
        schema_: always POINTER_SCHEMA_ID (JSON key "schema").
        variant / version: safe key segments (see `segment_problem`).
        manifest_key: the key of the manifest this release names.
        manifest_sha256: SHA-256 of that manifest's bytes, 64 lowercase hex digits.
        manifest_version: the release's sequence number, >= 1.
        signature_key / signature_sha256: a signed release's `release.sig` and its SHA-256 (both
            or neither; None for an unsigned release).
        expires / dsse: a signed pointer's expiry (ISO 8601) and DSSE envelope, as stored. Read
            here only so that a reader that does not verify accepts a signed pointer; they are
            trusted only after `pointer.verify_pointer`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    schema_: str = Field(alias="schema")
    variant: str
    version: str
    manifest_key: str = Field(min_length=1)
    manifest_sha256: str
    manifest_version: StrictInt = Field(ge=1)
    signature_key: str | None = None
    signature_sha256: str | None = None
    expires: str | None = None
    dsse: dict[str, Any] | None = None

    @field_validator("schema_")
    @classmethod
    def _known_schema(cls, value: str) -> str:
        if value != POINTER_SCHEMA_ID:
            raise ValueError(f"schema is {value!r}, expected {POINTER_SCHEMA_ID!r}")
        return value

    @field_validator("variant", "version")
    @classmethod
    def _safe_segment(cls, value: str, info: Any) -> str:
        if problem := segment_problem(value, info.field_name):
            raise ValueError(problem)
        return value

    @field_validator("manifest_sha256", "signature_sha256")
    @classmethod
    def _hex(cls, value: str | None, info: Any) -> str | None:
        if value is not None and not is_sha256_hex(value):
            raise ValueError(f"{info.field_name} must be 64 lowercase hex digits")
        return value

    @field_validator("signature_key")
    @classmethod
    def _signature_file(cls, value: str | None) -> str | None:
        if value is not None and not value.endswith("/" + SIGNATURE_NAME):
            raise ValueError(f"signature_key must be the key of a {SIGNATURE_NAME}, got {value!r}")
        return value

    @model_validator(mode="after")
    def _signature_pair(self) -> Pointer:
        if (self.signature_key is None) != (self.signature_sha256 is None):
            raise ValueError("signature_key and signature_sha256 go together")
        return self


def pointer_problems(doc: Any) -> list[str]:
    """Why `doc` is not a valid pointer / release record (the rules of `Pointer`).

    Args:
        doc: a parsed pointer (any JSON value).

    Returns:
        One 'field: message' line per problem; empty when `doc` is valid.
    """
    if not isinstance(doc, dict):
        return [f"expected a JSON object, got {type(doc).__name__}"]
    try:
        Pointer.model_validate(doc)
    except ValidationError as exc:
        return [
            f"{'.'.join(str(p) for p in error['loc']) or '<root>'}: {error['msg'].removeprefix('Value error, ')}"
            for error in exc.errors(include_url=False)
        ]
    return []


def is_synthetic(manifest: dict[str, Any]) -> bool:
    """True when a (schema-checked) manifest says its weights are SYNTHETIC (random, not a real
    checkpoint): `source.synthetic`."""
    source = manifest.get("source")
    return bool(isinstance(source, dict) and source.get("synthetic") is True)
