"""Fit once, predict many: Mitra split into a support encoder and a query predictor.

Mitra is an in-context learner whose support rows never attend to query rows, so everything computed
on the support side is the same for every predict. `SupportEncoder` runs that side once and returns
the *support cache*; `QueryPredictor` runs only the query rows against it. Both share the parameters
of one loaded `Tab2D` and call its own functions and layers, so

    QueryPredictor(model)(*SupportEncoder(model)(x_support, y_support, padding_obs_support), x_query)

computes the same numbers as `model(x_support, y_support, x_query, padding_obs_support)`, for any
split of the query rows into batches (query rows never see each other).

The cache: what the query path needs from the support set, nothing more. L layers, D model dim,
H heads, B batch, S support rows, F features, T = F + 1 tokens per row (label token first):

    name                  dtype    shape                   what
    quantile_boundaries   float32  (B, F, 999)             the 999 quantiles of every support column
    n_valid_support       int64    (B,)                    unpadded support rows (the rank divisor)
    feature_mean          float32  (B, F)                  mean of the support's rank features
    feature_std           float32  (B, F)                  their std; 0 marks a constant column
    support_keys_{l}      float32  (B, T, H, S, D/H)       layer l's attention1.k(layer_norm1(support)),
    support_values_{l}    float32  (B, T, H, S, D/H)         .v(...), split into heads; l = 0 .. L-1
    model_fingerprint     int64    (1,)                    which weights made the cache

K/V dominate: 2·L·B·T·S·D·4 bytes (full size, S=512, F=16: 427.8 MB; everything else is 64 KB).
They are the smallest state that spares every support-side matmul: caching each layer's normalized
support rows instead would halve it but redo the K/V projections on every predict (2·L·T·S·D² MACs,
55 G at that size, several times a Q=8 predict's own work). Padded support rows stay in K/V because
upstream lets them take part in row attention.

K/V are stored in the layout attention reads, so a predict copies none of them: one tensor per layer
(slicing a stacked (L, ...) tensor copies it in ONNX Runtime) with the heads already split ((B·T, H,
S, D/H) is what scaled_dot_product_attention and contrib MultiHeadAttention take). Against a stacked
(L, B, T, S, D) cache this made the full-size predict at S=512, Q=8 about a third faster (portable
0.275 -> 0.196 s, optimized 0.246 -> 0.153 s, same machine and run). The price is a signature that
depends on L: 2·L + 5 cache tensors (29 at full size), listed in order by `cache_names(L)`.

ONNX files (`export_support_cache`), every dimension dynamic; names and dtypes in
`support_cache_contract`:

    encode-support.onnx   x_support (B,S,F) f32, y_support (B,S) i64|f32, padding_obs_support (B,S) bool
                          -> the cache, in `cache_names(L)` order
    predict-query.onnx    the cache in the same order, then x_query (B,Q,F) f32
                          -> output (B,Q,C) f32 logits (classifier) or (B,Q) f32 (regressor)

Query row b must be predicted against the support set of batch item b (the batch is a stack of
independent tables, as in the full model).

A mismatched cache fails loudly rather than predicting garbage: a query whose batch or feature count
differs from the cache's, or a cache written by other weights, makes ONNX Runtime raise at a Gather
named `/cache_must_fit_query/...` or `/cache_must_come_from_this_model/...` before any work is done;
PyTorch raises SupportCacheError with the shapes. The "-ort" flavour runs attention as ONNX Runtime's
contrib MultiHeadAttention, as in export.py; the cache is the same, so either flavour's predict
reads either flavour's cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import Cell, Shape, Tolerance
from .errors import ExportError, SupportCacheError
from .export import EXPORTER_SETTINGS, FLAVOUR_FILES, ExportResult, Flavour, TensorSpec, pin_volatile_fields, numpy_inputs
from .fileutil import atomic_file, sha256_file
from .inputs import make_inputs
from .model import (
    N_QUANTILES,
    PADDING_SENTINEL,
    FusedAttention,
    MitraConfig,
    MultiheadAttention,
    Tab2D,
    attention,
    bucketize_strict,
    fused_attention,
    rows_as_sequences,
    sequences_as_rows,
    split_heads,
    support_quantiles,
)
from .verify import CellResult, VerificationReport, compare_outputs, make_report, onnx_session

ENCODE_INPUT_NAMES = ("x_support", "y_support", "padding_obs_support")
STATS_NAMES = ("quantile_boundaries", "n_valid_support", "feature_mean", "feature_std")
FINGERPRINT_NAME = "model_fingerprint"
OUTPUT_NAME = "output"
# File names per flavour: (encoder, predictor). "-ort" as in export.FLAVOUR_FILES.
SUPPORT_CACHE_FILES: dict[str, tuple[str, str]] = {
    "portable": ("encode-support.onnx", "predict-query.onnx"),
    "optimized": ("encode-support-ort.onnx", "predict-query-ort.onnx"),
}
assert set(SUPPORT_CACHE_FILES) == set(FLAVOUR_FILES)


# ---------------------------------------------------------------------------------------------
# The contract


def cache_names(n_layers: int) -> tuple[str, ...]:
    """The cache tensors' names in order: statistics, each layer's keys and values, fingerprint."""
    per_layer = (f"support_{kind}_{layer}" for layer in range(n_layers) for kind in ("keys", "values"))
    return (*STATS_NAMES, *per_layer, FINGERPRINT_NAME)


def support_cache_contract(config: MitraConfig) -> dict[str, tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]]:
    """Inputs and outputs of both files, keyed "encode_support" and "predict_query" (like export.io_contract).

    Fixed dims are ints (heads, head size, 999 quantiles); the rest are names. "n_tokens" is
    n_features + 1.
    """
    label_dtype = "int64" if config.label_is_class else "float32"
    kv_shape = ("batch", "n_tokens", config.n_heads, "n_support", config.dim // config.n_heads)
    stats = (
        TensorSpec("quantile_boundaries", "float32", ("batch", "n_features", N_QUANTILES)),
        TensorSpec("n_valid_support", "int64", ("batch",)),
        TensorSpec("feature_mean", "float32", ("batch", "n_features")),
        TensorSpec("feature_std", "float32", ("batch", "n_features")),
    )
    kv = tuple(TensorSpec(name, "float32", kv_shape) for name in cache_names(config.n_layers)[len(stats):-1])
    cache = (*stats, *kv, TensorSpec(FINGERPRINT_NAME, "int64", (1,)))
    encode_inputs = (
        TensorSpec("x_support", "float32", ("batch", "n_support", "n_features")),
        TensorSpec("y_support", label_dtype, ("batch", "n_support")),
        TensorSpec("padding_obs_support", "bool", ("batch", "n_support")),
    )
    out_shape: tuple[str | int, ...] = ("batch", "n_query", config.dim_output) if config.label_is_class else ("batch", "n_query")
    predict_inputs = (*cache, TensorSpec("x_query", "float32", ("batch", "n_query", "n_features")))
    return {
        "encode_support": (encode_inputs, cache),
        "predict_query": (predict_inputs, (TensorSpec(OUTPUT_NAME, "float32", out_shape),)),
    }


def cache_nbytes(config: MitraConfig, *, batch: int, n_support: int, n_features: int) -> int:
    """Bytes of one support cache (the sum of its tensors)."""
    tokens = n_features + 1
    kv = 2 * config.n_layers * batch * tokens * n_support * config.dim * 4
    return kv + batch * n_features * N_QUANTILES * 4 + batch * 8 + 2 * batch * n_features * 4 + 8


def model_fingerprint(model: Tab2D) -> int:
    """A signed 64-bit digest of the model's weights (names, shapes, values), stored in every cache."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return int.from_bytes(digest.digest()[:8], "big", signed=True)


# ---------------------------------------------------------------------------------------------
# The modules


def _attend(mha: MultiheadAttention, query: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`mha(query, key_value)` where k, v = mha.k(key_value), mha.v(key_value) are already projected."""
    q = mha.q(query)
    if mha.fused:
        return mha.o(FusedAttention.apply(q, k, v, mha.n_heads))
    return mha.o(attention(q, k, v, mha.n_heads))


def attention_cached(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_heads: int) -> torch.Tensor:
    """model.attention with k, v already split into heads: q (N, Lq, D), k, v (N, H, Lk, D/H) -> (N, Lq, D)."""
    out = F.scaled_dot_product_attention(split_heads(q, n_heads), k, v)  # (N, H, Lq, D/H)
    return out.transpose(1, 2).flatten(-2)


class FusedAttentionCached(torch.autograd.Function):
    """`attention_cached` in PyTorch; exported as contrib MultiHeadAttention with BNSH key/value (the
    format ONNX Runtime takes for a cross-attention cache), so the cache is read in place."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_heads: int) -> torch.Tensor:  # noqa: ANN001
        return attention_cached(q, k, v, n_heads)

    @staticmethod
    def symbolic(g, q, k, v, n_heads: int):  # noqa: ANN001, ANN205 - TorchScript exporter hook
        out = g.op("com.microsoft::MultiHeadAttention", q, k, v, num_heads_i=n_heads)
        out.setType(q.type())
        return out


def _attend_cached(mha: MultiheadAttention, query: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`mha(query, support)` from the cached heads k, v (N, H, S, D/H) of the support rows."""
    q = mha.q(query)
    if mha.fused:
        return mha.o(FusedAttentionCached.apply(q, k, v, mha.n_heads))
    return mha.o(attention_cached(q, k, v, mha.n_heads))


def _tracing() -> bool:
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


class SupportEncoder(nn.Module):
    """forward(x_support, y_support, padding_obs_support) -> the support cache (`cache_names` order)."""

    def __init__(self, model: Tab2D) -> None:
        super().__init__()
        self.model = model  # shared, not copied
        self.register_buffer("fingerprint", torch.tensor([model_fingerprint(model)], dtype=torch.int64), persistent=False)

    def embed_support(
        self, x_support: torch.Tensor, padding_obs_support: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """Support half of `Tab2DQuantileEmbeddingX.forward`, op for op, returning its statistics too."""
        boundaries = support_quantiles(x_support, padding_obs_support)  # (B, F, 999)
        x_support = torch.where(padding_obs_support.unsqueeze(-1), PADDING_SENTINEL, x_support)
        support_rank = bucketize_strict(x_support.transpose(1, 2), boundaries, N_QUANTILES)  # (B, F, S)

        padding = padding_obs_support.unsqueeze(-1)  # (B, S, 1)
        n_valid = (~padding_obs_support).sum(dim=1)  # (B,) int64
        count = n_valid.view(-1, 1, 1).to(torch.float32)  # (B, 1, 1)
        support = torch.where(padding, 0.0, support_rank.transpose(1, 2).to(torch.float32) / count)  # (B, S, F)
        mean = support.sum(dim=1, keepdim=True) / count  # (B, 1, F)
        support = torch.where(padding, 0.0, support - mean)
        var = (support * support).sum(dim=1, keepdim=True) / count  # (B, 1, F)
        std = var.sqrt()  # 0 exactly where var == 0: the constant-column marker
        constant = var == 0
        support = torch.where(constant, 0.0, support / torch.where(constant, 1.0, std))
        return support, boundaries, n_valid, mean.squeeze(1), std.squeeze(1)  # ..., (B, F), (B, F)

    def forward(
        self, x_support: torch.Tensor, y_support: torch.Tensor, padding_obs_support: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        model = self.model
        x_rank, boundaries, n_valid, mean, std = self.embed_support(x_support, padding_obs_support)
        y_tokens, _ = model.y_embedding(y_support, padding_obs_support, 1)  # (B, S, 1, D); query part unused
        support = torch.cat([y_tokens, model.x_embedding(x_rank)], dim=2)  # (B, S, T, D)
        batch = support.shape[0]

        cache: list[torch.Tensor] = []
        last = len(model.layers) - 1
        for index, layer in enumerate(model.layers):
            mha = layer.attention1
            rows = rows_as_sequences(layer.layer_norm1(support))  # (B*T, S, D)
            k, v = mha.k(rows), mha.v(rows)  # (B*T, S, D) each: what the query rows read at this layer
            for projected in (k, v):  # (B*T, S, D) -> (B*T, H, S, D/H) -> (B, T, H, S, D/H)
                cache.append(split_heads(projected, mha.n_heads).unflatten(0, (batch, -1)).contiguous())
            if index < last:  # Layer.forward with the query left out; the last update feeds no output
                support = support + sequences_as_rows(_attend(mha, rows, k, v), batch)
                support = layer.feature_block(support)
        return boundaries, n_valid, mean, std, *cache, self.fingerprint.clone()


def _gate(x: torch.Tensor, mismatch: torch.Tensor) -> torch.Tensor:
    """`x` unchanged when `mismatch` is False; an out-of-range Gather index (a runtime error) when True."""
    index = mismatch.to(torch.int64).view(1)  # [0] selects x; [1] is out of range for a dim of size 1
    return x.unsqueeze(0).index_select(0, index).squeeze(0)


class CacheMustFitQuery(nn.Module):
    """Guard: x_query and every cache tensor agree on batch and feature count, and K/V have this
    model's layer count, heads and head size, and one support length.

    Broadcasting would otherwise take a one-feature query (or one batch item) against a larger cache
    and predict garbage. Exported, the check is a Gather whose index goes out of range on a mismatch;
    the query path depends on its output, so it fails before anything else runs, and ONNX Runtime's
    error names this module (`/cache_must_fit_query/...`).
    """

    def __init__(self, n_layers: int, n_heads: int, head_dim: int) -> None:
        super().__init__()
        self.n_layers, self.n_heads, self.head_dim = n_layers, n_heads, head_dim

    def forward(self, x_query: torch.Tensor, stats: Sequence[torch.Tensor], kv: Sequence[torch.Tensor]) -> torch.Tensor:
        if not _tracing():
            self._explain(x_query, stats, kv)
        query = torch._shape_as_tensor(x_query)  # [B, Q, F]
        batch, features, one = query[0], query[2], torch.ones_like(query[0])
        got, want = [], []
        for tensor, dims in zip(stats, ((0, 1), (0,), (0, 1), (0, 1))):  # boundaries, n_valid, mean, std
            shape = torch._shape_as_tensor(tensor)
            got += [shape[axis] for axis in dims]
            want += [batch, features][: len(dims)]
        n_support = torch._shape_as_tensor(kv[0])[3]
        for tensor in kv:  # (B, T, H, S, D/H)
            shape = torch._shape_as_tensor(tensor)
            got += [shape[0], shape[1] - 1, shape[2], shape[3], shape[4]]
            want += [batch, features, one * self.n_heads, n_support, one * self.head_dim]
        return _gate(x_query, (torch.stack(got) != torch.stack(want)).any())

    def _explain(self, x_query: torch.Tensor, stats: Sequence[torch.Tensor], kv: Sequence[torch.Tensor]) -> None:
        batch, _, features = x_query.shape
        found = {name: (tuple(t.shape[: len(w)]), w) for name, t, w in zip(
            STATS_NAMES, stats, ((batch, features), (batch,), (batch, features), (batch, features)))}
        n_support = kv[0].shape[3] if kv else 0
        for name, tensor in zip(cache_names(self.n_layers)[len(STATS_NAMES):-1], kv):
            found[name] = (tuple(tensor.shape), (batch, features + 1, self.n_heads, n_support, self.head_dim))
        bad = [f"{name} {got} (expected {want})" for name, (got, want) in found.items() if got != want]
        if len(kv) != 2 * self.n_layers:
            bad.insert(0, f"{len(kv)} key/value tensors (expected {2 * self.n_layers}: "
                          f"keys and values of {self.n_layers} layers)")
        if bad:
            raise SupportCacheError(
                f"support cache does not fit x_query {tuple(x_query.shape)} (batch, n_query, n_features) and this "
                f"model ({self.n_layers} layers, {self.n_heads} heads of {self.head_dim}): " + "; ".join(bad)
                + ". Encode the support set of the same table (same batch and features) with the same model."
            )


class CacheMustComeFromThisModel(nn.Module):
    """Guard: the cache's model_fingerprint is this model's (same architecture, other weights would
    otherwise predict garbage silently). Exported like CacheMustFitQuery, named `/cache_must_come_from_this_model/`."""

    def __init__(self, fingerprint: int) -> None:
        super().__init__()
        self.register_buffer("fingerprint", torch.tensor([fingerprint], dtype=torch.int64), persistent=False)

    def forward(self, x_query: torch.Tensor, model_fingerprint: torch.Tensor) -> torch.Tensor:
        if not _tracing() and not torch.equal(model_fingerprint, self.fingerprint):
            raise SupportCacheError(
                f"support cache was encoded by other weights (model_fingerprint {model_fingerprint.tolist()}, this "
                f"model's is {self.fingerprint.tolist()}): encode the support set with the predictor's own model"
            )
        return _gate(x_query, (model_fingerprint != self.fingerprint).any())


class QueryPredictor(nn.Module):
    """forward(*support_cache, x_query) -> (B, Q, C) or (B, Q), the numbers of Tab2D.forward.

    The inputs are the cache in `cache_names(L)` order (as SupportEncoder returns it), then x_query.
    """

    def __init__(self, model: Tab2D) -> None:
        super().__init__()
        config = model.config
        self.model = model  # shared, not copied
        self.cache_must_fit_query = CacheMustFitQuery(config.n_layers, config.n_heads, config.dim // config.n_heads)
        self.cache_must_come_from_this_model = CacheMustComeFromThisModel(model_fingerprint(model))

    def embed_query(
        self, x_query: torch.Tensor, boundaries: torch.Tensor, n_valid: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
    ) -> torch.Tensor:
        """Query half of `Tab2DQuantileEmbeddingX.forward`, op for op, from the cached statistics."""
        query_rank = bucketize_strict(x_query.transpose(1, 2), boundaries, N_QUANTILES)  # (B, F, Q)
        count = n_valid.view(-1, 1, 1).to(torch.float32)  # (B, 1, 1)
        query = query_rank.transpose(1, 2).to(torch.float32) / count  # (B, Q, F)
        query = query - mean.unsqueeze(1)
        std = std.unsqueeze(1)  # (B, 1, F)
        constant = std == 0
        return torch.where(constant, 0.0, query / torch.where(constant, 1.0, std))

    def forward(self, *cache_and_query: torch.Tensor) -> torch.Tensor:
        model = self.model
        *cache, fingerprint, x_query = cache_and_query
        stats, kv = cache[: len(STATS_NAMES)], cache[len(STATS_NAMES) :]  # stats; (B, T, H, S, D/H) per layer, K and V
        x_query = self.cache_must_fit_query(x_query, stats, kv)  # (B, Q, F)
        x_query = self.cache_must_come_from_this_model(x_query, fingerprint)
        x_rank = self.embed_query(x_query, *stats)
        batch, n_query = x_query.shape[0], x_query.shape[1]
        y_tokens = model.y_embedding.y_mask.weight.expand(batch, n_query, -1).unsqueeze(2)  # (B, Q, 1, D)
        query = torch.cat([y_tokens, model.x_embedding(x_rank)], dim=2)  # (B, Q, T, D)

        for index, layer in enumerate(model.layers):
            k, v = (t.flatten(0, 1) for t in kv[2 * index : 2 * index + 2])  # (B*T, H, S, D/H)
            rows = rows_as_sequences(layer.layer_norm1(query))  # (B*T, Q, D)
            query = query + sequences_as_rows(_attend_cached(layer.attention1, rows, k, v), batch)
            query = layer.feature_block(query)

        out = model.final_layer(model.final_layer_norm(query[:, :, 0]))  # (B, Q, C), label token only
        if model.config.label_is_class:
            return out
        return out[..., 0]  # (B, Q)


# ---------------------------------------------------------------------------------------------
# Export


@dataclass(frozen=True)
class SupportCacheExport:
    flavour: str
    encode: ExportResult  # encode-support[-ort].onnx
    predict: ExportResult  # predict-query[-ort].onnx
    fingerprint: int  # the model_fingerprint both files carry


def export_support_cache(
    model: Tab2D,
    out_dir: Path,
    *,
    opset: int,
    trace_shape: Shape,
    flavour: Flavour = "portable",
    metadata: dict[str, str] | None = None,
) -> SupportCacheExport:
    """Export the encoder/predictor pair of `model` into `out_dir` (each file written atomically,
    byte-identical on re-export).

    Args:
        model: an eval-mode Tab2D.
        out_dir: folder for SUPPORT_CACHE_FILES[flavour].
        opset: ONNX opset (>= 17).
        trace_shape: shape of the example inputs both halves are traced with.
        flavour: "portable" (standard ONNX ops) or "optimized" (contrib MultiHeadAttention), as in export.py.
        metadata: extra `metadata_props` (content-derived values only, e.g. Snapshot.onnx_metadata()).

    Raises:
        ExportError: unknown flavour, or the exporter failed.
    """
    if flavour not in SUPPORT_CACHE_FILES:
        raise ExportError(f"unknown export flavour {flavour!r}; expected one of {', '.join(SUPPORT_CACHE_FILES)}")
    out_dir = Path(out_dir)
    config = model.config
    contract = support_cache_contract(config)
    encoder, predictor = SupportEncoder(model.eval()).eval(), QueryPredictor(model).eval()
    fingerprint = int(encoder.fingerprint.item())
    example = make_inputs(trace_shape.as_tuple(), config=config, data="mixed", seed=0, salt="trace")
    encode_args = tuple(torch.from_numpy(example[name]) for name in ENCODE_INPUT_NAMES)
    with torch.no_grad():
        cache = encoder(*encode_args)
    props = {
        **(metadata or {}), "mitra_build.flavour": flavour,
        "mitra_build.model_fingerprint": f"{fingerprint & (2**64 - 1):016x}",  # unsigned hex of the int64
    }
    encode_file, predict_file = SUPPORT_CACHE_FILES[flavour]
    encode = _export_module(
        encoder, encode_args, out_dir / encode_file, contract["encode_support"], config=config, opset=opset,
        flavour=flavour, metadata={**props, "mitra_build.support_cache": "encode_support"},
    )
    predict = _export_module(
        predictor, (*cache, torch.from_numpy(example["x_query"])), out_dir / predict_file, contract["predict_query"],
        config=config, opset=opset, flavour=flavour, metadata={**props, "mitra_build.support_cache": "predict_query"},
    )
    return SupportCacheExport(flavour=flavour, encode=encode, predict=predict, fingerprint=fingerprint)


def _export_module(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    output: Path,
    contract: tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]],
    *,
    config: MitraConfig,
    opset: int,
    flavour: str,
    metadata: dict[str, str],
) -> ExportResult:
    """export.export_onnx's recipe for any module: TorchScript exporter, volatile fields pinned, every
    input and output dim named per the contract."""
    inputs, outputs = contract
    dynamic_axes = {
        spec.name: {axis: dim for axis, dim in enumerate(spec.shape) if isinstance(dim, str)} for spec in (*inputs, *outputs)
    }
    model = module.model  # type: ignore[attr-defined]
    started = time.perf_counter()
    with atomic_file(output) as raw_path, torch.no_grad(), warnings.catch_warnings(), \
            fused_attention(model, flavour == "optimized"):
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        try:
            torch.onnx.export(
                module,
                args,
                str(raw_path),
                input_names=[spec.name for spec in inputs],
                output_names=[spec.name for spec in outputs],
                dynamic_axes={name: axes for name, axes in dynamic_axes.items() if axes},
                opset_version=opset,
                custom_opsets={"com.microsoft": 1} if flavour == "optimized" else None,
                **EXPORTER_SETTINGS,
            )
        except Exception as exc:  # the exporter raises many unrelated types
            raise ExportError(f"torch.onnx.export failed for {output}: {type(exc).__name__}: {exc}") from exc
        proto = onnx.load(str(raw_path))
        _check_names(proto, inputs, outputs, output)
        pin_volatile_fields(proto, config, metadata)
        for value, spec in zip((*proto.graph.input, *proto.graph.output), (*inputs, *outputs)):
            _name_dims(value, spec.shape)
        onnx.save_model(proto, str(raw_path))
    seconds = time.perf_counter() - started
    return ExportResult(path=output, sha256=sha256_file(output), size=output.stat().st_size, opset=opset, seconds=seconds)


def _check_names(proto: onnx.ModelProto, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], output: Path) -> None:
    """The exporter drops unused inputs silently; a graph that lost one would break the contract."""
    got = ([v.name for v in proto.graph.input], [v.name for v in proto.graph.output])
    want = ([s.name for s in inputs], [s.name for s in outputs])
    if got != want:
        raise ExportError(f"exported {output.name} has inputs/outputs {got}, the support-cache contract expects {want}")


def _name_dims(value: onnx.ValueInfoProto, dims: tuple[str | int, ...]) -> None:
    """The exporter names dims after internal nodes; give them the contract's names."""
    shape = value.type.tensor_type.shape
    for dim, want in zip(shape.dim, dims):
        if isinstance(want, str):
            dim.ClearField("dim_value")
            dim.dim_param = want
        else:
            dim.ClearField("dim_param")
            dim.dim_value = want


# ---------------------------------------------------------------------------------------------
# Verification


def verify_support_cache(
    model: Tab2D,
    encode_path: Path,
    predict_path: Path,
    *,
    cells: Sequence[Cell],
    tolerance: Tolerance,
    seed: int = 0,
    query_batches: int = 3,
    precision: str = "fp32",
    on_cell: Callable[[CellResult], None] | None = None,
) -> VerificationReport:
    """Per cell: encode the support set once in ONNX Runtime, predict the query rows in up to
    `query_batches` batches against that one cache, and compare the joined output with the full
    PyTorch model's (Tab2D.forward) under `tolerance`.

    The report's onnx_path / onnx_sha256 are the predictor's; `summary` records the query batch
    count. `torch_seconds` is the full forward, `onnx_seconds` the encode plus every predict.
    Returns the report whether or not cells failed (verify.require_passed turns failure into an error).
    """
    encoder, predictor = onnx_session(encode_path), onnx_session(predict_path)
    is_classifier = model.config.label_is_class
    results: list[CellResult] = []
    for cell in cells:
        inputs = make_inputs(
            cell.as_tuple(), config=model.config, data=cell.data, padded_support_rows=cell.padded_support_rows,
            seed=seed, salt=cell.name,
        )
        started = time.perf_counter()
        with torch.no_grad():
            reference = model(*numpy_inputs(inputs)).numpy()
        torch_seconds = time.perf_counter() - started
        started = time.perf_counter()
        candidate, error = None, ""
        try:
            cache = encoder.run(None, {name: inputs[name] for name in ENCODE_INPUT_NAMES})
            feed = dict(zip(cache_names(model.config.n_layers), cache))
            parts = [
                predictor.run(None, {**feed, "x_query": chunk})[0]
                for chunk in np.array_split(inputs["x_query"], min(query_batches, cell.n_query), axis=1)
            ]
            candidate = np.concatenate(parts, axis=1)
        except Exception as exc:  # an ORT failure on one cell is a failed cell, not a crash
            error = f"ONNX Runtime failed: {type(exc).__name__}: {str(exc).splitlines()[0]}"
        onnx_seconds = time.perf_counter() - started
        if candidate is None:
            metrics: dict[str, float | None] = {
                "max_abs_err": float("inf"), "max_rel_err": float("inf"), "argmax_agreement": None, "correlation": None,
                "max_prob_err": None,
            }
            failures = [error]
        else:
            metrics, failures = compare_outputs(reference, candidate, is_classifier=is_classifier, tolerance=tolerance)
        results.append(CellResult(
            name=cell.name, shape=cell.as_tuple(), data=cell.data, padded_support_rows=cell.padded_support_rows,
            max_abs_err=float(metrics["max_abs_err"]), max_rel_err=float(metrics["max_rel_err"]),
            argmax_agreement=metrics["argmax_agreement"], correlation=metrics["correlation"],
            max_prob_err=metrics["max_prob_err"],
            torch_seconds=torch_seconds, onnx_seconds=onnx_seconds, failures=tuple(failures),
        ))
        if on_cell is not None:
            on_cell(results[-1])
    report = make_report(predict_path, precision=precision, tolerance=tolerance, results=results)
    return dataclasses.replace(report, summary={**report.summary, "query_batches": query_batches})
