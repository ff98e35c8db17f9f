"""The build toolchain (the `[build]` extra): a snapshot in, verified ONNX artifacts and their build
record out. One stage per module, each a plain function: `config` (the validated configuration),
`recipes` (the artifact registry), `source`/`hub` (pinning and download), `export`, `quantize`,
`check`, `upstream`/`reference` (AutoGluon's Tab2D as the reference), `verify`, `consumers`
(onnxruntime-node and the browser), `record` (versions, the up-to-date decision, the manifest)."""
