"""A release a person can read: the model card and report page published, signed and pulled with
every release; the indexes rewritten on publish, revert and refresh; `report` and `diff`; and the
pages opened in headless Chromium from disk and from the store, as a reader would.

One real tiny build (every recipe, verified by the flow) is published twice: as release 1, and,
with its verification numbers changed, as release 2 (what a rebuild on new weights looks like to
the documents). Screenshots of every page land in $MITRA_TEST_OUTPUT (default
artifacts/test-output/report/).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from huggingface_hub import ModelCard
from s3_fixtures import put_raw

from mitra_model.build.consumers import find_chromium, find_node
from mitra_model.cli.main import main
from mitra_model.errors import ChecksumMismatchError, PublishError
from mitra_model.fileutil import PACKAGE_DIR, sha256_file
from mitra_model.release import layout
from mitra_model.release.client import list_releases
from mitra_model.release.keys import Signer, generate_keypair
from mitra_model.release.maintenance import refresh_pointer, revert_release
from mitra_model.release.publish import publish_build
from mitra_model.release.pull import pull_release
from mitra_model.release.recheck import check_release_folder
from mitra_model.release.signature import verify_release_signature
from mitra_model.release.store import StoreConfig
from mitra_model.report import release_documents

pytestmark = pytest.mark.usefixtures("prefect_api")

VARIANT = "mitra-classifier"
PAGE_CHECK = PACKAGE_DIR / "data" / "consumers" / "page-check.mjs"
OUTPUT = Path(os.environ.get("MITRA_TEST_OUTPUT", "artifacts/test-output")).resolve() / "report"


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory, tiny_snapshots) -> tuple[Path, Path]:  # noqa: ANN001
    """Two build folders: a real tiny build of every recipe, and a copy posing as the next build."""
    from configs import write_config

    from mitra_model.pipeline import flow

    root = tmp_path_factory.mktemp("report-builds")
    variants = [{"name": VARIANT, "path": str(tiny_snapshots["classification"].path), "task": "classification"}]
    config = write_config(root / "config.toml", variants=variants)
    result = flow.mitra_build(config_path=str(config), artifacts_root=str(root / "artifacts"), publish=False)[0]
    first = Path(result["build_dir"])
    second = root / "next-build"
    shutil.copytree(first, second)
    manifest = json.loads((second / layout.MANIFEST_NAME).read_text())
    manifest["version"] = "v-next0000000000"
    manifest["build"]["toolchain"]["onnxruntime"] = "9.9.9"
    for entry in manifest["verification"].values():  # a worse build: twice the error everywhere
        entry["max_abs_err"] *= 2
        entry["max_err_over_spread"] = (entry.get("max_err_over_spread") or 0.0) * 2
    (second / layout.MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    return first, second


@pytest.fixture()
def signer(tmp_path: Path) -> tuple[Signer, bytes]:
    generate_keypair(tmp_path / "k.pem", tmp_path / "k.pub")
    return Signer.from_file(tmp_path / "k.pem"), (tmp_path / "k.pub").read_bytes()


def _publish_both(builds: tuple[Path, Path], client: Any, store: StoreConfig, signer: Signer | None) -> list[Any]:
    return [publish_build(b, client=client, store=store, signer=signer, documents=release_documents) for b in builds]


def _front_matter(card: str) -> dict[str, Any]:
    match = re.match(r"---\n(.*?)\n---\n", card, re.S)
    assert match, "the card does not start with YAML front matter"
    return yaml.safe_load(match.group(1))


def test_every_release_carries_its_card_and_report_signed_and_pulled(
    builds: tuple[Path, Path], s3_store: StoreConfig, s3_client: Any, signer: tuple[Signer, bytes], tmp_path: Path,
) -> None:
    key, public = signer
    first, second = _publish_both(builds, s3_client, s3_store, key)
    dest = tmp_path / "mitra"
    pulled = pull_release(VARIANT, dest=dest, client=s3_client, store=s3_store, progress=False, trusted_keys=[public])
    manifest = json.loads(pulled.manifest_path.read_text())
    listed = {d["file"]: d for d in manifest["documents"]}
    assert set(listed) == {layout.MODEL_CARD_NAME, layout.REPORT_NAME} == set(pulled.documents)
    for name, entry in listed.items():
        assert sha256_file(dest / name) == entry["sha256"]
        assert entry["s3_key"] == layout.artifact_key(s3_store.prefix, VARIANT, second.version, name)
    # the signature covers the documents: the folder verifies whole, card and report included
    content = verify_release_signature((dest / layout.SIGNATURE_NAME).read_bytes(), [public])
    assert {name: dict(content.files)[name] for name in listed} == {name: e["sha256"] for name, e in listed.items()}

    card = (dest / layout.MODEL_CARD_NAME).read_text()
    meta = _front_matter(card)
    assert meta["base_model"] == "autogluon/mitra-classifier" and meta["pipeline_tag"] == "tabular-classification"
    assert meta["library_name"] == "onnx" and meta["license"] == "apache-2.0" and "synthetic-weights" in meta["tags"]
    assert ModelCard(card).data.to_dict()["base_model"] == meta["base_model"]  # huggingface_hub reads it too
    assert "SYNTHETIC" in card.split("## Which file to take")[0]
    assert f"mitra-build pull {s3_store.url(layout.variant_folder(s3_store.prefix, VARIANT))}@{second.version}" in card
    assert f"key id `{key.key_id}`" in card and "model_signing verify key" in card

    # the card's Python example runs as written, from the pulled folder
    example = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    run = subprocess.run([sys.executable, "-c", example], cwd=dest, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("(1, 8, ")

    assert check_release_folder(dest, trusted_keys=[public]).signed_by == key.key_id
    (dest / layout.MODEL_CARD_NAME).write_text(card.replace("SYNTHETIC", "trained"))
    with pytest.raises(ChecksumMismatchError, match=layout.MODEL_CARD_NAME):
        check_release_folder(dest)

    report = (dest / layout.REPORT_NAME).read_text()
    assert f"Compared with {VARIANT} {first.version} (release 1)" in report
    assert "onnxruntime" in report and "9.9.9" in report  # the toolchain change since release 1


def test_a_tampered_document_is_refused_at_pull(builds: tuple[Path, Path], s3_store: StoreConfig, s3_client: Any,
                                                tmp_path: Path) -> None:
    _, second = _publish_both(builds, s3_client, s3_store, None)
    key = layout.artifact_key(s3_store.prefix, VARIANT, second.version, layout.REPORT_NAME)
    page = s3_client.get_object(Bucket=s3_store.bucket, Key=key)["Body"].read()
    put_raw(s3_client, s3_store, key, page.replace(b"Take <code>", b"Use  <code>"))  # same size, other words
    with pytest.raises(ChecksumMismatchError, match=layout.REPORT_NAME):
        pull_release(VARIANT, dest=tmp_path / "mitra", client=s3_client, store=s3_store, progress=False)
    assert not (tmp_path / "mitra").exists()


def test_documents_are_byte_identical_on_every_render(builds: tuple[Path, Path]) -> None:
    """A publish re-run after a crash renders them again and must find the same bytes in the store: in
    this process (which keeps its charts) and in a new one (which draws them again)."""
    manifest_path = builds[0] / layout.MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    once = release_documents(manifest, None, "s3://b/p/v")
    assert once == release_documents(copy.deepcopy(manifest), None, "s3://b/p/v")
    render = ("import json, sys; from mitra_model.report import release_documents; "
              "documents = release_documents(json.load(open(sys.argv[1])), None, 's3://b/p/v'); "
              "print(json.dumps({name: body.decode() for name, body in documents.items()}))")
    done = subprocess.run([sys.executable, "-c", render, str(manifest_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert {name: body.encode() for name, body in json.loads(done.stdout).items()} == once


def test_a_document_renderer_cannot_overwrite_an_artifact(builds: tuple[Path, Path], s3_store: StoreConfig,
                                                          s3_client: Any) -> None:
    with pytest.raises(PublishError, match=r"'model.onnx'.*an artifact has that name"):
        publish_build(builds[0], client=s3_client, store=s3_store,
                      documents=lambda manifest, previous, where: {"model.onnx": b"not a model"})


def test_indexes_follow_publish_revert_and_refresh(builds: tuple[Path, Path], s3_store: StoreConfig, s3_client: Any,
                                                  signer: tuple[Signer, bytes]) -> None:
    key, _ = signer
    first, second = _publish_both(builds, s3_client, s3_store, key)

    def page(variant: str | None = VARIANT) -> str:
        obj = s3_client.get_object(Bucket=s3_store.bucket, Key=layout.index_key(s3_store.prefix, variant))
        assert obj["ContentType"].startswith("text/html")
        return obj["Body"].read().decode()

    index = page()
    assert f'href="{second.version}/{layout.REPORT_NAME}"' in index and f'href="{first.version}/{layout.REPORT_NAME}"' in index
    assert index.index(second.version) < index.index(first.version)  # newest first
    assert 'id="synthetic-banner"' in index and "signed" in index
    assert f'href="{VARIANT}/{layout.INDEX_NAME}"' in page(None)

    reverted = revert_release(s3_client, s3_store, VARIANT, first.version, key, documents=release_documents)
    index = page()
    assert f'href="{reverted.version}/{layout.REPORT_NAME}"' in index and "revert" in index
    revert_card = s3_client.get_object(Bucket=s3_store.bucket, Key=layout.artifact_key(
        s3_store.prefix, VARIANT, reverted.version, layout.MODEL_CARD_NAME))["Body"].read().decode()
    assert f"serves the files of {first.version}" in revert_card

    s3_client.delete_object(Bucket=s3_store.bucket, Key=layout.index_key(s3_store.prefix, VARIANT))
    refresh_pointer(s3_client, s3_store, VARIANT, key)
    assert [r.manifest_version for r in list_releases(
        f"s3://{s3_store.bucket}/{s3_store.prefix}/{VARIANT}", client=s3_client)] == [1, 2, 3]
    assert page().count("<tr class=") == 3


def test_diff_and_report_commands(builds: tuple[Path, Path], s3_store: StoreConfig, s3_client: Any, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    first, second = _publish_both(builds, s3_client, s3_store, None)
    base = f"s3://{s3_store.bucket}/{s3_store.prefix}/{VARIANT}"
    endpoint = ["--endpoint-url", s3_store.endpoint_url]
    assert main(["diff", f"{base}@{first.version}", f"{base}@{second.version}", "--json", *endpoint]) == 0
    diff = json.loads(capsys.readouterr().out)
    assert (diff["from"]["manifest_version"], diff["to"]["manifest_version"]) == (1, 2)
    before = json.loads((builds[0] / layout.MANIFEST_NAME).read_text())["build"]["toolchain"]["onnxruntime"]
    assert {"what": "toolchain onnxruntime", "from": before, "to": "9.9.9"} in diff["build"]
    int8 = next(m for m in diff["metrics"] if m["artifact"] == "int8" and m["metric"] == "max abs err")
    assert int8["to"] == pytest.approx(2 * int8["from"]) and int8["delta"] == pytest.approx(int8["from"])
    assert main(["diff", f"{base}@{first.version}", f"{base}@{second.version}", *endpoint]) == 0
    assert f"toolchain onnxruntime: {before} -> 9.9.9" in capsys.readouterr().out

    out = tmp_path / "from-store.html"
    assert main(["report", f"{base}@latest", "--out", str(out), *endpoint]) == 0
    assert capsys.readouterr().out.strip() == str(out.resolve())
    published = s3_client.get_object(Bucket=s3_store.bucket, Key=layout.artifact_key(
        s3_store.prefix, VARIANT, second.version, layout.REPORT_NAME))["Body"].read()
    assert out.read_bytes() == published  # the command draws exactly the page the release carries

    assert main(["report", str(builds[0]), "--out", str(tmp_path / "build.html")]) == 0
    assert "(unpublished build)" in (tmp_path / "build.html").read_text()
    assert main(["report", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.html")]) == 2
    assert "neither s3://... nor a build folder" in capsys.readouterr().err


def _open(url: str, screenshot: Path) -> dict[str, Any]:
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    run = subprocess.run([str(find_node()), str(PAGE_CHECK), "--url", url, "--chromium", str(find_chromium(None)),
                          "--screenshot", str(screenshot)], capture_output=True, text=True, timeout=120)
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert run.returncode == 0 and "error" not in seen, (seen, run.stderr[-2000:])
    return seen


@pytest.mark.needs_chromium
def test_pages_render_in_chromium_from_disk_and_from_the_store(
    builds: tuple[Path, Path], s3_store: StoreConfig, s3_client: Any, tmp_path: Path, node_modules: Path,
) -> None:
    first, second = _publish_both(builds, s3_client, s3_store, None)
    site = tmp_path / "site"  # the bucket's pages as a folder, as a static-site mirror would hold them
    for name in (layout.index_key(s3_store.prefix), layout.index_key(s3_store.prefix, VARIANT),
                 *(layout.artifact_key(s3_store.prefix, VARIANT, r.version, layout.REPORT_NAME) for r in (first, second))):
        (site / name).parent.mkdir(parents=True, exist_ok=True)
        (site / name).write_bytes(s3_client.get_object(Bucket=s3_store.bucket, Key=name)["Body"].read())
    report_key = layout.artifact_key(s3_store.prefix, VARIANT, second.version, layout.REPORT_NAME)
    over_http = s3_client.generate_presigned_url("get_object", Params={"Bucket": s3_store.bucket, "Key": report_key})
    pages = {
        "report-file": ((site / report_key).as_uri(), ["heatmap", "size-speed", "tasks", "changes"]),
        "report-http": (over_http, ["heatmap", "size-speed", "tasks", "changes"]),
        "first-report-file": ((site / layout.artifact_key(s3_store.prefix, VARIANT, first.version, layout.REPORT_NAME)).as_uri(),
                              ["heatmap", "size-speed", "tasks"]),
        "variant-index-file": ((site / layout.index_key(s3_store.prefix, VARIANT)).as_uri(), []),
        "bucket-index-file": ((site / layout.index_key(s3_store.prefix)).as_uri(), []),
    }
    for name, (url, charts) in pages.items():
        seen = _open(url, OUTPUT / f"{name}.png")
        assert seen["status"] == 200 and seen["contentType"].startswith("text/html"), (name, seen)
        assert seen["consoleErrors"] == [] and seen["pageErrors"] == [], (name, seen)
        assert seen["requests"] == [], f"{name} reached beyond the page: {seen['requests']}"
        assert seen["syntheticBanner"] == (name != "bucket-index-file"), name  # the variants' pages say it
        assert sorted(seen["charts"]) == sorted(charts) and all(n == 1 for n in seen["charts"].values()), (name, seen)
        assert seen["missingCharts"] == [], (name, seen)
        assert (OUTPUT / f"{name}.png").stat().st_size > 10_000
    index = _open((site / layout.index_key(s3_store.prefix, VARIANT)).as_uri(), OUTPUT / "variant-index-file.png")
    for link in index["links"][1:]:  # every release's link resolves to its report in the mirrored site
        assert (site / layout.variant_folder(s3_store.prefix, VARIANT) / link).is_file(), link


def test_diff_names_added_removed_and_rebuilt_artifacts_and_refuses_two_variants(
    builds: tuple[Path, Path], s3_store: StoreConfig, s3_client: Any, capsys: pytest.CaptureFixture[str],
) -> None:
    from mitra_model.release.diff import manifest_diff

    old = json.loads((builds[0] / layout.MANIFEST_NAME).read_text())
    new = copy.deepcopy(old)
    new["artifacts"] = [a for a in new["artifacts"] if a["name"] != "int4"]
    new["artifacts"].append({**new["artifacts"][0], "name": "int2", "sha256": "0" * 64})
    new["artifacts"][0]["sha256"] = "1" * 64
    changes = {a["name"]: a["change"] for a in manifest_diff(old, new)["artifacts"]}
    assert (changes["int4"], changes["int2"], changes["fp32"], changes["int8"]) == ("removed", "added", "rebuilt", "same")

    publish_build(builds[0], client=s3_client, store=s3_store)
    other = make_variant_copy(builds[0], "mitra-other")
    publish_build(other, client=s3_client, store=s3_store)
    base = f"s3://{s3_store.bucket}/{s3_store.prefix}"
    assert main(["diff", f"{base}/{VARIANT}", f"{base}/mitra-other", "--endpoint-url", s3_store.endpoint_url]) == 2
    assert "releases of different variants" in capsys.readouterr().err


def make_variant_copy(build: Path, variant: str) -> Path:
    copied = build.parent / f"{build.name}-{variant}"
    shutil.copytree(build, copied)
    manifest = json.loads((copied / layout.MANIFEST_NAME).read_text())
    (copied / layout.MANIFEST_NAME).write_text(json.dumps({**manifest, "variant": variant}))
    return copied


def test_report_without_the_report_extra_names_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "mitra_model.report", None)  # as if matplotlib were not installed
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r.html")]) == 2
    assert "pip install 'mitra-build[report]'" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()


def test_a_publish_whose_index_pages_cannot_be_written_still_publishes_and_says_so(
    s3_store: StoreConfig, s3_client: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    from botocore.exceptions import ClientError
    from s3_fixtures import CrashingClient, make_build

    def refuse_pages(n: int, name: str, kwargs: dict[str, Any]) -> None:
        if name == "put_object" and kwargs["Key"].endswith(layout.INDEX_NAME):
            raise ClientError({"Error": {"Code": "AccessDenied", "Message": "no"}}, "PutObject")

    with caplog.at_level("WARNING", logger="mitra_model"):
        result = publish_build(make_build(tmp_path), client=CrashingClient(s3_client, hook=refuse_pages), store=s3_store)
    assert result.manifest_version == 1
    assert pull_release(result.variant, dest=tmp_path / "dest", client=s3_client, store=s3_store,
                        progress=False).version == result.version
    assert "is published, but its index pages were not rewritten" in caplog.text
