"""GPTQ rounding of quantized weights: int4's 4-bit weights in MatMulNBits' layout, int8's symmetric levels.

Round-to-nearest rounds each weight on its own. GPTQ (Frantar et al. 2022, arXiv:2210.17323) rounds
a weight matrix one input row at a time and moves the rows not yet rounded so that, on calibration
activations X of that MatMul, the error of the rounded rows is cancelled as far as the rest can
cancel it: it minimises |X (W - Q)|^2, weighted by H = X^T X, instead of |W - Q|^2. On Mitra the
activations are far from isotropic (a table's cells are embedded from one scalar each), so most
rounding error can be moved where no input reaches it; bench/results-int4-options.md measures it.

The grid is MatMulNBits' (`block` input rows of one output column share a scale and a zero point,
asymmetric, the range always holding 0) and is taken from the unrounded weights, as round-to-nearest
takes it ("static groups"). Rows are visited in order of decreasing activation energy (GPTQ's act
order): with static groups the order changes no stored tensor, so the file needs no permutation
(MatMulNBits' `g_idx`, which onnxruntime-web does not implement).

The calibration tables are synthetic and never the verification's tables, so the task checks judge
the rounding on tables it has not seen. They are drawn like real tables (correlated columns of the
kinds real tables hold, labels that depend on the features) and prepared by the wrapper's own code
(`runtime.prepare`: constant columns dropped, labels 0..k-1, targets scaled to [0, 1]), so GPTQ moves
the rounding error away from what a user's table reaches: the matrix's tables (random labels over all
ten classes, constant columns kept) reach other directions (bench/results-int4-options.md measures both).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx

from mitra_model.errors import ExportError
from mitra_model.model.architecture import MitraConfig, Task
from mitra_model.runtime.prepare import model_inputs, prepare_support

_CALIBRATION_SALT = "gptq-calibration"  # keeps calibration tables apart from the matrix's (salted by cell name)


def grid(weight: np.ndarray, *, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """MatMulNBits' asymmetric grid of a (K, N) weight: scales and zero points, each (N, ceil(K / block))."""
    k, n = weight.shape
    top = 2**bits - 1
    blocks = np.pad(weight.astype(np.float64), ((0, (-k) % block), (0, 0))).reshape(-1, block, n)
    low = np.minimum(blocks.min(axis=1), 0.0)
    high = np.maximum(blocks.max(axis=1), 0.0)
    scales = (high - low) / top
    scales = np.where(scales > 0, scales, 1.0).astype(np.float32)  # an all-zero block: any scale, level = zero point
    zeros = np.clip(np.round(-low / scales), 0, top).astype(np.uint8)
    return scales.T.copy(), zeros.T.copy()


def gptq_levels(weight: np.ndarray, hessian: np.ndarray, *, bits: int, block: int, damp: float,
                lazy: int = 128) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round a (K, N) MatMul weight (y = x @ weight) to `bits` on MatMulNBits' grid with GPTQ.

    Args:
        weight: the fp32 weight.
        hessian: (K, K) sum of x^T x over the calibration activations of the MatMul's input.
        bits, block: the grid (`grid`).
        damp, lazy: as `gptq_round`.

    Returns:
        levels (K rounded up to whole blocks, N) uint8 in [0, 2**bits), scales (N, K / block) float32, zero points (N, K / block)
        uint8: weight ~ (levels - zero) * scale of its block.
    """
    pad = (-weight.shape[0]) % block  # MatMulNBits pads K to whole blocks with zero weights, never multiplied
    weight = np.pad(weight, ((0, pad), (0, 0)))
    scales, zeros = grid(weight, bits=bits, block=block)
    hessian = np.pad(np.asarray(hessian, dtype=np.float64), ((0, pad), (0, pad)))
    levels = gptq_round(weight, hessian, scales=scales, zeros=zeros, block=block, low=0, high=2**bits - 1,
                        damp=damp, lazy=lazy).astype(np.uint8)
    levels[weight.shape[0] - pad:] = 0  # what ONNX Runtime's quantizer stores there
    return levels, scales, zeros


def gptq_symmetric(weight: np.ndarray, hessian: np.ndarray, scale: np.ndarray, *, levels: int, damp: float,
                   lazy: int = 128) -> np.ndarray:
    """Round a (K, N) MatMul weight onto the symmetric int8 grid (level * scale, |level| <= `levels`;
    `scale` one per tensor or one per output column) with GPTQ: the int8 (K, N) levels."""
    k, n = weight.shape
    scales = np.broadcast_to(np.asarray(scale, dtype=np.float32).reshape(-1, 1), (n, 1))
    return gptq_round(weight, hessian, scales=scales, zeros=np.zeros((n, 1)), block=k, low=-levels, high=levels,
                      damp=damp, lazy=lazy).astype(np.int8)


def gptq_round(weight: np.ndarray, hessian: np.ndarray, *, scales: np.ndarray, zeros: np.ndarray, block: int,
               low: int, high: int, damp: float, lazy: int = 128) -> np.ndarray:
    """GPTQ (the loop of Frantar et al.'s Algorithm 1) onto a fixed grid: weight[k, n] ~ (level - zeros[n, k // block])
    * scales[n, k // block], level in [low, high].

    Args:
        weight: (K, N), K a whole number of blocks.
        hessian: (K, K) sum of x^T x over the calibration activations of the MatMul's input.
        damp: added to H's diagonal as a share of its mean, so a direction no calibration input
            reaches is rounded to nearest instead of absorbing everything.
        lazy: rows updated together (speed only; the result is the same for any value).

    Returns:
        The levels, (K, N) float64 holding integers.
    """
    k = weight.shape[0]
    h = np.array(hessian, dtype=np.float64)
    w = weight.astype(np.float64).T.copy()  # (N, K): the paper's orientation, a row per output
    dead = np.diag(h) == 0  # an input never non-zero in calibration: round it to nearest, move nothing
    h[dead, dead] = 1.0
    order = np.argsort(-np.diag(h), kind="stable")
    w, h = w[:, order], h[np.ix_(order, order)]
    h[np.diag_indices(k)] += damp * float(np.mean(np.diag(h)))
    # GPTQ's Cholesky form of the inverse: row i of U holds what rounding input i moves in the rest
    upper = np.linalg.cholesky(np.linalg.inv(h)).T
    row_scale = np.asarray(scales, dtype=np.float64).T[order // block]  # (K, N): each visited input's block grid
    row_zero = np.asarray(zeros, dtype=np.float64).T[order // block]
    levels = np.empty((k, w.shape[0]))
    for start in range(0, k, lazy):
        stop = min(start + lazy, k)
        part = w[:, start:stop].copy()
        errors = np.empty_like(part)
        for i in range(stop - start):
            row = start + i
            level = np.clip(np.round(part[:, i] / row_scale[row]) + row_zero[row], low, high)
            levels[order[row]] = level
            error = (part[:, i] - (level - row_zero[row]) * row_scale[row]) / upper[row, row]
            part[:, i:] -= np.outer(error, upper[row, row:stop])
            errors[:, i] = error
        w[:, stop:] -= errors @ upper[start:stop, stop:]
    return levels


def pack(levels: np.ndarray, zeros: np.ndarray, *, block: int) -> tuple[np.ndarray, np.ndarray]:
    """4-bit levels (K, N; K whole blocks) and zero points (N, K / block) in MatMulNBits' tensors: B (N, K / block,
    block / 2) and zero_points (N, ceil(K / block / 2)), two values a byte, the first in the low nibble
    (ONNX Runtime's own quantizer writes the same bytes for the same levels)."""
    k, n = levels.shape
    by_column = levels.T.reshape(n, k // block, block // 2, 2)
    packed = (by_column[..., 0] | (by_column[..., 1] << 4)).astype(np.uint8)
    padded = np.pad(zeros, ((0, 0), (0, zeros.shape[1] % 2)), constant_values=8)  # ONNX Runtime's filler: the midpoint
    packed_zeros = (padded[:, 0::2] | (padded[:, 1::2] << 4)).astype(np.uint8)
    return packed, packed_zeros


def config_from_metadata(model: onnx.ModelProto, source: object) -> MitraConfig:
    """The model config an exported Mitra file records in its metadata (`export.pin_volatile_fields`)."""
    props = {entry.key: entry.value for entry in model.metadata_props}
    try:
        return MitraConfig(dim=int(props["mitra.dim"]), dim_output=int(props["mitra.dim_output"]),
                           n_layers=int(props["mitra.n_layers"]), n_heads=int(props["mitra.n_heads"]),
                           task=Task(props["mitra.task"]))
    except (KeyError, ValueError) as exc:
        raise ExportError(f"GPTQ rounding calibrates on tables shaped for the model, but {source} lacks valid "
                          f"mitra.* metadata ({type(exc).__name__}: {exc}); export it with mitra-build export") from None


def calibration_inputs(config: MitraConfig, shapes: Sequence[Sequence[int]], *, seed: int
                       ) -> list[dict[str, np.ndarray]]:
    """One synthetic table (batch 1) per (n_support, n_query, n_features), prepared as a user's table is
    (the module docstring); the same seed and shapes always give the same tables."""
    salt = zlib.crc32(_CALIBRATION_SALT.encode())
    return [calibration_table(config, tuple(shape), np.random.default_rng([seed, salt, index, *shape]))
            for index, shape in enumerate(shapes)]


def calibration_table(config: MitraConfig, shape: tuple[int, ...], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A table whose columns share a few hidden factors and whose labels (a classifier's 2 to dim_output
    classes, every one in the support rows) or targets follow them, in the model's contract inputs."""
    n_support, n_query, n_features = shape
    rows = n_support + n_query
    factors = rng.normal(size=(rows, int(rng.integers(1, min(6, n_features) + 1))))
    x = factors @ rng.normal(size=(factors.shape[1], n_features)) + rng.normal(scale=rng.uniform(0.2, 1.5),
                                                                              size=(rows, n_features))
    for column in range(n_features):
        # column 0 stays continuous: a table always keeps a feature after constant columns are dropped
        x[:, column] = _real_column(x[:, column], "continuous" if column == 0 else rng.choice(_COLUMN_KINDS), rng)
    if config.label_is_class:
        n_classes = int(rng.integers(2, min(config.dim_output, n_support) + 1))
        scores = factors @ rng.normal(size=(factors.shape[1], n_classes)) * rng.uniform(0.5, 3.0)
        y = (scores + rng.gumbel(size=scores.shape)).argmax(axis=1)
        # every class gets a support row (a little label noise), so the prepared labels are 0..k-1
        y[rng.choice(n_support, size=n_classes, replace=False)] = np.arange(n_classes)
    else:
        y = (factors @ rng.normal(size=factors.shape[1]) + 0.5 * np.sin(2 * factors[:, 0])
             + rng.normal(scale=rng.uniform(0.1, 1.0), size=rows))
    support = prepare_support(x[:n_support], y[:n_support], classification=config.label_is_class, max_rows=n_support)
    return model_inputs(support, support.features(x[n_support:]))


_COLUMN_KINDS = ("continuous", "continuous", "counts", "categorical", "skewed", "large_magnitude")


def _real_column(column: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    if kind == "counts":  # integers with ties, often zero-inflated (pixel intensities, visit counts)
        levels = int(rng.integers(3, 17))
        counts = np.digitize(column, np.quantile(column, np.linspace(0, 1, levels + 1)[1:-1])).astype(np.float64)
        return np.where(rng.random(len(column)) < 0.5, 0.0, counts) if rng.random() < 0.4 else counts
    if kind == "categorical":  # a few integer codes
        return np.digitize(column, np.sort(rng.normal(size=int(rng.integers(1, 5))))).astype(np.float64)
    if kind == "skewed":
        return np.exp(column * rng.uniform(0.3, 1.0))
    if kind == "large_magnitude":
        return column * 10 ** rng.uniform(1, 5) + rng.normal() * 10 ** rng.uniform(1, 5)
    return column * rng.uniform(0.1, 10) + rng.normal() * 3


def activation_hessians(model: onnx.ModelProto, activations: Mapping[str, Sequence[str]],
                        tables: Iterable[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """H = sum of x^T x over every row x of each weight's MatMul inputs, on the calibration tables.

    Args:
        model: the fp32 model (not modified).
        activations: weight name -> the tensors its MatMuls multiply it with (a weight read by a
            support and a query path sums both).
        tables: contract inputs to run.
    """
    import onnxruntime as ort  # deferred: the slim install reads this package without onnxruntime

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    outputs = sorted({name for names in activations.values() for name in names})
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in outputs)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    hessians: dict[str, np.ndarray] = {}
    fed = [i.name for i in session.get_inputs()]  # encode-support takes the support inputs only
    for table in tables:
        got = dict(zip(outputs, session.run(outputs, {name: table[name] for name in fed}), strict=True))
        for weight, names in activations.items():
            for name in names:
                x = got[name].reshape(-1, got[name].shape[-1])
                gram = (x.T @ x).astype(np.float64)
                hessians[weight] = hessians[weight] + gram if weight in hessians else gram
    return hessians
