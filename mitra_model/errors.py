"""One error hierarchy for the whole pipeline.

Every class inherits `MitraBuildError` (so the CLI can turn any of them into a clean one-paragraph
message without a traceback) and the builtin exception that fits, so callers that already catch
`FileNotFoundError`, `PermissionError`, ... keep working. Messages say what failed, what was expected,
what was found and how to fix it.
"""

from __future__ import annotations


class MitraBuildError(Exception):
    """Base class of every error the pipeline raises on purpose."""


class ConfigError(MitraBuildError, ValueError):
    """The build configuration (config/*.toml or a value passed in) is invalid."""


class SnapshotError(MitraBuildError, ValueError):
    """A checkpoint folder (config.json + model.safetensors) is missing, malformed or unsafe."""


class ExportError(MitraBuildError, RuntimeError):
    """`torch.onnx.export` failed or produced a file that does not match the I/O contract."""


class OnnxCheckError(MitraBuildError, ValueError):
    """`onnx.checker` or ONNX shape inference rejected the exported model."""


class VerificationError(MitraBuildError, AssertionError):
    """At least one cell of the verification matrix exceeded its tolerance.

    Attributes:
        failures: one human-readable line per failed cell (cell name, metric, value, tolerance).
    """

    def __init__(self, message: str, failures: list[str]) -> None:
        super().__init__(message)
        self.failures = failures


class SupportCacheError(MitraBuildError, ValueError):
    """A support cache does not fit the query or the model it is used with."""


class HubError(MitraBuildError, OSError):
    """Talking to the Hugging Face hub (or a mirror) failed."""


class HubUnreachableError(HubError, ConnectionError):
    """The hub endpoint could not be reached at all."""


class HubAuthError(HubError, PermissionError):
    """The hub answered 401/403: the repo is gated or private, or HF_TOKEN is wrong."""


class HubNotFoundError(HubError, FileNotFoundError):
    """The repo, the revision or a required file does not exist on the hub."""


class ChecksumMismatchError(MitraBuildError, ValueError):
    """A file's SHA-256 differs from the digest it was supposed to have."""


class PublishError(MitraBuildError, RuntimeError):
    """Publishing to the artifact store failed or was refused."""


class PullError(MitraBuildError, ValueError):
    """A pulled release was refused: bad manifest, unsafe name, wrong digest or older version."""


class VersionConflictError(PublishError):
    """An object under an existing, immutable version already holds different bytes."""


class StoreError(MitraBuildError, OSError):
    """Talking to the S3 artifact store failed (for publishing and pulling alike)."""


class StoreAuthError(StoreError, PermissionError):
    """The S3 store refused the credentials (the message never contains the secret)."""


class StoreUnreachableError(StoreError, ConnectionError):
    """The S3 endpoint could not be reached."""


class StoreDocumentError(MitraBuildError, ValueError):
    """An object in the store is not the document mitra-build wrote there: too large, not JSON,
    nested too deeply, or not a valid pointer, release record or manifest."""


class ToolMissingError(MitraBuildError, FileNotFoundError):
    """A program the pipeline runs (the SeaweedFS `weed` binary) is not installed."""


class OutputError(MitraBuildError, OSError):
    """An output cannot be written where asked (read-only, full disk, a folder in the way, or it
    would overwrite one of the command's own inputs)."""


class UpstreamMissingError(MitraBuildError, ModuleNotFoundError):
    """Upstream AutoGluon Mitra (or einops/einx, which it imports) is not installed."""


class ReferenceCacheError(MitraBuildError, ValueError):
    """A file in the reference cache is unreadable or is not the reference it is named after."""


class SigningKeyError(MitraBuildError, ValueError):
    """A signing or trusted key cannot be used: missing, unreadable, wrong password, not P-256.

    Messages name the file or environment variable, never the key material or its password."""


class SignatureError(MitraBuildError, ValueError):
    """A release or pointer signature was refused (base of the signature checks below)."""


class UnsignedReleaseError(SignatureError):
    """Trusted keys are configured but the release or the pointer carries no signature."""


class UntrustedKeyError(SignatureError, PermissionError):
    """The signature was made by a key that is not among the trusted keys (wrong key)."""


class BadSignatureError(SignatureError):
    """The signature does not verify or is malformed: the signed content was tampered with."""


class NotSignedContentError(SignatureError):
    """A file is not covered by the release signature with that SHA-256 (arbitrary artifact,
    mix-and-match)."""


class ExpiredPointerError(SignatureError):
    """The signed pointer's `expires` has passed (indefinite freeze)."""


class RollbackError(SignatureError):
    """The pointer names an older release than one known to exist (rollback)."""


def error_code(exc: BaseException) -> str:
    """A stable, machine-readable name of an error for `--json` output: the exception class's name in
    snake case without "Error" (ChecksumMismatchError -> "checksum_mismatch"; any other exception:
    "internal")."""
    if not isinstance(exc, MitraBuildError):
        return "internal"
    name = type(exc).__name__.removesuffix("Error") or "mitra_build"
    return "".join(f"_{c.lower()}" if c.isupper() and i else c.lower() for i, c in enumerate(name))
