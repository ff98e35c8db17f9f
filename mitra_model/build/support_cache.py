"""Fit once, predict many: Mitra split into a support encoder and a query predictor.

Mitra is an in-context learner whose support rows never attend to query rows, so everything computed
on the support side is the same for every predict. `SupportEncoder` runs that side once and returns
the *support cache*; `QueryPredictor` runs only the query rows against it. Both share the parameters
of one loaded `Tab2D` and are its forward cut in two: the encoder calls `Tab2D.embed_support` and
`encode_support_layers`, the predictor `embed_query` and `predict_query_layers` (this module adds only
the cache layout, its guards and the export), so

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

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from mitra_model.build.export import (
    OUTPUT_NAME,
    Contract,
    ExportResult,
    Flavour,
    TensorSpec,
    check_flavour,
    export_module,
)
from mitra_model.errors import SupportCacheError
from mitra_model.model.inputs import make_inputs
from mitra_model.model.kinds import Shape
from mitra_model.model.tab2d import N_QUANTILES, MitraConfig, SupportStatistics, Tab2D, split_heads
from mitra_model.release.layout import SUPPORT_CACHE_FILES

ENCODE_INPUT_NAMES = ("x_support", "y_support", "padding_obs_support")
STATS_NAMES = ("quantile_boundaries", "n_valid_support", "feature_mean", "feature_std")  # model.SupportStatistics
FINGERPRINT_NAME = "model_fingerprint"


# ---------------------------------------------------------------------------------------------
# The contract


def cache_names(n_layers: int) -> tuple[str, ...]:
    """The cache tensors' names in order: statistics, each layer's keys and values, fingerprint."""
    per_layer = (f"support_{kind}_{layer}" for layer in range(n_layers) for kind in ("keys", "values"))
    return (*STATS_NAMES, *per_layer, FINGERPRINT_NAME)


def support_cache_contract(config: MitraConfig) -> dict[str, Contract]:
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


def _tracing() -> bool:
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


class SupportEncoder(nn.Module):
    """forward(x_support, y_support, padding_obs_support) -> the support cache (`cache_names` order)."""

    def __init__(self, model: Tab2D) -> None:
        super().__init__()
        self.model = model  # shared, not copied
        self.register_buffer("fingerprint", torch.tensor([model_fingerprint(model)], dtype=torch.int64), persistent=False)

    def forward(
        self, x_support: torch.Tensor, y_support: torch.Tensor, padding_obs_support: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        model = self.model
        support, stats = model.embed_support(x_support, y_support, padding_obs_support)  # (B, S, T, D)
        batch = support.shape[0]
        kv = [  # per layer, keys then values, each (B*T, S, D) -> (B*T, H, S, D/H) -> (B, T, H, S, D/H)
            split_heads(projected, model.config.n_heads).unflatten(0, (batch, -1)).contiguous()
            for key_value in model.encode_support_layers(support)
            for projected in key_value
        ]
        return (*stats, *kv, self.fingerprint.clone())


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

    def forward(self, *cache_and_query: torch.Tensor) -> torch.Tensor:
        *cache, fingerprint, x_query = cache_and_query
        stats, kv = cache[: len(STATS_NAMES)], cache[len(STATS_NAMES) :]  # stats; (B, T, H, S, D/H) per layer, K and V
        x_query = self.cache_must_fit_query(x_query, stats, kv)  # (B, Q, F)
        x_query = self.cache_must_come_from_this_model(x_query, fingerprint)
        query = self.model.embed_query(SupportStatistics(*stats), x_query)  # (B, Q, T, D)
        key_values = [(k.flatten(0, 1), v.flatten(0, 1)) for k, v in zip(kv[0::2], kv[1::2])]  # (B*T, H, S, D/H)
        return self.model.predict_query_layers(query, key_values)


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

    Returns:
        Both files' export results and the fingerprint they carry.

    Raises:
        ExportError: unknown flavour, the exporter failed, or a graph does not match support_cache_contract.
    """
    check_flavour(flavour)
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
        **(metadata or {}),
        "mitra_build.model_fingerprint": f"{fingerprint & (2**64 - 1):016x}",  # unsigned hex of the int64
    }
    encode_file, predict_file = SUPPORT_CACHE_FILES[flavour]
    encode = export_module(
        encoder, encode_args, out_dir / encode_file, contract["encode_support"], model_config=config, opset=opset,
        flavour=flavour, metadata={**props, "mitra_build.support_cache": "encode_support"},
    )
    predict = export_module(
        predictor, (*cache, torch.from_numpy(example["x_query"])), out_dir / predict_file, contract["predict_query"],
        model_config=config, opset=opset, flavour=flavour, metadata={**props, "mitra_build.support_cache": "predict_query"},
    )
    return SupportCacheExport(flavour=flavour, encode=encode, predict=predict, fingerprint=fingerprint)
