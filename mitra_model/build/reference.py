"""The reference of a verification cell or task check: upstream AutoGluon Tab2D's output, computed
once per build.

Every artifact of a build (each ONNX file, the support-cache pair) is compared with the same outputs:
upstream's `Tab2D` (upstream.py) with the snapshot's weights, on the cell's inputs (inputs.make_inputs)
or a task check's real table (tasks.load_table).
Those depend only on the weights, the cell, the seed and the code that computes them, so a cell's
reference is computed once, stored as `<cell>-<key>.npz` in a cache folder (written atomically), and
read back by every later artifact and by workers in other processes that share the folder.

A reference also holds our PyTorch rewrite's output (mitra_model.model.tab2d) on the same inputs and the
max abs difference of the two, so verifying an artifact proves ONNX ≈ rewrite ≈ upstream on the very
weights being published (verify.run_cell judges that difference).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import time
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sklearn
import torch
import torch.nn as nn

from mitra_model.build.config import Cell, TaskCell
from mitra_model.build.export import INPUT_NAMES, numpy_inputs
from mitra_model.build.tasks import load_table
from mitra_model.build.upstream import load_upstream, run_upstream, upstream_from_state, upstream_version
from mitra_model.errors import ReferenceCacheError
from mitra_model.fileutil import PACKAGE_DIR, atomic_file, sha256_file
from mitra_model.model.inputs import make_inputs
from mitra_model.model.snapshot import CONFIG_FILE, WEIGHTS_FILE, load_model
from mitra_model.model.tab2d import Tab2D

# Bump when the file layout changes; part of every key, so old files are simply not found.
REFERENCE_FORMAT = 1
# The code whose change can change a reference (the rest of the package cannot).
# The modules a reference depends on (relative to the package): a change to any is a new cache key.
_CODE_FILES = ("model/tab2d.py", "model/kinds.py", "model/inputs.py", "build/export.py", "build/upstream.py",
               "build/reference.py", "build/tasks.py")
Case = Cell | TaskCell  # a synthetic matrix cell, or a real table
_ARRAYS = ("upstream", "rewrite")


@dataclass(frozen=True, eq=False)  # eq would compare arrays
class CellReference:
    """One cell's inputs and reference outputs.

    Attributes:
        key: content key (weights, cell, seed, code); "" for a reference computed from a model in memory.
        cell: the matrix cell, or the task check (a real table).
        inputs: the four contract inputs (export.INPUT_NAMES), as every candidate is fed them.
        upstream: upstream Tab2D's output: THE reference every artifact is compared with.
        rewrite: our rewrite's (mitra_model.model.Tab2D) output on the same inputs.
        rewrite_vs_upstream_max_abs: max |rewrite - upstream| (inf when shapes differ or values are not finite).
        upstream_seconds, rewrite_seconds: what each forward took when the reference was computed.
        upstream_version: e.g. "autogluon.tabular==1.6.3".
        cached: read back from the cache folder (computed by an earlier artifact or process), or
            kept in memory from an earlier artifact of the same model (model_reference).
    """

    key: str
    cell: Case
    inputs: dict[str, np.ndarray]
    upstream: np.ndarray
    rewrite: np.ndarray
    rewrite_vs_upstream_max_abs: float
    upstream_seconds: float
    rewrite_seconds: float
    upstream_version: str
    cached: bool = False

    @property
    def seconds(self) -> float:
        """Upstream's plus the rewrite's forward time, when the reference was computed."""
        return self.upstream_seconds + self.rewrite_seconds


def case_inputs(case: Case, config: object, *, seed: int) -> dict[str, np.ndarray]:
    """The contract inputs of a matrix cell (synthetic, salted by its name) or a task check (its table)."""
    if isinstance(case, TaskCell):
        return load_table(case, seed=seed).inputs
    return make_inputs(case.as_tuple(), config=config, data=case.data, padded_support_rows=case.padded_support_rows,
                       seed=seed, salt=case.name)


def compute_reference(upstream: nn.Module, rewrite: Tab2D, cell: Case, *, seed: int, key: str = "") -> CellReference:
    """Run upstream and the rewrite (same weights) on the cell's inputs.

    Args:
        upstream: upstream Tab2D (upstream.load_upstream / upstream_from_state).
        rewrite: our Tab2D with the same weights.
        cell: the matrix cell (its shape, data kind, padding; its name salts the inputs) or task check.
        seed: the matrix seed.
        key: the content key to record (reference_key), "" for models in memory.

    Returns:
        The CellReference, not cached.
    """
    inputs = case_inputs(cell, rewrite.config, seed=seed)
    started = time.perf_counter()
    upstream_out = run_upstream(upstream, *numpy_inputs(inputs)).numpy()
    upstream_seconds = time.perf_counter() - started
    started = time.perf_counter()
    with torch.no_grad():
        rewrite_out = rewrite(*numpy_inputs(inputs)).numpy()
    rewrite_seconds = time.perf_counter() - started
    return CellReference(
        key=key, cell=cell, inputs=inputs, upstream=upstream_out, rewrite=rewrite_out,
        rewrite_vs_upstream_max_abs=_max_abs(rewrite_out, upstream_out), upstream_seconds=upstream_seconds,
        rewrite_seconds=rewrite_seconds, upstream_version=upstream_version(),
    )


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape or not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("inf")
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max(initial=0.0))


def model_reference(model: Tab2D, *, seed: int) -> Callable[[Case], CellReference]:
    """References for a model in memory (no snapshot folder, so no file cache): upstream is built
    with `model`'s weights as they are now, and each call gives one cell's reference.

    A cell's reference is kept in this process per (weights, config, cell, seed), like the build's
    file cache: verifying several artifacts of one model (each precision, the pair) computes each cell
    once.

    Raises:
        UpstreamMissingError: upstream is not installed.
    """
    state = model.state_dict()
    weights = _state_digest(repr(model.config), state)
    upstream: nn.Module | None = None

    def reference(cell: Case) -> CellReference:
        nonlocal upstream
        memo_key = (weights, _kind(cell), json.dumps(cell.model_dump(mode="json"), sort_keys=True), seed)
        if memo_key in _IN_MEMORY:
            _IN_MEMORY.move_to_end(memo_key)
            return dataclasses.replace(_IN_MEMORY[memo_key], cached=True)
        if upstream is None:
            upstream = upstream_from_state(model.config, state)
        computed = _IN_MEMORY[memo_key] = compute_reference(upstream, model, cell, seed=seed)
        for array in (*computed.inputs.values(), computed.upstream, computed.rewrite):
            array.setflags(write=False)  # shared by every later artifact: a caller's write would change them all
        while len(_IN_MEMORY) > _IN_MEMORY_CELLS:
            _IN_MEMORY.popitem(last=False)
        return computed

    return reference


# References of in-memory models (model_reference), oldest first; a matrix and its task checks are
# ~40 cells, so this holds a few models' worth (a cell's arrays are kilobytes to a few megabytes).
_IN_MEMORY: OrderedDict[tuple[str, str, str, int], CellReference] = OrderedDict()
_IN_MEMORY_CELLS = 128


def _state_digest(config: str, state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256(config.encode())
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name};{tensor.dtype};{tuple(tensor.shape)}".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def reference_key(snapshot_dir: Path, cell: Case, *, seed: int) -> str:
    """The content key of a cell's reference: weights and config.json (sha256), the cell's
    definition, the seed and the digest of the code that computes it."""
    folder = Path(snapshot_dir)
    payload = {
        "format": REFERENCE_FORMAT,
        "weights_sha256": _digest(folder / WEIGHTS_FILE),
        "config_sha256": _digest(folder / CONFIG_FILE),
        "cell": cell.model_dump(mode="json"),
        "kind": _kind(cell),
        "seed": seed,
        "code": reference_code_digest(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


@functools.lru_cache(maxsize=1)
def reference_code_digest() -> str:
    """SHA-256 over the upstream and torch versions and the source of the modules a reference depends on."""
    digest = hashlib.sha256(f"{upstream_version()};torch=={torch.__version__};numpy=={np.__version__};"
                            f"scikit-learn=={sklearn.__version__};".encode())
    for name in _CODE_FILES:
        digest.update(name.encode() + b"\0" + (PACKAGE_DIR / name).read_bytes() + b"\0")
    return digest.hexdigest()


def _kind(case: Case) -> str:
    return "task" if isinstance(case, TaskCell) else "cell"


def reference_path(cache_dir: Path, cell: Case, key: str) -> Path:
    """Where a cell's reference is cached: `<cache_dir>/<cell name>-<key>.npz`."""
    return Path(cache_dir) / f"{cell.name}-{key}.npz"


def reference_for(snapshot_dir: Path, cell: Case, *, seed: int, cache_dir: Path | None) -> CellReference:
    """A cell's reference: read from `cache_dir` when an earlier artifact computed it, else computed
    (upstream and the rewrite, loaded once per process) and written there atomically.

    Args:
        snapshot_dir: the checkpoint folder (config.json + model.safetensors) being built.
        cell: the matrix cell.
        seed: the matrix seed.
        cache_dir: the build's reference folder (shared by every artifact and worker); None computes
            without caching.

    Raises:
        ReferenceCacheError: the cached file is unreadable or holds another reference.
        SnapshotError: the snapshot is bad.
        UpstreamMissingError: upstream is not installed (and the reference is not cached).
    """
    key = reference_key(snapshot_dir, cell, seed=seed)
    path = reference_path(cache_dir, cell, key) if cache_dir is not None else None
    if path is not None and path.is_file():
        return load_reference(path, cell=cell, key=key)
    weights = Path(snapshot_dir) / WEIGHTS_FILE
    upstream, rewrite = _models(str(snapshot_dir), _stamp(weights))
    reference = compute_reference(upstream, rewrite, cell, seed=seed, key=key)
    if path is not None:
        save_reference(reference, path)
    return reference


def save_reference(reference: CellReference, path: Path) -> None:
    """Write a reference as one .npz (arrays, plus its metadata as JSON), atomically."""
    meta = {
        "format": REFERENCE_FORMAT, "key": reference.key, "cell": reference.cell.model_dump(mode="json"),
        "kind": _kind(reference.cell),
        "rewrite_vs_upstream_max_abs": reference.rewrite_vs_upstream_max_abs,
        "upstream_seconds": reference.upstream_seconds, "rewrite_seconds": reference.rewrite_seconds,
        "upstream_version": reference.upstream_version,
    }
    arrays = {**{f"input.{name}": reference.inputs[name] for name in INPUT_NAMES},
              "upstream": reference.upstream, "rewrite": reference.rewrite}
    with atomic_file(Path(path)) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, meta=np.array(json.dumps(meta, sort_keys=True)), **arrays)


def load_reference(path: Path, *, cell: Case | None = None, key: str | None = None) -> CellReference:
    """Read a reference written by save_reference (marked `cached`).

    Args:
        path: the .npz file.
        cell, key: when given, the file must hold exactly this cell's reference under this key.

    Raises:
        ReferenceCacheError: unreadable file, or another cell, key or format than expected.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            arrays = {name: data[name] for name in data.files if name != "meta"}
        stored_cell = (TaskCell if meta.get("kind") == "task" else Cell).model_validate(meta["cell"])
        inputs = {name: arrays[f"input.{name}"] for name in INPUT_NAMES}
        upstream, rewrite = (arrays[name] for name in _ARRAYS)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise ReferenceCacheError(
            f"reference cache file {path} is unreadable ({type(exc).__name__}: {exc}); delete it and it is recomputed"
        ) from exc
    expected = {"format": REFERENCE_FORMAT, "key": key, "cell": cell}
    found = {"format": meta.get("format"), "key": meta.get("key"), "cell": stored_cell}
    wrong = [f"{name} {found[name]!r}, expected {value!r}" for name, value in expected.items()
             if value is not None and found[name] != value]
    if wrong:
        raise ReferenceCacheError(
            f"reference cache file {path} holds another reference ({'; '.join(wrong)}): delete it and it is recomputed"
        )
    return CellReference(
        key=meta["key"], cell=stored_cell, inputs=inputs, upstream=upstream, rewrite=rewrite,
        rewrite_vs_upstream_max_abs=float(meta["rewrite_vs_upstream_max_abs"]),
        upstream_seconds=float(meta["upstream_seconds"]), rewrite_seconds=float(meta["rewrite_seconds"]),
        upstream_version=meta["upstream_version"], cached=True,
    )


def _stamp(path: Path) -> tuple[int, int]:
    stat = Path(path).stat()  # a rewritten file gets a new cache entry
    return stat.st_size, stat.st_mtime_ns


def _digest(path: Path) -> str:
    return _digest_of(str(path), _stamp(path))


@functools.lru_cache(maxsize=8)
def _digest_of(path: str, stamp: tuple[int, int]) -> str:
    return sha256_file(Path(path))  # ~1 s for the full 303 MB weights: once per process and file


@functools.lru_cache(maxsize=1)  # two full-size models are ~600 MB; a process verifies one snapshot at a time
def _models(snapshot_dir: str, stamp: tuple[int, int]) -> tuple[nn.Module, Tab2D]:
    return load_upstream(Path(snapshot_dir)), load_model(Path(snapshot_dir))[0]
