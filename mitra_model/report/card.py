"""The model card: `README.md` in every release folder, in the Hugging Face model-card form (YAML
front matter, then Markdown), rendered from the release's manifest alone.

Most important first: the SYNTHETIC warning when it applies, which file to take, then how to run
it, how to pull and check it, how it was verified, where it came from.
"""

from __future__ import annotations

from typing import Any

from huggingface_hub import ModelCardData

from mitra_model.release.layout import MANIFEST_NAME, REPORT_NAME, SIGNATURE_NAME
from mitra_model.report import facts
from mitra_model.report.facts import ArtifactFacts, format_number, format_size


def front_matter(manifest: dict[str, Any]) -> ModelCardData:
    """The card's metadata: base model, library, license (when the source's is known), tags, task."""
    repo = facts.base_model(manifest)
    tags = ["onnx", "tabular", "mitra", "in-context-learning", "mitra-build"]
    if facts.is_synthetic(manifest):
        tags.append("synthetic-weights")
    return ModelCardData(
        base_model=repo, library_name="onnx", license=facts.KNOWN_LICENSES.get(repo),
        tags=tags, pipeline_tag="tabular-classification" if facts.is_classifier(manifest) else "tabular-regression",
    )


def _which_file(found: list[ArtifactFacts]) -> list[str]:
    lines = ["| file | for | runtimes | size | CPU time vs fp32 | verified |", "|---|---|---|---|---|---|"]
    for a in found:
        speed = f"{a.relative_cpu_time:.2f}x" if a.relative_cpu_time is not None else "-"
        verified = "passed" if a.passed else ("FAILED" if a.verification else "not recorded")
        lines.append(f"| `{a.file}` | {a.use_for} | {', '.join(a.runtimes) or '-'} | {format_size(a.size)} | "
                     f"{speed} | {verified} |")
    return lines


def _by_target(manifest: dict[str, Any]) -> list[str]:
    return [f"- For {target}: `{a.file}` ({why}; its signal lost: max err/spread "
            f"{format_number(a.metric('max_err_over_spread'), '.2g')})" for target, a, why in facts.recommendations(manifest)]


def _io_contract(manifest: dict[str, Any]) -> list[str]:
    lines = []
    for a in manifest.get("artifacts") or []:
        def specs(kind: str, entry: dict[str, Any] = a) -> str:
            return ", ".join(f"`{t['name']}` {t['dtype']} [{', '.join(map(str, t['shape']))}]"
                             for t in entry.get(kind) or [])
        lines.append(f"- `{a.get('file')}`: inputs {specs('inputs') or 'not recorded'}; outputs {specs('outputs') or 'not recorded'}")
    return lines


def python_example(manifest: dict[str, Any]) -> str:
    """A complete script that runs the reference file on random data from the release folder."""
    file = facts.reference_file(manifest)
    if facts.is_classifier(manifest):
        labels = "y_support = rng.integers(0, 3, size=(1, n_support)).astype(np.int64)  # class ids 0..n_classes-1"
        show = "print(output.shape, output[0].argmax(-1))  # (batch, n_query, classes): logits per query row"
    else:
        labels = "y_support = rng.normal(size=(1, n_support)).astype(np.float32)  # the support rows' targets"
        show = "print(output.shape, output[0])  # (batch, n_query): one prediction per query row"
    return "\n".join([
        "import numpy as np",
        "import onnxruntime as ort",
        "",
        f'session = ort.InferenceSession("{file}")  # run from the release folder (DEST of mitra-build pull)',
        "rng = np.random.default_rng(0)",
        "n_support, n_query, n_features = 64, 8, 5",
        "x_support = rng.normal(size=(1, n_support, n_features)).astype(np.float32)  # standardized features",
        labels,
        "x_query = rng.normal(size=(1, n_query, n_features)).astype(np.float32)",
        "padding_obs_support = np.zeros((1, n_support), dtype=bool)  # True marks a padded support row",
        "(output,) = session.run(None, {\"x_support\": x_support, \"y_support\": y_support,",
        "                               \"x_query\": x_query, \"padding_obs_support\": padding_obs_support})",
        show,
    ])


def node_example(manifest: dict[str, Any]) -> str:
    file = facts.reference_file(manifest)
    labels = ("new ort.Tensor('int64', BigInt64Array.from({ length: nS }, (_, i) => BigInt(i % 3)), [1, nS])"
              if facts.is_classifier(manifest) else "new ort.Tensor('float32', rand(nS), [1, nS])")
    return "\n".join([
        "// npm install onnxruntime-node",
        "import * as ort from 'onnxruntime-node';",
        "",
        f"const session = await ort.InferenceSession.create('{file}');",
        "const [nS, nQ, nF] = [64, 8, 5];",
        "const rand = (n) => Float32Array.from({ length: n }, () => Math.random() * 2 - 1);",
        "const { output } = await session.run({",
        "  x_support: new ort.Tensor('float32', rand(nS * nF), [1, nS, nF]),",
        f"  y_support: {labels},",
        "  x_query: new ort.Tensor('float32', rand(nQ * nF), [1, nQ, nF]),",
        "  padding_obs_support: new ort.Tensor('bool', new Uint8Array(nS), [1, nS]),",
        "});",
        "console.log(output.dims, output.data.slice(0, 4));",
    ])


def _verification(found: list[ArtifactFacts]) -> list[str]:
    header = " | ".join(label for label, _, _ in facts.VERIFICATION_BOUNDS)
    lines = ["Each number beside its bound (the build fails past it); err/spread is the error over what the "
             "output varies by across the query rows, the share of the signal lost.", "",
             f"| artifact | cells passed | {header} |", "|---|---|" + "---|" * len(facts.VERIFICATION_BOUNDS)]
    for a in found:
        cells, failed = a.verification.get("cells"), a.verification.get("failed_cells") or 0
        shown = [f"{format_number(a.metric(key), '.2e')} (<= {format_number(a.bound(bound), 'g')})"
                 if a.bound(bound) is not None else format_number(a.metric(key), ".2e")
                 for _, key, bound in facts.VERIFICATION_BOUNDS]
        lines.append(f"| {a.name} | {'-' if cells is None else f'{cells - failed}/{cells}'} | {' | '.join(shown)} |")
    tasks = [(a, t) for a in found for t in a.verification.get("tasks") or []]
    if tasks:
        lines += ["", "Real tables (scikit-learn's bundled datasets; support = train split, queries = test split):", "",
                  "| artifact | table (score) | err/spread (bound) | score | upstream | chance | passed |", "|---|---|---|---|---|---|---|"]
        for a, t in tasks:
            bound = a.verification.get("tolerance", {}).get("max_task_err_over_spread") or a.bound("max_err_over_spread")
            metric = next(iter(t.get("scores") or {}), None)  # the task's first score (accuracy, RMSE)
            scores = [format_number((t.get(which) or {}).get(metric), ".3f")
                      for which in ("scores", "upstream_scores", "chance_scores")]
            lines.append(f"| {a.name} | {t.get('name')} ({metric}) | {format_number(t.get('err_over_spread'), '.3g')} "
                         f"(<= {format_number(bound, 'g')}) | {' | '.join(scores)} | {'yes' if t.get('passed') else 'NO'} |")
        notes = {a.verification.get("tasks_note") for a, _ in tasks} - {None}
        lines += ["", *(f"> {note}" for note in sorted(notes))]
    return lines


def _provenance(manifest: dict[str, Any]) -> list[str]:
    source, build = manifest.get("source") or {}, manifest.get("build") or {}
    lines = [f"- Source: {facts.origin(manifest)}"]
    lines += [f"  - `{f.get('path')}`: {f.get('size'):,} bytes, sha256 `{f.get('sha256')}`" for f in source.get("files") or []]
    toolchain = ", ".join(f"{k} {v}" for k, v in sorted((build.get("toolchain") or {}).items()))
    lines += [f"- Toolchain: {toolchain or 'not recorded'}; ONNX opset {build.get('opset', 'not recorded')}",
              f"- Build config sha256 `{build.get('config_sha256')}`, code sha256 `{build.get('code_sha256')}`"]
    reference = build.get("reference") or {}
    if reference:
        lines.append(f"- Reference: {reference.get('upstream', 'upstream')}; the exported PyTorch rewrite differs from it "
                     f"by {format_number(reference.get('rewrite_vs_upstream_max_abs'), '.2e')} at most")
    if manifest.get("previous_manifest_sha256"):
        lines.append(f"- Replaces the release whose manifest has sha256 `{manifest['previous_manifest_sha256']}`")
    if manifest.get("reverts"):
        lines.append(f"- A revert: serves the files of {manifest['reverts'].get('version')} "
                     f"(release {manifest['reverts'].get('manifest_version')}) again, as a new release")
    return lines


def _pull(manifest: dict[str, Any], where: str) -> list[str]:
    url = f"{where}@{manifest.get('version')}"
    signed = manifest.get("signed_by")
    lines = ["```sh", f"mitra-build pull {url} --dest ./mitra --trusted-key release-signing.pub --require-signature",
             "model_signing verify key --public_key release-signing.pub "
             f"--signature ./mitra/{SIGNATURE_NAME} --allow_symlinks ./mitra", "```", ""]
    lines.append("Add `--endpoint-url URL` for a store other than AWS S3 (e.g. `http://127.0.0.1:8333`, the local one).")
    lines.append("")
    lines.append(f"This release is signed (key id `{signed}`): `{SIGNATURE_NAME}` beside this card signs every file, this "
                 "card and the report included." if signed else
                 "This release is **not signed**: a pull with `--trusted-key` refuses it. Pull without a key, "
                 f"and check each file against `{MANIFEST_NAME}` (what `mitra-build check-release ./mitra` does).")
    return lines


def model_card(manifest: dict[str, Any], where: str = "s3://BUCKET/PREFIX/VARIANT") -> str:
    """The release's README.md.

    Args:
        manifest: the release's manifest (a build folder's draft works too: no publish fields).
        where: the variant's URL in the store, for the pull command.

    Returns:
        Markdown with YAML front matter.
    """
    found = facts.artifacts(manifest)
    lines = [f"# {facts.release_label(manifest)}: Mitra as ONNX", ""]
    if facts.is_synthetic(manifest):
        lines += [f"> **{facts.SYNTHETIC_WARNING}**", ""]
    failed = [a.name for a in found if not a.passed]
    lines += [f"**Take `{facts.reference_file(manifest)}`** unless a row of the table below fits your runtime better: it "
              "computes what upstream Mitra computes. " + ("Every file passed verification against upstream. " if not failed
                                                           else f"**Verification FAILED for {', '.join(failed)}.** ")
              + {"signed": f"Signed (key id `{manifest.get('signed_by')}`).", "unsigned": "**Not signed.**",
                 "unpublished": "An unpublished build: a release is signed when it is published."}[facts.signing_status(manifest)],
              ""]
    lines += [f"Mitra ({'classifier' if facts.is_classifier(manifest) else 'regressor'}), the tabular foundation model, "
              f"exported to ONNX by mitra-build from {facts.origin(manifest)}. Every file below was compared with "
              f"upstream AutoGluon Mitra on a matrix of shapes and on real tables; plots are in `{REPORT_NAME}`.", "",
              "## Which file to take", "", *_by_target(manifest), "", *_which_file(found), "",
              "Inputs and outputs (symbolic dimensions are free at run time):", "", *_io_contract(manifest), "",
              "## Run it", "", "Python (`pip install onnxruntime numpy`):", "", "```python", python_example(manifest), "```", "",
              "Node.js:", "", "```js", node_example(manifest), "```", "",
              "## Pull it and check the signature", "", *_pull(manifest, where), "",
              "## Verification against upstream", "", *_verification(found), "",
              "## Provenance", "", *_provenance(manifest), "",
              "## Files", "", "| file | size | sha256 |", "|---|---|---|",
              *(f"| `{a.file}` | {a.size:,} | `{a.sha256}` |" for a in found), ""]
    return f"---\n{front_matter(manifest).to_yaml()}\n---\n\n" + "\n".join(lines)
