"""mitra-build: Mitra checkpoints -> verified, reproducible ONNX artifacts, published and pulled.

Four parts, lowest first (the arrows are import-linter contracts in pyproject.toml, checked in CI):

- `model`: the architecture, the one model definition (`tab2d`), snapshot reading. Needs torch.
- `release`: what a consumer installs: the bucket layout, the S3 store, publish, pull, signatures,
  the client API. Imports nothing from `model` or `build`, and no torch, onnx or Prefect.
- `build`: the toolchain: configuration, the recipe registry, export, quantize, check, the upstream
  reference, verification, consumer checks, the build record. Each stage a function, no Prefect.
- `pipeline`: the Prefect flow over `build` and `release`, and its Prefect plumbing.
- `cli`: the `mitra-build` command and the local S3 server, over all of the above.

`errors` and `fileutil` sit below them all.
"""

__version__ = "0.1.0"
