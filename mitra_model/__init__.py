"""mitra-build: Mitra checkpoints -> verified, reproducible ONNX artifacts.

The library behind the `mitra-build` CLI and the Prefect flow: one module per stage (snapshot,
export, check, verify, ...), each callable without Prefect.
"""

__version__ = "0.1.0"
