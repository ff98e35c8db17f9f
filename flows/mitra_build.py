"""The deployments' entrypoint (prefect.yaml: `flows/mitra_build.py:mitra_build`).

The flow itself is part of the library, `mitra_model/pipeline/flow.py`, so that an installed
mitra-build runs it (`mitra-build run`) without this checkout; a worker runs it from here.
"""

from mitra_model.pipeline.flow import mitra_build

__all__ = ["mitra_build"]
