"""Signed releases against a real SeaweedFS: publish with a key, verify the way a puller does.

One test per attack of TUF's list that signing answers (arbitrary artifact, rollback, freeze,
mix-and-match, wrong key), first with the library's functions, then through the real verifying
pull (`pull_release(trusted_keys=...)`, the CLI's `--trusted-key`), plus: the standard
`model_signing verify key` CLI accepts a release folder assembled from the bucket, and a pulled
DEST, unchanged; the Node/WebCrypto verifier agrees with Python; keys never show up in output.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from s3_fixtures import CrashingClient, SimulatedCrash, list_keys, make_build, put_raw, read_json_object

from mitra_model.cli.main import main
from mitra_model.errors import (
    BadSignatureError,
    ChecksumMismatchError,
    ExpiredPointerError,
    NotSignedContentError,
    PublishError,
    PullError,
    RollbackError,
    SigningKeyError,
    StoreDocumentError,
    UnsignedReleaseError,
    UntrustedKeyError,
)
from mitra_model.release import layout, pull
from mitra_model.release.keys import Signer, generate_keypair
from mitra_model.release.layout import SIGNATURE_NAME
from mitra_model.release.log import newest_release_record
from mitra_model.release.maintenance import refresh_pointer, revert_release
from mitra_model.release.pointer import SignedPointer, check_not_rolled_back, verify_pointer
from mitra_model.release.publish import publish_build
from mitra_model.release.rules import sha256_bytes
from mitra_model.release.signature import SignedContent, sign_release_folder, verify_release_signature
from mitra_model.release.store import StoreConfig

pytestmark = pytest.mark.usefixtures("time_limit")

VARIANT = "mitra-classifier"
PASSWORD = b"pw-Hx93kq-never-printed"
REPO = Path(__file__).resolve().parents[1]
MODEL_SIGNING_CLI = Path(sys.executable).with_name("model_signing")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two key pairs: the publisher's ("good", password-protected) and a stranger's ("other")."""
    root = tmp_path_factory.mktemp("keys")
    generate_keypair(root / "good.pem", root / "good.pub", password=PASSWORD)
    generate_keypair(root / "other.pem", root / "other.pub")
    return {
        "dir": root,
        "signer": Signer.from_file(root / "good.pem", password=PASSWORD),
        "other_signer": Signer.from_file(root / "other.pem"),
        "pub": (root / "good.pub").read_bytes(),
        "other_pub": (root / "other.pub").read_bytes(),
    }


def _now() -> datetime:
    return datetime.now(UTC)


def _get(client: Any, store: StoreConfig, key: str) -> bytes:
    return client.get_object(Bucket=store.bucket, Key=key)["Body"].read()


def _publish(tmp_path: Path, client: Any, store: StoreConfig, signer: Signer | None, seed: int, **kw: Any) -> Any:
    return publish_build(make_build(tmp_path, seed=seed), client=client, store=store, signer=signer, **kw)


# -- keys ---------------------------------------------------------------------------------------


def test_generate_keypair_is_owner_only_and_never_overwrites(tmp_path: Path) -> None:
    key_id = generate_keypair(tmp_path / "k.pem", tmp_path / "k.pub")
    assert stat.S_IMODE((tmp_path / "k.pem").stat().st_mode) == 0o600
    assert (tmp_path / "k.pub").read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert Signer.from_file(tmp_path / "k.pem").key_id == key_id
    before = (tmp_path / "k.pem").read_bytes()
    with pytest.raises(SigningKeyError, match="refusing to overwrite"):
        generate_keypair(tmp_path / "k.pem", tmp_path / "k2.pub")
    assert (tmp_path / "k.pem").read_bytes() == before


def test_signer_from_env_and_errors_never_show_the_key(tmp_path: Path, keys: dict[str, Any]) -> None:
    pem = (keys["dir"] / "good.pem").read_text()
    env = {"MITRA_SIGNING_KEY": pem, "MITRA_SIGNING_KEY_PASSWORD": PASSWORD.decode()}
    signer = Signer.from_env(environ=env)
    assert signer.key_id == keys["signer"].key_id
    assert pem not in repr(signer) and "PRIVATE" not in repr(signer)
    with pytest.raises(TypeError):
        import pickle
        pickle.dumps(signer)
    body = pem.splitlines()[1]  # a line of the key's base64
    failures = []
    for attempt in (
        lambda: Signer.from_env(environ={"MITRA_SIGNING_KEY": pem, "MITRA_SIGNING_KEY_PASSWORD": "wrong-pw-77"}),
        lambda: Signer.from_env(environ={"MITRA_SIGNING_KEY": pem}),
        lambda: Signer.from_env(environ={"MITRA_SIGNING_KEY": pem[:-60]}),
        lambda: Signer.from_env(environ={}),
        lambda: Signer.from_file(tmp_path / "missing.pem"),
    ):
        with pytest.raises(SigningKeyError) as info:
            attempt()
        failures.append(str(info.value))
    text = "\n".join(failures)
    assert body not in text and "wrong-pw-77" not in text and PASSWORD.decode() not in text
    assert "MITRA_SIGNING_KEY" in text  # names the variable to fix


# -- the standard tool --------------------------------------------------------------------------


def test_standard_cli_verifies_release_folder_from_the_bucket(
    s3_store: StoreConfig, s3_client: Any, tmp_path: Path, keys: dict[str, Any]
) -> None:
    result = _publish(tmp_path, s3_client, s3_store, keys["signer"], seed=1)
    assert result.signature_key == layout.artifact_key(s3_store.prefix, VARIANT, result.version, SIGNATURE_NAME)
    record, _ = read_json_object(s3_client, s3_store, layout.release_record_key(s3_store.prefix, VARIANT, 1))
    assert (record["signature_key"], record["signature_sha256"]) == (result.signature_key, result.signature_sha256)

    # The complete release folder: every object under the version folder, as stored.
    folder = tmp_path / "pulled" / result.version
    folder.mkdir(parents=True)
    prefix = layout.version_folder(s3_store.prefix, VARIANT, result.version) + "/"
    names = []
    for key in list_keys(s3_client, s3_store):
        if key.startswith(prefix):
            (folder / key[len(prefix):]).write_bytes(_get(s3_client, s3_store, key))
            names.append(key[len(prefix):])
    assert sorted(names) == sorted(["manifest.json", "model.onnx", "model-int8.onnx", SIGNATURE_NAME])
    (folder / layout.PULL_STATE_NAME).write_text("{}\n")  # pull bookkeeping is not signed
    pub = keys["dir"] / "good.pub"
    command = [str(MODEL_SIGNING_CLI), "verify", "key", "--public_key", str(pub),
               "--signature", str(folder / SIGNATURE_NAME), str(folder)]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Verification succeeded" in done.stdout

    # The same files signed from the folder give the same signed content.
    again = verify_release_signature(sign_release_folder(folder, keys["signer"]), [keys["pub"]])
    assert dict(again.files) == dict(verify_release_signature((folder / SIGNATURE_NAME).read_bytes(), [keys["pub"]]).files)

    (folder / "model.onnx").write_bytes(b"swapped")
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "model.onnx" in done.stderr
    wrong = [*command[:4], str(keys["dir"] / "other.pub"), *command[5:]]
    (folder / "model.onnx").write_bytes(_get(s3_client, s3_store, prefix + "model.onnx"))
    assert subprocess.run(wrong, check=False, capture_output=True, text=True, timeout=120).returncode != 0


# -- the attacks --------------------------------------------------------------------------------


def test_signed_release_pulls_fully_and_partially(
    s3_store: StoreConfig, s3_client: Any, tmp_path: Path, keys: dict[str, Any]
) -> None:
    _publish(tmp_path, s3_client, s3_store, keys["signer"], seed=2)
    _pull(s3_client, s3_store, tmp_path / "full", [keys["other_pub"], keys["pub"]])  # any trusted key
    assert sorted(_dest_files(tmp_path / "full")) == ["manifest.json", "model-int8.onnx", "model.onnx", SIGNATURE_NAME]
    _pull(s3_client, s3_store, tmp_path / "partial", [keys["pub"]], artifacts=["int8"])
    assert sorted(_dest_files(tmp_path / "partial")) == ["manifest.json", "model-int8.onnx", SIGNATURE_NAME]


def test_newest_release_record_gallops_over_many_releases(
    s3_store: StoreConfig, s3_client: Any, tmp_path: Path
) -> None:
    for seed in range(6):
        _publish(tmp_path, s3_client, s3_store, None, seed=100 + seed)
    for after in (0, 1, 3, 6):
        assert newest_release_record(s3_client, s3_store, VARIANT, after=after)["manifest_version"] == 6
    with pytest.raises(StoreDocumentError, match="never recorded"):
        newest_release_record(s3_client, s3_store, VARIANT, after=9)


def test_wrong_key_unsigned_and_tampered_are_distinct_errors(
    s3_store: StoreConfig, s3_client: Any, tmp_path: Path, keys: dict[str, Any]
) -> None:
    """The verifiers themselves; the same attacks through a real pull are the test_pull_refuses_* tests."""
    result = _publish(tmp_path, s3_client, s3_store, keys["other_signer"], seed=9)
    bundle = _get(s3_client, s3_store, result.signature_key)
    with pytest.raises(UntrustedKeyError):
        verify_release_signature(bundle, [keys["pub"]])
    assert isinstance(verify_release_signature(bundle, [keys["other_pub"]]), SignedContent)

    # Tampered: a digest in the signed statement changed, the signature kept.
    doc = json.loads(bundle)
    statement = json.loads(base64.b64decode(doc["dsseEnvelope"]["payload"]))
    statement["predicate"]["resources"][0]["digest"] = "0" * 64
    doc["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    with pytest.raises(BadSignatureError, match="tampered"):
        verify_release_signature(json.dumps(doc).encode(), [keys["other_pub"]])
    with pytest.raises(BadSignatureError, match="not valid JSON"):
        verify_release_signature(b"{not json", [keys["other_pub"]])
    with pytest.raises(UnsignedReleaseError):
        verify_release_signature(None, [keys["pub"]])

    # Tampered pointer: the readable copy edited, or the signed payload edited.
    raw = _get(s3_client, s3_store, layout.pointer_key(s3_store.prefix, VARIANT))
    pointer = json.loads(raw)
    edited = dict(pointer, manifest_version=7)
    with pytest.raises(BadSignatureError, match="readable fields differ"):
        verify_pointer(json.dumps(edited).encode(), [keys["other_pub"]], _now())
    payload = json.loads(base64.b64decode(pointer["dsse"]["payload"]))
    payload["expires"] = "2999-01-01T00:00:00Z"
    forged = dict(pointer, expires=payload["expires"])
    forged["dsse"] = dict(pointer["dsse"], payload=base64.b64encode(json.dumps(payload).encode()).decode())
    with pytest.raises(BadSignatureError, match="tampered"):
        verify_pointer(json.dumps(forged).encode(), [keys["other_pub"]], _now())


def test_revert_publishes_a_new_release_of_the_old_artifacts(
    s3_store: StoreConfig, s3_client: Any, tmp_path: Path, keys: dict[str, Any]
) -> None:
    first = _publish(tmp_path, s3_client, s3_store, keys["signer"], seed=11)
    _publish(tmp_path, s3_client, s3_store, keys["signer"], seed=12)
    reverted = revert_release(s3_client, s3_store, VARIANT, first.version, keys["signer"])
    assert reverted.manifest_version == 3 and reverted.version != first.version
    old = json.loads(_get(s3_client, s3_store, first.manifest_key))
    new = json.loads(_get(s3_client, s3_store, reverted.manifest_key))
    assert [(a["file"], a["sha256"], a["s3_key"]) for a in new["artifacts"]] == [
        (a["file"], a["sha256"], a["s3_key"]) for a in old["artifacts"]
    ]
    assert new["previous_manifest_sha256"] is not None
    pointer = verify_pointer(_get(s3_client, s3_store, layout.pointer_key(s3_store.prefix, VARIANT)), [keys["pub"]], _now())
    assert isinstance(pointer, SignedPointer) and pointer.manifest_version == 3
    _pull(s3_client, s3_store, tmp_path / "dest", [keys["pub"]])
    assert (tmp_path / "dest" / "model.onnx").read_bytes() == _get(s3_client, s3_store, old["artifacts"][0]["s3_key"])

    again = revert_release(s3_client, s3_store, VARIANT, first.version, keys["signer"])
    assert again.already_published and again.manifest_version == 3
    with pytest.raises(PublishError, match="never released"):
        revert_release(s3_client, s3_store, VARIANT, "r-0000000000000000", keys["signer"])


def test_publish_resumes_after_a_crash_between_signature_and_release_record(
    s3_store: StoreConfig, s3_client: Any, tmp_path: Path, keys: dict[str, Any]
) -> None:
    build = make_build(tmp_path, seed=13)

    def crash_at_claim(n: int, name: str, kwargs: dict[str, Any]) -> None:
        if name == "put_object" and f"/{layout.RELEASES_DIR}/" in kwargs.get("Key", ""):
            raise SimulatedCrash("crash before claiming the release")

    with pytest.raises(SimulatedCrash):
        publish_build(build, client=CrashingClient(s3_client, hook=crash_at_claim), store=s3_store, signer=keys["signer"])
    sig_key = layout.artifact_key(s3_store.prefix, VARIANT, json.loads((build / "manifest.json").read_text())["version"], SIGNATURE_NAME)
    first_sig = _get(s3_client, s3_store, sig_key)
    result = publish_build(build, client=s3_client, store=s3_store, signer=keys["signer"])
    assert result.signature_sha256 == sha256_bytes(first_sig)  # the stored one was reused
    assert len(_pull(s3_client, s3_store, tmp_path / "dest", [keys["pub"]]).files) == 2  # model.onnx and int8


def test_keys_never_appear_in_logs_or_errors(
    s3_store: StoreConfig, s3_client: Any, tmp_path: Path, keys: dict[str, Any],
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    result = _publish(tmp_path, s3_client, s3_store, keys["signer"], seed=14)
    refresh_pointer(s3_client, s3_store, VARIANT, keys["signer"])
    messages = [str(result), repr(keys["signer"])]
    for bad in (lambda: Signer.from_file(keys["dir"] / "good.pem", password=b"nope"),
                lambda: verify_release_signature(b"{}", [(keys["dir"] / "good.pem").read_bytes()])):
        with pytest.raises(SigningKeyError) as info:
            bad()
        messages.append(str(info.value))
    out, err = capfd.readouterr()
    text = "\n".join([*messages, caplog.text, out, err])
    private = (keys["dir"] / "good.pem").read_text().splitlines()[1:-1]
    assert private and not any(line in text for line in private)
    assert PASSWORD.decode() not in text


# -- the JS verifier ----------------------------------------------------------------------------


_NODE_SCRIPT = """
import { readFileSync } from 'node:fs';
import { verifyReleaseSignature, verifyPointer, checkFile } from '%s';
const [bundle, pointer, good, other, tampered] = process.argv.slice(2).map((p) => readFileSync(p));
const out = {};
const signed = await verifyReleaseSignature(bundle, [other, good]);
out.files = signed.files;
out.keyId = signed.keyId;
out.pointer = (await verifyPointer(pointer, [good])).manifest_version;
for (const [name, run] of Object.entries({
  wrongKey: () => verifyReleaseSignature(bundle, [other]),
  tampered: () => verifyReleaseSignature(tampered, [good]),
  expired: () => verifyPointer(pointer, [good], new Date(Date.now() + 90 * 86400e3)),
  notSigned: async () => checkFile(signed, 'model.onnx', '0'.repeat(64)),
})) {
  try { await run(); out[name] = 'accepted'; } catch (e) { out[name] = e.code; }
}
console.log(JSON.stringify(out));
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_node_webcrypto_verifier_agrees(s3_store: StoreConfig, s3_client: Any, tmp_path: Path, keys: dict[str, Any]) -> None:
    result = _publish(tmp_path, s3_client, s3_store, keys["signer"], seed=15)
    bundle = _get(s3_client, s3_store, result.signature_key)
    doc = json.loads(bundle)
    statement = json.loads(base64.b64decode(doc["dsseEnvelope"]["payload"]))
    statement["predicate"]["resources"][0]["digest"] = "0" * 64
    doc["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    paths = {
        "bundle": bundle,
        "pointer": _get(s3_client, s3_store, layout.pointer_key(s3_store.prefix, VARIANT)),
        "good": keys["pub"],
        "other": keys["other_pub"],
        "tampered": json.dumps(doc).encode(),
    }
    for name, data in paths.items():
        (tmp_path / name).write_bytes(data)
    script = tmp_path / "check.mjs"
    script.write_text(_NODE_SCRIPT % (REPO / "consumers" / "lib" / "signature.mjs").as_uri())
    done = subprocess.run(["node", str(script), *(str(tmp_path / n) for n in paths)],
                          check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    python = verify_release_signature(bundle, [keys["pub"]])
    assert out["files"] == dict(python.files)
    assert out["keyId"] == python.key_id == keys["signer"].key_id
    assert out["pointer"] == result.manifest_version
    assert (out["wrongKey"], out["tampered"], out["expired"], out["notSigned"]) == (
        "untrusted-key", "bad-signature", "expired", "not-signed")


# -- the verifying pull (pull_release with trusted keys) -----------------------------------------


def _pull(client: Any, store: StoreConfig, dest: Path, trusted: list[bytes], **kw: Any) -> pull.PullResult:
    return pull.pull_release(VARIANT, dest=dest, client=client, store=store, progress=False,
                             trusted_keys=trusted, **kw)


def _dest_files(dest: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(dest.iterdir())} if dest.exists() else {}


def _same_size_other_bytes(data: bytes) -> bytes:
    return bytes(b ^ 0xFF for b in data)  # same size: the size check passes, only the digest can tell


def test_verified_pull_writes_release_sig_and_the_standard_cli_verifies_dest(
    s3_store: StoreConfig, s3_client: Any, tmp_path: Path, keys: dict[str, Any]
) -> None:
    result = _publish(tmp_path, s3_client, s3_store, keys["signer"], seed=20)
    dest = tmp_path / "dest"
    pulled = _pull(s3_client, s3_store, dest, [keys["other_pub"], keys["pub"]])  # any trusted key will do
    assert pulled.signed_by == keys["signer"].key_id and pulled.version == result.version
    assert sorted(_dest_files(dest)) == ["manifest.json", "model-int8.onnx", "model.onnx", SIGNATURE_NAME]
    assert (dest / SIGNATURE_NAME).read_bytes() == _get(s3_client, s3_store, result.signature_key)
    # The documented commands, exactly. DEST is a symlink, which the tool refuses as the model path
    # unless told (`--allow_symlinks`) or given the folder it points to (`"$(realpath DEST)"`).
    assert dest.is_symlink()
    pub = keys["dir"] / "good.pub"
    for form in ('--allow_symlinks "$DEST"', '"$(realpath "$DEST")"'):
        line = f'{MODEL_SIGNING_CLI} verify key --public_key "$PUB" --signature "$DEST/release.sig" {form}'
        done = subprocess.run(["bash", "-c", line], env={**os.environ, "DEST": str(dest), "PUB": str(pub)},
                              check=False, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "Verification succeeded" in done.stdout, (form, done.stdout + done.stderr)
    plain = [str(MODEL_SIGNING_CLI), "verify", "key", "--public_key", str(pub),
             "--signature", str(dest / SIGNATURE_NAME), str(dest)]
    done = subprocess.run(plain, check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "symlink" in done.stdout + done.stderr  # why the README names the forms above

    again = _pull(s3_client, s3_store, dest, [keys["pub"]])  # verified again, nothing downloaded
    assert again.downloaded_bytes == 0 and again.signed_by == keys["signer"].key_id


def test_dest_pulled_without_keys_gets_release_sig_when_pulled_with_keys(
    s3_store: StoreConfig, s3_client: Any, tmp_path: Path, keys: dict[str, Any]
) -> None:
    _publish(tmp_path, s3_client, s3_store, keys["signer"], seed=21)
    dest = tmp_path / "dest"
    unverified = _pull(s3_client, s3_store, dest, [])  # no keys: as before, signed pointer accepted
    assert unverified.signed_by is None and SIGNATURE_NAME not in _dest_files(dest)
    verified = _pull(s3_client, s3_store, dest, [keys["pub"]])
    assert verified.signed_by == keys["signer"].key_id and verified.downloaded_bytes == 0  # artifacts hard-linked
    assert SIGNATURE_NAME in _dest_files(dest)


def test_pull_refuses_an_arbitrary_artifact_and_leaves_dest(
    s3_store: StoreConfig, s3_client: Any, tmp_path: Path, keys: dict[str, Any]
) -> None:
    _publish(tmp_path, s3_client, s3_store, keys["signer"], seed=22)
    dest = tmp_path / "dest"
    _pull(s3_client, s3_store, dest, [keys["pub"]])
    before = _dest_files(dest)
    second = _publish(tmp_path, s3_client, s3_store, keys["signer"], seed=23)
    key = layout.artifact_key(s3_store.prefix, VARIANT, second.version, "model.onnx")
    put_raw(s3_client, s3_store, key, _same_size_other_bytes(_get(s3_client, s3_store, key)))
    with pytest.raises(NotSignedContentError, match="model.onnx has sha256 .* release signature signs"):
        _pull(s3_client, s3_store, dest, [keys["pub"]])
    assert _dest_files(dest) == before
    assert sorted(p.name for p in (tmp_path / ".dest.mitra").iterdir()) == sorted(
        [os.readlink(dest).split("/")[-1], layout.STATE_FILE, layout.LOCK_FILE])  # no staging left
    # A manifest edited to pin the new bytes does not help: manifest.json is signed too, and so is
    # the list of files (one the signature does not name is refused).
    manifest = json.loads(_get(s3_client, s3_store, second.manifest_key))
    manifest["artifacts"][0]["sha256"] = sha256_bytes(b"malicious model")
    forged = json.dumps(manifest).encode()
    content = verify_release_signature(_get(s3_client, s3_store, second.signature_key), [keys["pub"]])
    with pytest.raises(NotSignedContentError, match="manifest.json"):
        content.check_file("manifest.json", sha256_bytes(forged))
    with pytest.raises(NotSignedContentError, match="not covered"):
        content.check_file("extra.onnx", sha256_bytes(b"x"))


def test_pull_refuses_a_replayed_old_pointer(
    s3_store: StoreConfig, s3_client: Any, tmp_path: Path, keys: dict[str, Any]
) -> None:
    _publish(tmp_path, s3_client, s3_store, keys["signer"], seed=24)
    pointer_key = layout.pointer_key(s3_store.prefix, VARIANT)
    old_pointer = _get(s3_client, s3_store, pointer_key)
    _publish(tmp_path, s3_client, s3_store, keys["signer"], seed=25)
    dest = tmp_path / "dest"
    _pull(s3_client, s3_store, dest, [keys["pub"]])
    put_raw(s3_client, s3_store, pointer_key, old_pointer)  # validly signed, unexpired, older
    pointer = verify_pointer(old_pointer, [keys["pub"]], _now())  # the signature alone cannot tell
    assert pointer.manifest_version == 1
    with pytest.raises(RollbackError, match="release record 2 exists"):
        _pull(s3_client, s3_store, tmp_path / "fresh", [keys["pub"]])
    assert not (tmp_path / "fresh").exists() and not (tmp_path / ".fresh.mitra").exists()
    # The attacker also hides the newer record: DEST's own release still tells.
    s3_client.delete_object(Bucket=s3_store.bucket, Key=layout.release_record_key(s3_store.prefix, VARIANT, 2))
    with pytest.raises(RollbackError, match="already pulled"):
        _pull(s3_client, s3_store, dest, [keys["pub"]])
    assert json.loads((dest / "manifest.json").read_bytes())["manifest_version"] == 2
    with pytest.raises(RollbackError, match="already pulled"):  # what DEST's state feeds the check
        check_not_rolled_back(pointer, None, known_manifest_version=2)


def test_pull_refuses_an_expired_pointer_until_refreshed(
    s3_store: StoreConfig, s3_client: Any, tmp_path: Path, keys: dict[str, Any]
) -> None:
    _publish(tmp_path, s3_client, s3_store, keys["signer"], seed=26, pointer_ttl=timedelta(seconds=1))
    time.sleep(1.5)
    with pytest.raises(ExpiredPointerError, match="expired at"):
        _pull(s3_client, s3_store, tmp_path / "dest", [keys["pub"]])
    assert not (tmp_path / "dest").exists()
    assert _pull(s3_client, s3_store, tmp_path / "unchecked", []).signed_by is None  # no keys: no expiry
    refreshed = refresh_pointer(s3_client, s3_store, VARIANT, keys["signer"])
    assert refreshed.manifest_version == 1
    assert _pull(s3_client, s3_store, tmp_path / "dest", [keys["pub"]]).signed_by == keys["signer"].key_id
    # Refreshing re-signs the pointer only: no new release record, no new manifest.
    assert layout.release_record_key(s3_store.prefix, VARIANT, 2) not in list_keys(s3_client, s3_store)


def test_pull_refuses_mix_and_match_before_downloading(
    s3_store: StoreConfig, s3_client: Any, tmp_path: Path, keys: dict[str, Any]
) -> None:
    """Release 1's model.onnx under release 2's key, release 2's manifest and record re-pinned to it:
    the manifest is no longer the one release 2's signature signs, so nothing is downloaded."""
    first = _publish(tmp_path, s3_client, s3_store, keys["signer"], seed=27)
    second = _publish(tmp_path, s3_client, s3_store, keys["signer"], seed=28)
    old_key = layout.artifact_key(s3_store.prefix, VARIANT, first.version, "model.onnx")
    new_key = layout.artifact_key(s3_store.prefix, VARIANT, second.version, "model.onnx")
    old = _get(s3_client, s3_store, old_key)
    put_raw(s3_client, s3_store, new_key, old)
    manifest = json.loads(_get(s3_client, s3_store, second.manifest_key))
    manifest["artifacts"][0].update(size=len(old), sha256=sha256_bytes(old))
    forged = json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n"
    put_raw(s3_client, s3_store, second.manifest_key, forged)
    record_key = layout.release_record_key(s3_store.prefix, VARIANT, 2)
    record = json.loads(_get(s3_client, s3_store, record_key))
    put_raw(s3_client, s3_store, record_key, json.dumps(dict(record, manifest_sha256=sha256_bytes(forged))).encode())

    counting = CrashingClient(s3_client)
    with pytest.raises(NotSignedContentError, match="manifest.json has sha256"):
        _pull(counting, s3_store, tmp_path / "dest", [keys["pub"]], version=second.version)
    assert not any(key and key.endswith(".onnx") for _, key in counting.calls)  # refused before any download
    assert not (tmp_path / "dest").exists()
    # Following latest, the signed pointer still pins the real manifest: refused as well.
    with pytest.raises(ChecksumMismatchError):
        _pull(s3_client, s3_store, tmp_path / "dest", [keys["pub"]])
    # Release 1's signature served for release 2 does not cover release 2's manifest either.
    put_raw(s3_client, s3_store, second.signature_key, _get(s3_client, s3_store, first.signature_key))
    content = verify_release_signature(_get(s3_client, s3_store, second.signature_key), [keys["pub"]])
    with pytest.raises(NotSignedContentError):
        content.check_file("manifest.json", second.manifest_sha256)


def test_pull_refuses_a_foreign_key_and_unsigned_releases(
    s3_store: StoreConfig, s3_client: Any, tmp_path: Path, keys: dict[str, Any]
) -> None:
    _publish(tmp_path, s3_client, s3_store, keys["other_signer"], seed=29)
    with pytest.raises(UntrustedKeyError, match="not trusted"):
        _pull(s3_client, s3_store, tmp_path / "dest", [keys["pub"]])

    unsigned = _publish(tmp_path, s3_client, s3_store, None, seed=30)
    with pytest.raises(UnsignedReleaseError, match="pointer .* is not signed"):
        _pull(s3_client, s3_store, tmp_path / "dest", [keys["pub"]])
    # A signed pointer naming an unsigned release (refresh_pointer re-signs whatever is latest).
    refresh_pointer(s3_client, s3_store, VARIANT, keys["signer"])
    with pytest.raises(UnsignedReleaseError, match="names no release.sig"):
        _pull(s3_client, s3_store, tmp_path / "dest", [keys["pub"]])
    with pytest.raises(UnsignedReleaseError, match="names no release.sig"):  # explicit version: its record
        _pull(s3_client, s3_store, tmp_path / "dest", [keys["pub"]], version=unsigned.version)
    assert not (tmp_path / "dest").exists()
    assert _pull(s3_client, s3_store, tmp_path / "dest", []).version == unsigned.version  # no keys: as before


def test_partial_pull_verifies_what_it_takes(
    s3_store: StoreConfig, s3_client: Any, tmp_path: Path, keys: dict[str, Any]
) -> None:
    result = _publish(tmp_path, s3_client, s3_store, keys["signer"], seed=31)
    fp32_key = layout.artifact_key(s3_store.prefix, VARIANT, result.version, "model.onnx")
    int8_key = layout.artifact_key(s3_store.prefix, VARIANT, result.version, "model-int8.onnx")
    put_raw(s3_client, s3_store, fp32_key, _same_size_other_bytes(_get(s3_client, s3_store, fp32_key)))
    dest = tmp_path / "dest"
    partial = _pull(s3_client, s3_store, dest, [keys["pub"]], artifacts=["int8"])  # the bad fp32 is not taken
    assert set(partial.files) == {"int8"} and partial.signed_by == keys["signer"].key_id
    assert sorted(_dest_files(dest)) == ["manifest.json", "model-int8.onnx", SIGNATURE_NAME]
    put_raw(s3_client, s3_store, int8_key, _same_size_other_bytes(_get(s3_client, s3_store, int8_key)))
    with pytest.raises(NotSignedContentError, match="model-int8.onnx"):
        _pull(s3_client, s3_store, tmp_path / "other", [keys["pub"]], artifacts=["int8"])
    with pytest.raises(NotSignedContentError, match="model.onnx"):
        _pull(s3_client, s3_store, tmp_path / "full", [keys["pub"]])


def test_full_pull_refuses_a_signature_that_signs_more_than_the_manifest_names(
    s3_store: StoreConfig, s3_client: Any, tmp_path: Path, keys: dict[str, Any]
) -> None:
    """The manifest and the signature must agree on the release's files: a full pull that would not
    get a signed file is refused (a partial pull checks only what it takes)."""
    from mitra_model.release.pointer import sign_pointer
    from mitra_model.release.signature import sign_release_files

    result = _publish(tmp_path, s3_client, s3_store, keys["signer"], seed=34)
    signed = dict(verify_release_signature(_get(s3_client, s3_store, result.signature_key), [keys["pub"]]).files)
    bundle = sign_release_files({**signed, "extra.onnx": "0" * 64}, keys["signer"], name=result.version)
    put_raw(s3_client, s3_store, result.signature_key, bundle)
    record_key = layout.release_record_key(s3_store.prefix, VARIANT, 1)
    record = dict(json.loads(_get(s3_client, s3_store, record_key)), signature_sha256=sha256_bytes(bundle))
    put_raw(s3_client, s3_store, record_key, json.dumps(record).encode())
    pointer = sign_pointer(record, keys["signer"], expires=_now() + timedelta(days=1))  # the publisher signs it all
    put_raw(s3_client, s3_store, layout.pointer_key(s3_store.prefix, VARIANT), pointer)
    with pytest.raises(NotSignedContentError, match="also signs extra.onnx"):
        _pull(s3_client, s3_store, tmp_path / "dest", [keys["pub"]])
    assert not (tmp_path / "dest").exists()
    assert _pull(s3_client, s3_store, tmp_path / "dest", [keys["pub"]], artifacts=["int8", "fp32"]).signed_by
    with pytest.raises(NotSignedContentError, match="also signs extra.onnx"):  # no-op re-pull: still checked
        _pull(s3_client, s3_store, tmp_path / "dest", [keys["pub"]])


def test_a_signed_revert_pulls_with_and_without_keys(
    s3_store: StoreConfig, s3_client: Any, tmp_path: Path, keys: dict[str, Any]
) -> None:
    first = _publish(tmp_path, s3_client, s3_store, keys["signer"], seed=32)
    _publish(tmp_path, s3_client, s3_store, keys["signer"], seed=33)
    dest = tmp_path / "dest"
    _pull(s3_client, s3_store, dest, [keys["pub"]])
    reverted = revert_release(s3_client, s3_store, VARIANT, first.version, keys["signer"])
    pulled = _pull(s3_client, s3_store, dest, [keys["pub"]])  # forward to manifest_version 3
    assert (pulled.version, pulled.manifest_version) == (reverted.version, 3)
    old_model = _get(s3_client, s3_store, layout.artifact_key(s3_store.prefix, VARIANT, first.version, "model.onnx"))
    assert (dest / "model.onnx").read_bytes() == old_model
    assert _pull(s3_client, s3_store, tmp_path / "plain", []).version == reverted.version
    explicit = _pull(s3_client, s3_store, tmp_path / "explicit", [keys["pub"]], version=reverted.version)
    assert explicit.signed_by == keys["signer"].key_id


# -- the CLI: where trusted keys come from, revert, refresh-pointer -------------------------------


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_trusted_keys_from_flag_env_or_config(
    s3_store: StoreConfig, s3_client: Any, tmp_path: Path, keys: dict[str, Any],
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    from configs import write_config

    _publish(tmp_path, s3_client, s3_store, keys["signer"], seed=40)
    good, other = keys["dir"] / "good.pub", keys["dir"] / "other.pub"
    url = f"s3://{s3_store.bucket}/{s3_store.prefix}/{VARIANT}"
    base = ["pull", url, "--endpoint-url", s3_store.endpoint_url or "", "--quiet"]
    monkeypatch.chdir(tmp_path)  # no ./config here
    monkeypatch.delenv("MITRA_BUILD_CONFIG", raising=False)
    monkeypatch.delenv("MITRA_TRUSTED_KEYS", raising=False)

    code, out, err = _cli(capsys, *base, "--dest", str(tmp_path / "d1"), "--trusted-key", str(other))
    assert code == 2 and out == "" and "Traceback" not in err and "not trusted" in err
    assert err.startswith("mitra-build pull: error: ") and not (tmp_path / "d1").exists()
    code, out, err = _cli(capsys, *base, "--dest", str(tmp_path / "d1"), "--trusted-key", str(other),
                          "--trusted-key", str(good), "--json")
    assert code == 0 and json.loads(out)["signed_by"] == keys["signer"].key_id

    monkeypatch.setenv("MITRA_TRUSTED_KEYS", f"{other}{os.pathsep}")  # env: used when no flag is given
    code, _, err = _cli(capsys, *base, "--dest", str(tmp_path / "d2"))
    assert code == 2 and "not trusted" in err
    code, out, _ = _cli(capsys, *base, "--dest", str(tmp_path / "d2"), "--trusted-key", str(good))  # the flag wins
    assert code == 0 and "verified, key id" in out
    monkeypatch.setenv("MITRA_TRUSTED_KEYS", str(good))
    code, out, _ = _cli(capsys, *base, "--dest", str(tmp_path / "d3"))
    assert code == 0 and "verified, key id" in out
    monkeypatch.delenv("MITRA_TRUSTED_KEYS")

    # The configuration in use (--config, $MITRA_BUILD_CONFIG or ./config/mitra-build.toml) ...
    config = write_config(tmp_path / "trusting.toml")
    assert "[signing]" not in config.read_text()
    config.write_text(config.read_text() + f'\n[signing]\ntrusted_keys = ["{other}"]\n')
    code, _, err = _cli(capsys, *base, "--dest", str(tmp_path / "d4"), "--config", str(config))
    assert code == 2 and "not trusted" in err
    monkeypatch.setenv("MITRA_BUILD_CONFIG", str(config))
    code, _, err = _cli(capsys, *base, "--dest", str(tmp_path / "d4"))
    assert code == 2 and "not trusted" in err
    monkeypatch.delenv("MITRA_BUILD_CONFIG")
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "mitra-build.toml").write_text(config.read_text())
    code, _, err = _cli(capsys, *base, "--dest", str(tmp_path / "d4"))
    assert code == 2 and "not trusted" in err
    # ... but never the packaged default, and no keys at all: unchecked, as before.
    (tmp_path / "config" / "mitra-build.toml").unlink()
    code, out, _ = _cli(capsys, *base, "--dest", str(tmp_path / "d4"))
    assert code == 0 and "key id" not in out

    (tmp_path / "not-a-key.pub").write_text("hello")
    code, out, err = _cli(capsys, *base, "--dest", str(tmp_path / "d5"), "--trusted-key", str(tmp_path / "not-a-key.pub"))
    assert code == 2 and "not a PEM public key" in err and "Traceback" not in err


def test_cli_keygen_revert_and_refresh_pointer(
    s3_store: StoreConfig, s3_client: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from configs import write_config

    code, out, err = _cli(capsys, "keygen", str(tmp_path / "k.pem"), str(tmp_path / "k.pub"))
    private = (tmp_path / "k.pem").read_text()
    key_id = Signer.from_file(tmp_path / "k.pem").key_id
    assert code == 0 and f"k.pub (key id {key_id})" in out
    assert not any(line in out + err for line in private.splitlines()[1:-1])
    assert stat.S_IMODE((tmp_path / "k.pem").stat().st_mode) == 0o600
    code, _, err = _cli(capsys, "keygen", str(tmp_path / "k.pem"), str(tmp_path / "k2.pub"))
    assert code == 2 and "refusing to overwrite" in err

    config = write_config(tmp_path / "c.toml", store={"bucket": s3_store.bucket, "prefix": s3_store.prefix,
                                                      "endpoint_url": s3_store.endpoint_url})
    signer = Signer.from_file(tmp_path / "k.pem")
    first = _publish(tmp_path, s3_client, s3_store, signer, seed=41)
    _publish(tmp_path, s3_client, s3_store, signer, seed=42)
    monkeypatch.delenv("MITRA_SIGNING_KEY", raising=False)
    monkeypatch.delenv("MITRA_SIGNING_KEY_FILE", raising=False)
    code, _, err = _cli(capsys, "refresh-pointer", "--config", str(config), "--variant", VARIANT)
    assert code == 2 and "--signing-key" in err and "MITRA_SIGNING_KEY_FILE" in err

    monkeypatch.setenv("MITRA_SIGNING_KEY_FILE", str(tmp_path / "k.pem"))
    code, out, err = _cli(capsys, "revert", "--config", str(config), "--variant", VARIANT, "--to", first.version)
    assert code == 0 and f"{first.version}.revert-2" in out and "manifest_version 3" in out, err
    pulled = _pull(s3_client, s3_store, tmp_path / "dest", [(tmp_path / "k.pub").read_bytes()])
    assert (pulled.version, pulled.signed_by) == (f"{first.version}.revert-2", key_id)
    code, out, _ = _cli(capsys, "revert", "--config", str(config), "--variant", VARIANT, "--to", first.version)
    assert code == 0 and "nothing new was published" in out

    monkeypatch.delenv("MITRA_SIGNING_KEY_FILE")
    code, out, err = _cli(capsys, "refresh-pointer", "--config", str(config), "--variant", VARIANT,
                          "--signing-key", str(tmp_path / "k.pem"))
    assert code == 0 and "manifest_version 3" in out, err
    expires = datetime.fromisoformat(json.loads(_get(s3_client, s3_store, layout.pointer_key(s3_store.prefix, VARIANT)))["expires"])
    assert timedelta(days=29) < expires - _now() <= timedelta(days=30)  # [signing] pointer_ttl_days = 30
    code, _, err = _cli(capsys, "refresh-pointer", "--config", str(config), "--variant", VARIANT,
                        "--signing-key", str(tmp_path / "missing.pem"))
    assert code == 2 and "Cannot read the signing key file" in err and "Traceback" not in err


def test_check_release_re_checks_a_partial_pull_offline(
    s3_store: StoreConfig, s3_client: Any, tmp_path: Path, keys: dict[str, Any], capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What `model_signing verify` refuses ("Missing files"): an int8-only folder, re-hashed and checked
    against its signature with no network."""
    monkeypatch.delenv("MITRA_TRUSTED_KEYS", raising=False)
    monkeypatch.delenv("MITRA_REQUIRE_SIGNATURE", raising=False)
    _publish(tmp_path, s3_client, s3_store, keys["signer"], seed=31)
    dest = tmp_path / "dest"
    _pull(s3_client, s3_store, dest, [keys["pub"]], artifacts=["int8"])
    pub = str(keys["dir"] / "good.pub")
    assert main(["check-release", str(dest), "--trusted-key", pub, "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["checked"] == ["int8"] and answer["missing"] == ["fp32"]
    assert answer["signature_checked"] is True and answer["signed_by"] == keys["signer"].key_id

    assert main(["check-release", str(dest)]) == 0  # no key: digests only, and a notice says so
    out, err = capsys.readouterr()
    assert "int8 re-hashed" in out and "signature was NOT checked" in err
    assert main(["check-release", str(dest), "--require-signature"]) == 2
    assert "no trusted key was given" in capsys.readouterr().err

    int8 = dest / "model-int8.onnx"
    before = int8.stat()
    int8.resolve().write_bytes(_same_size_other_bytes(int8.read_bytes()))
    os.utime(int8.resolve(), ns=(before.st_atime_ns, before.st_mtime_ns))  # a tamperer keeps the mtime
    assert main(["check-release", str(dest), "--trusted-key", pub]) == 2
    assert "changed after it was pulled" in capsys.readouterr().err


def test_a_replaced_signature_is_blamed_on_what_pins_it(
    s3_store: StoreConfig, s3_client: Any, tmp_path: Path, keys: dict[str, Any]
) -> None:
    first = _publish(tmp_path, s3_client, s3_store, keys["signer"], seed=33)
    second = _publish(tmp_path, s3_client, s3_store, keys["signer"], seed=34)
    put_raw(s3_client, s3_store, second.signature_key, _get(s3_client, s3_store, first.signature_key))
    with pytest.raises(BadSignatureError, match=r"but the signed pointer \(latest.json\) pins .* replaced in the store"):
        _pull(s3_client, s3_store, tmp_path / "latest", [keys["pub"]])
    with pytest.raises(BadSignatureError, match="but its release record pins .* replaced in the store"):
        _pull(s3_client, s3_store, tmp_path / "pinned", [keys["pub"]], version=second.version)


def test_another_variants_signed_pointer_is_named_as_such_not_as_a_rollback(
    s3_store: StoreConfig, s3_client: Any, tmp_path: Path, keys: dict[str, Any]
) -> None:
    _publish(tmp_path, s3_client, s3_store, keys["signer"], seed=40)
    _publish(tmp_path, s3_client, s3_store, keys["signer"], seed=41)
    publish_build(make_build(tmp_path, variant="mitra-regressor", seed=42), client=s3_client, store=s3_store,
                  signer=keys["signer"])
    other = _get(s3_client, s3_store, layout.pointer_key(s3_store.prefix, "mitra-regressor"))
    put_raw(s3_client, s3_store, layout.pointer_key(s3_store.prefix, VARIANT), other)
    with pytest.raises(PullError, match="is the signed pointer of 'mitra-regressor', not of 'mitra-classifier'"):
        _pull(s3_client, s3_store, tmp_path / "dest", [keys["pub"]])
