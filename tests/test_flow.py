"""The `mitra-build` flow against the local hub: rebuild only when weights change, skip when nothing
changed, stop before export on a checksum mismatch."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from configs import write_config

import mitra_model.pipeline.flow as flow_module
from mitra_model.build.config import load_config
from mitra_model.errors import ChecksumMismatchError, HubNotFoundError
from mitra_model.model.snapshot import write_synthetic_snapshot
from mitra_model.release.store import StoreConfig

REPO = "acme/mitra-finetuned"


pytestmark = pytest.mark.usefixtures("prefect_api")

# What a test builds when its point is the orchestration, not the artifacts: the portable fp32 file.
FP32_ONLY = {"flavours": ["portable"], "precisions": [], "support_cache": False}
EVERY_ARTIFACT = None  # the configuration's [artifacts]: every recipe


def small_config(tmp_path: Path, store: StoreConfig | None = None,
                 artifacts: dict[str, Any] | None = EVERY_ARTIFACT) -> Path:
    """Two matrix cells, one variant served by the local hub, and the given store (none by default)."""
    store_table = None if store is None else {"bucket": store.bucket, "prefix": store.prefix, "endpoint_url": store.endpoint_url}
    variants = [{"name": "finetuned", "repo_id": REPO, "revision": "main", "task": "classification"}]
    return write_config(tmp_path / "config.toml", store=store_table, variants=variants, artifacts=artifacts)


def snapshot_files(tmp_path: Path, build_config, seed: int) -> dict[str, bytes]:
    folder = tmp_path / f"weights-{seed}"
    write_synthetic_snapshot(folder, task="classification", size_name="tiny", size=build_config.sizes["tiny"], seed=seed)
    return {name: (folder / name).read_bytes() for name in ("config.json", "model.safetensors")}


def n_builds(exports: list[Path]) -> int:
    return sum(path.name == "model.onnx" for path in exports)  # one portable export per build


def _record_calls(monkeypatch: pytest.MonkeyPatch, owner, name: str, record) -> list:  # noqa: ANN001
    """Wrap owner.name so that each call appends record(*args) to the returned list."""
    calls: list = []
    real = getattr(owner, name)

    def recording(*args, **kwargs):
        calls.append(record(*args))
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, recording)
    return calls


@pytest.fixture()
def exports(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Records every export the flow performs."""
    import mitra_model.build.export

    # recipes import the exporter when they run, so the module's function is the one to record
    return _record_calls(monkeypatch, mitra_model.build.export, "export_onnx", lambda model, output: Path(output))


@pytest.fixture()
def cell_runs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every verification cell the flow runs."""
    return _record_calls(monkeypatch, flow_module.verification, "verify_cell", lambda snapshot, paths, cell: cell.name)


@pytest.fixture(scope="module", autouse=True)
def module_references(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One reference cache for the module's builds, as an artifacts root keeps it across a user's rebuilds:
    most tests build the same weights (seed 1), and upstream need not run their cells again each time."""
    global _REFERENCES
    _REFERENCES = tmp_path_factory.mktemp("references")
    yield _REFERENCES
    _REFERENCES = None


_REFERENCES: Path | None = None


def run(local_hub, config: Path, artifacts: Path, publish: bool = False, **kwargs):
    references = Path(artifacts) / "cache" / "reference"
    if _REFERENCES is not None and not references.exists():
        references.parent.mkdir(parents=True, exist_ok=True)
        references.symlink_to(_REFERENCES, target_is_directory=True)
    return flow_module.mitra_build(
        config_path=str(config), artifacts_root=str(artifacts), hub_endpoint=local_hub.endpoint, publish=publish,
        **kwargs,
    )[0]


def test_rebuilds_only_when_the_weights_change(local_hub, tmp_path: Path, build_config, exports,
                                               cell_runs) -> None:
    config, artifacts = small_config(tmp_path, artifacts=FP32_ONLY), tmp_path / "artifacts"
    files = snapshot_files(tmp_path, build_config, seed=1)
    first_commit = local_hub.add_commit(REPO, files)

    first = run(local_hub, config, artifacts)
    assert first["status"] == "built" and n_builds(exports) == 1
    manifest = json.loads((Path(first["build_dir"]) / "manifest.json").read_text())
    assert manifest["source"]["resolved_commit"] == first_commit
    assert manifest["source"]["requested_revision"] == "main"
    weights = next(f for f in manifest["source"]["files"] if f["path"] == "model.safetensors")
    assert weights["sha256"] == hashlib.sha256(files["model.safetensors"]).hexdigest()
    assert manifest["verification"]["fp32"]["passed"] is True
    assert not (artifacts / "work" / "finetuned" / first["version"]).exists()  # scratch exports are gone
    cells_per_build = len(cell_runs)
    assert cells_per_build > 0

    again = run(local_hub, config, artifacts)
    assert again == {**first, "status": "up-to-date"} and n_builds(exports) == 1  # nothing re-exported
    assert len(cell_runs) == cells_per_build  # nor re-verified

    readme_commit = local_hub.add_commit(REPO, {"README.md": b"# new model card\n"})
    assert readme_commit != first_commit
    assert run(local_hub, config, artifacts)["status"] == "up-to-date" and n_builds(exports) == 1
    assert len(cell_runs) == cells_per_build

    local_hub.add_commit(REPO, snapshot_files(tmp_path, build_config, seed=2))
    changed = run(local_hub, config, artifacts)
    assert changed["status"] == "built" and changed["version"] != first["version"] and n_builds(exports) == 2

    forced = run(local_hub, config, artifacts, force=True)
    assert forced["status"] == "built" and forced["version"] == changed["version"] and n_builds(exports) == 3


def test_damaged_build_is_rebuilt_not_trusted(local_hub, tmp_path: Path, build_config, exports) -> None:
    config, artifacts = small_config(tmp_path, artifacts=FP32_ONLY), tmp_path / "artifacts"
    local_hub.add_commit(REPO, snapshot_files(tmp_path, build_config, seed=1))
    first = run(local_hub, config, artifacts)
    (Path(first["build_dir"]) / "model.onnx").write_bytes(b"damaged")
    assert run(local_hub, config, artifacts)["status"] == "built" and n_builds(exports) == 2


def test_checksum_mismatch_stops_before_export(local_hub, tmp_path: Path, build_config, exports) -> None:
    config, artifacts = small_config(tmp_path), tmp_path / "artifacts"
    local_hub.add_commit(REPO, snapshot_files(tmp_path, build_config, seed=1))
    local_hub.corrupt(REPO, "model.safetensors")
    with pytest.raises(ChecksumMismatchError, match="model.safetensors"):
        run(local_hub, config, artifacts)
    assert exports == []
    assert not (artifacts / "builds").exists()


def test_unknown_revision_fails_with_a_clear_error(local_hub, tmp_path: Path, build_config, exports) -> None:
    config = small_config(tmp_path)
    local_hub.add_commit(REPO, snapshot_files(tmp_path, build_config, seed=1))
    with pytest.raises(HubNotFoundError, match="no-such-branch"):
        run(local_hub, config, tmp_path / "artifacts", revision="no-such-branch")
    assert exports == []


def test_publishes_and_the_pointer_is_the_build_record(local_hub, s3_store, s3_client, tmp_path: Path, build_config,
                                                       exports) -> None:
    from mitra_model.release.log import latest_release
    from mitra_model.release.pull import pull_release

    config, artifacts = small_config(tmp_path, store=s3_store), tmp_path / "artifacts"
    local_hub.add_commit(REPO, snapshot_files(tmp_path, build_config, seed=1))
    first = run(local_hub, config, artifacts, publish=True)
    assert first["status"] == "built" and first["published"].endswith("/manifest.json")
    pointer = latest_release(s3_client, s3_store, "finetuned")
    assert pointer["version"] == first["version"] and pointer["manifest_version"] == 1

    # The bucket, not the local folder, records what was built: a fresh machine is up to date too.
    import shutil

    shutil.rmtree(artifacts)
    again = run(local_hub, config, artifacts, publish=True)
    assert again["status"] == "up-to-date" and n_builds(exports) == 1

    pulled = pull_release("finetuned", dest=tmp_path / "pulled", client=s3_client, store=s3_store, progress=False)
    manifest = json.loads(pulled.manifest_path.read_text())
    assert manifest["version"] == first["version"]
    for artifact in manifest["artifacts"]:
        assert hashlib.sha256(pulled.files[artifact["name"]].read_bytes()).hexdigest() == artifact["sha256"]
    by_name = {a["name"]: a for a in manifest["artifacts"]}
    planned = load_config(config).artifacts.planned()
    assert set(by_name) == {f.name for r in planned for f in r.files}  # every planned recipe's files
    assert {"fp32", "fp32-ort", "int8", "fp16", "int4", "encode-support", "predict-query"} <= set(by_name)
    for name in (r.name for r in planned if r.verify_as == "graph"):
        (node,) = by_name[name]["checked_in"]
        assert node["runtime"] == "onnxruntime-node" and node["passed"] is True and node["version"], node
        assert node["onnx_sha256"] == by_name[name]["sha256"] and "predict_sha256" not in node
        assert by_name[name]["cpu"]["matrix_seconds"] > 0
    # the pair is checked together, encoder then predictor, and both files carry that check
    (pair_check,) = by_name["encode-support"]["checked_in"]
    assert by_name["predict-query"]["checked_in"] == [pair_check] and pair_check["passed"] is True
    assert pair_check["onnx_sha256"] == by_name["encode-support"]["sha256"]
    assert pair_check["predict_sha256"] == by_name["predict-query"]["sha256"]
    assert by_name["fp32"]["cpu"]["relative_to_fp32"] == 1.0
    assert "GPU" in by_name["fp16"]["purpose"] and "cpu" not in by_name["predict-query"]
    assert {i["name"] for i in by_name["predict-query"]["inputs"]} >= {"quantile_boundaries", "x_query"}
    assert all(manifest["verification"][name]["passed"] for name in by_name)
    # the release's model card and report page came with it, and the run's manifest card links the report
    assert set(pulled.documents) == {"README.md", "report.html"}
    assert "## Which file to take" in pulled.documents["README.md"].read_text()
    from prefect.artifacts import Artifact

    report_url = s3_store.http_url(f"{s3_store.prefix}/finetuned/{first['version']}/report.html")
    assert f"[{report_url}]({report_url})" in Artifact.get("finetuned-manifest").data


def test_a_registered_recipe_is_planned_built_verified_and_published(local_hub, s3_store, s3_client,
                                                                     tmp_path: Path, build_config) -> None:
    """A new reduced precision is one registry entry plus its tolerances in the configuration: once
    registered, the configuration plans it and the flow makes, checks, verifies, checks in Node and
    publishes it, with no other module touched."""
    from mitra_model.build import recipes
    from mitra_model.build.options import Int8Options
    from mitra_model.build.quantize import to_int8
    from mitra_model.release.pull import pull_release

    class PerChannelOptions(Int8Options):  # to_int8 reads Int8Options' fields
        per_channel: bool = True  # one weight scale per output column

    toy = recipes.register(recipes.reduced_precision(
        "int8-channel", converter=to_int8, options=PerChannelOptions, precision="int8",
        purpose="int8 weights with one scale per output column"))
    try:
        store = {"bucket": s3_store.bucket, "prefix": s3_store.prefix, "endpoint_url": s3_store.endpoint_url}
        # one flip among the 4 rows of the 2-row padded cell, between near-tied random-weight classes, is 0.75
        bounds = {**build_config.verification.tolerances["int8"].model_dump(exclude_none=True), "min_argmax_agreement": 0.75}
        config = write_config(
            tmp_path / "config.toml", store=store,
            variants=[{"name": "finetuned", "repo_id": REPO, "revision": "main", "task": "classification"}],
            artifacts={"flavours": ["portable", "optimized"], "precisions": ["int8-channel"]},
            tolerances={"int8-channel": bounds},
            consumers={"tolerances": {**load_config().consumers.tolerances, "int8-channel": {"onnxruntime-node": 1e-5}}},
        )
        assert [r.name for r in load_config(config).artifacts.planned()] == ["fp32", "fp32-ort", "int8-channel"]
        local_hub.add_commit(REPO, snapshot_files(tmp_path, build_config, seed=4))
        result = run(local_hub, config, tmp_path / "artifacts", publish=True)
        pulled = pull_release("finetuned", dest=tmp_path / "pulled", client=s3_client, store=s3_store,
                              artifacts=["int8-channel"], progress=False)
    finally:
        recipes.unregister(toy.name)
    manifest = json.loads(pulled.manifest_path.read_text())
    (entry,) = [a for a in manifest["artifacts"] if a["name"] == "int8-channel"]
    assert result["status"] == "built" and entry["file"] == "model-int8-channel.onnx" and entry["precision"] == "int8"
    assert manifest["verification"]["int8-channel"]["passed"] is True and entry["details"]["per_channel"] is True
    assert entry["purpose"] == toy.purpose and entry["checked_in"][0]["passed"] is True
    assert hashlib.sha256(pulled.files["int8-channel"].read_bytes()).hexdigest() == entry["sha256"]


def test_failed_verification_publishes_nothing(local_hub, s3_store, s3_client, tmp_path: Path, build_config,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from mitra_model.errors import VerificationError
    from mitra_model.release.log import latest_release

    monkeypatch.setattr(flow_module.verification, "verify_cell", _failing_verify(flow_module.verification.verify_cell))
    config = small_config(tmp_path, store=s3_store, artifacts=FP32_ONLY)
    local_hub.add_commit(REPO, snapshot_files(tmp_path, build_config, seed=1))
    with pytest.raises(VerificationError, match="cell 'small'"):
        run(local_hub, config, tmp_path / "artifacts", publish=True)
    assert latest_release(s3_client, s3_store, "finetuned") is None
    assert not (tmp_path / "artifacts" / "builds").exists()


def test_a_failed_reduced_precision_fails_the_run_naming_it(local_hub, s3_store, s3_client, tmp_path: Path,
                                                             build_config, monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 passes, int8 does not: the run fails naming int8 and the cell, and nothing is published."""
    from mitra_model.errors import VerificationError
    from mitra_model.release.log import latest_release

    monkeypatch.setattr(flow_module.verification, "verify_cell",
                        _failing_verify(flow_module.verification.verify_cell, only="model-int8.onnx"))
    config = small_config(tmp_path, store=s3_store,
                          artifacts={"flavours": ["portable", "optimized"], "precisions": ["int8"], "support_cache": False})
    local_hub.add_commit(REPO, snapshot_files(tmp_path, build_config, seed=1))
    with pytest.raises(VerificationError, match=r"model-int8\.onnx \(int8\) failed .*cell 'small'"):
        run(local_hub, config, tmp_path / "artifacts", publish=True)
    assert latest_release(s3_client, s3_store, "finetuned") is None
    assert not (tmp_path / "artifacts" / "builds").exists()


def _failing_verify(real, only: str | None = None):
    """verify_cell with a tolerance nothing meets (for every file, or only the one named): the stage
    must fail, never warn."""
    from mitra_model.build.config import Tolerance

    def verify(snapshot_dir, paths, cell, **kwargs):
        if only is None or any(Path(path).name == only for path in paths):
            kwargs["tolerance"] = Tolerance(max_abs=1e-15, min_argmax_agreement=1.0, min_correlation=1.0)
        return real(snapshot_dir, paths, cell, **kwargs)

    return verify


def test_s3_tasks_retry_only_what_a_retry_can_fix() -> None:
    """A refused version or refused credentials fail the same way every time: no retry hides them."""
    from prefect.states import Failed

    from mitra_model.errors import PublishError, StoreAuthError, StoreUnreachableError, VersionConflictError

    def retries(error: Exception) -> bool:
        return flow_module.retry_io_only(None, None, Failed(data=error))

    assert not retries(VersionConflictError("s3://b/v/model.onnx already holds different bytes"))
    assert not retries(StoreAuthError("the store refused the credentials"))
    assert retries(StoreUnreachableError("connection refused"))
    assert retries(PublishError("the store answered 503"))
    for s3_task in (flow_module.publish_release, flow_module.read_latest_release):
        assert s3_task.retries == 2 and s3_task.retry_condition_fn is flow_module.retry_io_only


def test_a_variant_can_be_a_local_folder(tmp_path: Path, tiny_snapshots) -> None:
    """Your own checkpoint: `path` instead of `repo_id`; the manifest records the folder and its digests."""
    import shutil

    folder = tmp_path / "my-finetune"
    shutil.copytree(tiny_snapshots["regression"].path, folder)
    config = write_config(tmp_path / "config.toml",
                          variants=[{"name": "mine", "path": "my-finetune", "task": "regression"}],
                          artifacts={"flavours": ["portable"], "precisions": [], "support_cache": False})
    result = flow_module.mitra_build(config_path=str(config), artifacts_root=str(tmp_path / "artifacts"),
                                     publish=False)[0]
    assert result["status"] == "built"
    source = json.loads((Path(result["build_dir"]) / "manifest.json").read_text())["source"]
    assert source["path"] == str(folder.resolve()) and source["repo_id"] is None and source["resolved_commit"] is None
    weights = next(f for f in source["files"] if f["path"] == "model.safetensors")
    assert weights["sha256"] == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def test_the_prefect_ui_shows_what_matters(local_hub, tmp_path: Path, build_config) -> None:
    """Library warnings in the run's logs, a run named after what it builds (as the README says it),
    artifact-specific task names, no per-task "Finished in state Completed()" noise, one card per kind
    per variant (progress updated in place, the tolerance beside each error, the manifest summary), a
    summary line saying where the build went, the variant tag and the variant lock."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
        LogFilter,
        LogFilterFlowRunId,
        TaskRunFilter,
    )

    both_flavours = {"flavours": ["portable", "optimized"], "precisions": [], "support_cache": False}
    config, artifacts = small_config(tmp_path, artifacts=both_flavours), tmp_path / "artifacts"
    local_hub.add_commit(REPO, snapshot_files(tmp_path, build_config, seed=1))
    local_hub.fail_next(1, status=503)  # one retry, which the library logs as a warning
    state = flow_module.mitra_build(config_path=str(config), artifacts_root=str(artifacts),
                                    hub_endpoint=local_hub.endpoint, publish=False, return_state=True)
    assert state.is_completed()
    top_id = state.state_details.flow_run_id

    keys = ["finetuned-manifest", "finetuned-progress", "finetuned-verification"]

    async def read():
        async with get_client() as client:
            top = await client.read_flow_run(top_id)
            children = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[top_id])))
            child_ids = [c.id for c in children] or [top_id]
            tasks = await client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [top_id, *child_ids]}),
                                                task_run_filter=TaskRunFilter())
            logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[top_id, *child_ids])))
            every = await client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[top_id, *child_ids])))
            limits = await client.read_global_concurrency_limits()
            return top, children, tasks, logs, every, limits

    top, children, tasks, logs, every, limits = asyncio.run(read())
    assert top.name == "mitra-build: finetuned @ main"
    assert any("variant:finetuned" in child.tags for child in children)
    names = {t.name for t in tasks}
    assert {"export-fp32", "check-fp32", "report-fp32"} <= names and any(n.startswith("verify-fp32-") for n in names)
    messages = [log.message for log in logs]
    assert any("retry 1/" in m for m in messages), messages  # the library's warning reached the UI
    noise = [log for log in logs if log.task_run_id and log.message.startswith("Finished in state Completed")]
    assert not noise and len([t for t in tasks if t.state.is_completed()]) > 10  # many tasks, no per-task line
    by_key = {a.key: a for a in sorted(every, key=lambda a: a.created)}  # each card as it ended
    assert {a.key for a in every} == set(keys)  # one card per kind for the variant, none per artifact
    assert [a.type for a in every].count("progress") == 1 and by_key["finetuned-progress"].data == 100.0
    verification_table = str(by_key["finetuned-verification"].data)
    assert "(<= " in verification_table and "fp32-ort" in verification_table  # every artifact, bound beside error
    summary = flow_module.summary_line(state.result()[0])  # the run's last log line: what, SYNTHETIC or not, where
    assert summary.startswith("finetuned built v-") and str(artifacts / "builds" / "finetuned") in summary
    assert "SYNTHETIC (random weights)" in summary  # the hub here serves synthetic snapshots
    real = flow_module.summary_line({**state.result()[0], "synthetic": False,
                                     "published": "s3://b/p/finetuned/v-1/manifest.json"})
    assert "SYNTHETIC" not in real and real.endswith("-> s3://b/p/finetuned/v-1/manifest.json")
    assert "Not published" in by_key["finetuned-manifest"].data
    assert any(limit.name == "mitra-build-variant-finetuned" and limit.limit == 1 for limit in limits)


def test_signed_release_and_the_scheduled_run_renews_the_pointer(local_hub, s3_store, s3_client, tmp_path: Path,
                                                                  build_config, monkeypatch: pytest.MonkeyPatch,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """With a signing key the release is signed before its pointer moves; a later run with nothing to
    build re-signs latest.json with a fresh expiry (TUF's timestamp role) and says so."""
    import time
    from datetime import datetime, timezone

    from mitra_model.release import layout
    from mitra_model.release.keys import generate_keypair
    from mitra_model.release.pointer import verify_pointer
    from mitra_model.release.signature import verify_release_signature

    generate_keypair(tmp_path / "release.pem", tmp_path / "release.pub")
    trusted = [(tmp_path / "release.pub").read_bytes()]
    monkeypatch.setenv("MITRA_SIGNING_KEY_FILE", str(tmp_path / "release.pem"))
    config, artifacts = small_config(tmp_path, store=s3_store, artifacts=FP32_ONLY), tmp_path / "artifacts"
    local_hub.add_commit(REPO, snapshot_files(tmp_path, build_config, seed=1))
    first = run(local_hub, config, artifacts, publish=True)

    def pointer():
        raw = s3_client.get_object(Bucket=s3_store.bucket, Key=layout.pointer_key(s3_store.prefix, "finetuned"))
        return verify_pointer(raw["Body"].read(), trusted, datetime.now(timezone.utc))

    signed = pointer()
    assert signed.version == first["version"] and signed.signature_key
    bundle = s3_client.get_object(Bucket=s3_store.bucket, Key=signed.signature_key)["Body"].read()
    content = verify_release_signature(bundle, trusted)
    assert "manifest.json" in content.files and "model.onnx" in content.files

    time.sleep(1.1)  # expiry has a one-second resolution
    with caplog.at_level("INFO"):
        again = run(local_hub, config, artifacts, publish=True)
    assert again["status"] == "up-to-date"
    renewed = pointer()
    assert renewed.manifest_version == signed.manifest_version and renewed.expires > signed.expires
    assert "re-signed finetuned's latest.json" in caplog.text
    assert (tmp_path / "release.pem").read_text() not in caplog.text
