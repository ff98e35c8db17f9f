"""Mitra (AutoGluon Tab2D) rewritten so that `torch.onnx.export` can trace it.

Upstream: `autogluon.tabular.models.mitra._internal.models.{tab2d,embedding}` (AutoGluon 1.6.3). This
file reproduces upstream's CPU path operation for operation, with the same parameter names and shapes,
so upstream checkpoints load without renaming. What changed, and why:

- `torch.quantile` and `vmap(torch.bucketize)` do not export. The quantile is rebuilt from a sort and
  the exact rank/lerp arithmetic ATen uses; bucketize is a fixed-depth (10-step) replica of ATen's
  lower-bound binary search, so a value equal to a boundary counts only the boundaries *strictly
  below* it (`right=False`), exactly like upstream, and memory stays O(B·F·N) instead of O(B·F·N·999).
- In-place masked writes (`x[padding] = 0`) become `torch.where`.
- einops/einx/checkpointing/flash-attention are gone; shapes are spelled out in comments.
- The final layer norm and head run on the label token only (upstream computes them for every token
  and then keeps token 0: same numbers, F+1 times less work), and the last layer skips the support
  update that no output depends on.
- Support rows never read query rows, so the forward is written as its two sides: `embed_support` and
  `encode_support_layers` (the support's statistics, and each layer's keys and values), then
  `embed_query` and `predict_query_layers` (the query rows against them). Each layer projects the
  support's keys and values once and both sides read them (upstream projects them twice, once for
  each side's attention call: same numbers).
  support_cache.py runs the two sides as separate ONNX files by calling these same methods.

Like upstream's CPU path, padded support rows are excluded from the quantile statistics but still
take part in row attention, and there is no feature padding.

Shapes: B batch, S support rows, Q query rows, F features, T = F + 1 tokens per row (label token
first), D model dim, H heads.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from typing import NamedTuple, TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from mitra_model.model.architecture import MitraConfig, Task  # noqa: F401 - re-exported: the model's config types

N_QUANTILES = 999  # upstream: torch.arange(1, 1000) / 1000
PADDING_SENTINEL = 9999.0  # upstream writes this into padded support rows before the quantiles


# ---------------------------------------------------------------------------------------------
# Quantile embedding


def bucketize_strict(values: torch.Tensor, boundaries: torch.Tensor, n_boundaries: int) -> torch.Tensor:
    """`torch.bucketize(values, boundaries, right=False)` per row, as a fixed-depth binary search.

    Args:
        values: (..., N) values to place.
        boundaries: (..., K) boundaries, sorted ascending along the last dim.
        n_boundaries: K as a Python int (the loop depth must not depend on a traced shape).

    Returns:
        (..., N) int64: for sorted boundaries, the number of boundaries strictly below each value.

    The loop replays ATen's `cus_lower_bound` step by step (same midpoints, same `!(mid >= value)`
    test), so even NaNs and not-quite-sorted boundaries land where upstream puts them.
    """
    low = torch.zeros_like(values, dtype=torch.int64)
    high = torch.full_like(values, n_boundaries, dtype=torch.int64)
    for _ in range(n_boundaries.bit_length()):  # 10 halvings empty any range of 999
        mid = low + (high - low) // 2
        mid_value = torch.gather(boundaries, -1, mid.clamp(max=n_boundaries - 1))
        go_right = ~(mid_value >= values)
        active = low < high
        low = torch.where(active & go_right, mid + 1, low)
        high = torch.where(active & ~go_right, mid, high)
    return low


def support_quantiles(x_support: torch.Tensor, padding_obs_support: torch.Tensor) -> torch.Tensor:
    """The 999 quantiles of every support column, as `torch.quantile(..., interpolation='linear')`.

    Args:
        x_support: (B, S, F) float32.
        padding_obs_support: (B, S) bool, True for padded rows (they count as 9999, like upstream).

    Returns:
        (B, F, 999) float32 boundaries.
    """
    x = torch.where(padding_obs_support.unsqueeze(-1), PADDING_SENTINEL, x_support)  # (B, S, F)
    ordered = torch.sort(x, dim=1).values  # (B, S, F)
    levels = torch.arange(1, N_QUANTILES + 1, dtype=torch.float32, device=x.device) / 1000  # (999,)
    # ATen: ranks = q * last_index in float32; below = trunc(ranks); above = ceil(ranks)
    last_index = (x.shape[1] - 1) * torch.ones((), dtype=torch.float32, device=x.device)
    ranks = levels * last_index  # (999,)
    below = ranks.to(torch.int64)
    above = torch.ceil(ranks).to(torch.int64)
    weight = ranks - below.to(torch.float32)  # (999,) in [0, 1)
    start = torch.index_select(ordered, 1, below)  # (B, 999, F)
    end = torch.index_select(ordered, 1, above)  # (B, 999, F)
    # ATen's lerp switches formula at weight 0.5 to stay exact at both ends
    weight = weight.view(1, -1, 1)
    low_side = start + weight * (end - start)
    high_side = end - (end - start) * (1 - weight)
    boundaries = torch.where(weight < 0.5, low_side, high_side)  # (B, 999, F)
    return boundaries.transpose(1, 2)  # (B, F, 999)


class SupportStatistics(NamedTuple):
    """What the query embedding needs from the support set (the support cache's first four tensors)."""

    boundaries: torch.Tensor  # (B, F, 999) float32: the 999 quantiles of every support column
    n_valid: torch.Tensor  # (B,) int64: unpadded support rows, the divisor of every rank
    mean: torch.Tensor  # (B, F) float32: mean of the support's rank features
    std: torch.Tensor  # (B, F) float32: their std; exactly 0 for a constant column


def standardize(x: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """x / std, with 0 for a constant column (std == 0): upstream's 0/0 there is mapped to 0 too."""
    constant = std == 0
    return torch.where(constant, 0.0, x / torch.where(constant, 1.0, std))


class Tab2DQuantileEmbeddingX(nn.Module):
    """Replace each value by its quantile bucket in the support column, standardized per column.

    Upstream does both sides in one forward; here the support side also returns the statistics the
    query side needs, so the query rows can be embedded later (support_cache.py)."""

    def embed_support(
        self, x_support: torch.Tensor, padding_obs_support: torch.Tensor
    ) -> tuple[torch.Tensor, SupportStatistics]:
        # x_support (B, S, F), padding_obs_support (B, S) -> (B, S, F) and the support's statistics
        boundaries = support_quantiles(x_support, padding_obs_support)  # (B, F, 999)
        # upstream buckets the support with its padded rows still at 9999
        x_support = torch.where(padding_obs_support.unsqueeze(-1), PADDING_SENTINEL, x_support)
        rank = bucketize_strict(x_support.transpose(1, 2), boundaries, N_QUANTILES)  # (B, F, S)

        # Column statistics are summed along the last axis, (B, F, S): ONNX Runtime reduces a middle
        # axis with a loop that depends on B, so a table's mean would change in its last bits with the
        # number of tables sent together; along the last axis each (table, column) sums the same way.
        padding = padding_obs_support.unsqueeze(1)  # (B, 1, S)
        n_valid = (~padding_obs_support).sum(dim=1)  # (B,)
        count = n_valid.view(-1, 1, 1).to(torch.float32)  # (B, 1, 1)
        support = torch.where(padding, 0.0, rank.to(torch.float32) / count)  # (B, F, S)
        mean = support.sum(dim=-1, keepdim=True) / count  # (B, F, 1)
        support = torch.where(padding, 0.0, support - mean)
        var = (support * support).sum(dim=-1, keepdim=True) / count  # (B, F, 1)
        std = var.sqrt()  # (B, F, 1), 0 exactly where var is
        stats = SupportStatistics(boundaries, n_valid, mean.squeeze(-1), std.squeeze(-1))  # (B, F, 1) -> (B, F)
        return standardize(support, std).transpose(1, 2), stats  # (B, S, F)

    def embed_query(self, stats: SupportStatistics, x_query: torch.Tensor) -> torch.Tensor:
        # x_query (B, Q, F) -> (B, Q, F), ranked and standardized by the support's statistics
        rank = bucketize_strict(x_query.transpose(1, 2), stats.boundaries, N_QUANTILES)  # (B, F, Q)
        count = stats.n_valid.view(-1, 1, 1).to(torch.float32)  # (B, 1, 1)
        query = rank.transpose(1, 2).to(torch.float32) / count  # (B, Q, F)
        query = query - stats.mean.unsqueeze(1)  # (B, F) -> (B, 1, F)
        return standardize(query, stats.std.unsqueeze(1))  # (B, F) -> (B, 1, F)


class Tab2DEmbeddingX(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.x_embedding = nn.Linear(1, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.x_embedding(x.unsqueeze(-1))  # (B, N, F) -> (B, N, F, D)


class _Tab2DEmbeddingY(nn.Module):
    """The query rows' label token: their label is unknown, so every one gets the learned `y_mask`."""

    y_mask: nn.Embedding

    def embed_query(self, batch: int, n_query: int) -> torch.Tensor:
        return self.y_mask.weight.expand(batch, n_query, -1).unsqueeze(2)  # (1, D) -> (B, Q, 1, D)


class Tab2DEmbeddingYClasses(_Tab2DEmbeddingY):
    def __init__(self, dim: int, n_classes: int) -> None:
        super().__init__()
        self.y_embedding = nn.Embedding(n_classes, dim)
        self.y_mask = nn.Embedding(1, dim)  # the query's unknown label is a class of its own

    def embed_support(self, y_support: torch.Tensor, padding_obs_support: torch.Tensor) -> torch.Tensor:
        # y_support (B, S) integer class ids; padded rows may hold anything (upstream: -100)
        padding = padding_obs_support.unsqueeze(-1)  # (B, S, 1)
        labels = torch.where(padding_obs_support, 0, y_support.to(torch.int64))
        support = torch.where(padding, 0.0, self.y_embedding(labels))  # (B, S, D)
        return support.unsqueeze(2)  # (B, S, 1, D)


class Tab2DEmbeddingYRegression(_Tab2DEmbeddingY):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.y_embedding = nn.Linear(1, dim)
        self.y_mask = nn.Embedding(1, dim)

    def embed_support(self, y_support: torch.Tensor, padding_obs_support: torch.Tensor) -> torch.Tensor:
        # y_support (B, S) float targets
        padding = padding_obs_support.unsqueeze(-1)  # (B, S, 1)
        support = self.y_embedding(y_support.to(torch.float32).unsqueeze(-1))  # (B, S, D)
        support = torch.where(padding, 0.0, support)
        return support.unsqueeze(2)  # (B, S, 1, D)


# ---------------------------------------------------------------------------------------------
# Transformer


def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    return x.unflatten(-1, (n_heads, -1)).transpose(1, 2)  # (N, L, D) -> (N, H, L, D/H)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Unmasked multi-head attention over projected q (N, Lq, D) -> (N, Lq, D).

    k, v are (N, Lk, D), or already split into heads, (N, H, Lk, D/H) (a support cache's layout).
    """
    q = split_heads(q, n_heads)  # (N, H, Lq, D/H)
    if k.dim() == 3:
        k, v = split_heads(k, n_heads), split_heads(v, n_heads)  # (N, H, Lk, D/H)
    out = F.scaled_dot_product_attention(q, k, v)  # (N, H, Lq, D/H)
    return out.transpose(1, 2).flatten(-2)  # (N, Lq, D)


class FusedAttention(torch.autograd.Function):
    """`attention` in PyTorch; exported as ONNX Runtime's contrib `com.microsoft.MultiHeadAttention`,
    which never materializes the (N, H, Lq, Lk) scores (17 GB at S=4096 in the portable graph).

    Both key/value layouts export as they are: ONNX Runtime reads 3-D k, v as BSD and 4-D as BNSH
    (its format for a cross-attention cache), so cached heads are read in place."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_heads: int) -> torch.Tensor:  # noqa: ANN001
        return attention(q, k, v, n_heads)

    @staticmethod
    def symbolic(g, q, k, v, n_heads: int):  # noqa: ANN001, ANN205 - TorchScript exporter hook
        out = g.op("com.microsoft::MultiHeadAttention", q, k, v, num_heads_i=n_heads)
        out.setType(q.type())
        return out


class MultiheadAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        assert dim % n_heads == 0, f"dim {dim} is not divisible by n_heads {n_heads}"
        self.n_heads = n_heads
        self.fused = False  # export flavour switch (same numbers in PyTorch); see fused_attention
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)

    def project_key_value(self, key_value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k(key_value), self.v(key_value)  # (N, Lk, D) each

    def attend(self, query: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # query (N, Lq, D) reads k, v from project_key_value (or their heads, see `attention`)
        attend = FusedAttention.apply if self.fused else attention
        return self.o(attend(self.q(query), k, v, self.n_heads))  # (N, Lq, D)

    def forward(self, query: torch.Tensor, key_value: torch.Tensor) -> torch.Tensor:
        # query (N, Lq, D), key_value (N, Lk, D): N independent sequences, no mask (as upstream)
        return self.attend(query, *self.project_key_value(key_value))


def rows_as_sequences(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).flatten(0, 1)  # (B, N, T, D) -> (B*T, N, D)


def sequences_as_rows(x: torch.Tensor, batch: int) -> torch.Tensor:
    return x.unflatten(0, (batch, -1)).transpose(1, 2)  # (B*T, N, D) -> (B, N, T, D)


class Layer(nn.Module):
    """Attention across rows (every row reads the support rows), MLP, attention across features, MLP.

    Support rows never read query rows, so a layer applies to one set of rows at a time, given the
    support's keys and values at this layer (`support_key_value`); Tab2D runs it on both sides.
    """

    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(dim)
        self.attention1 = MultiheadAttention(dim, n_heads)
        self.layer_norm2 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, dim * 4)
        self.linear2 = nn.Linear(dim * 4, dim)
        self.layer_norm3 = nn.LayerNorm(dim)
        self.attention2 = MultiheadAttention(dim, n_heads)
        self.layer_norm4 = nn.LayerNorm(dim)
        self.linear3 = nn.Linear(dim, dim * 4)
        self.linear4 = nn.Linear(dim * 4, dim)

    def columns(self, x: torch.Tensor) -> torch.Tensor:
        # x (B, N, T, D) -> (B*T, N, D): per token column, the normalized rows as one sequence
        return rows_as_sequences(self.layer_norm1(x))

    def support_key_value(self, support: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The support's columns (B*T, S, D) and what every row reads from them: keys, values (B*T, S, D)."""
        columns = self.columns(support)
        return (columns, *self.attention1.project_key_value(columns))

    def row_attention(
        self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, columns: torch.Tensor | None = None
    ) -> torch.Tensor:
        # x (B, N, T, D) reads the support rows' k, v at this layer; `columns` is self.columns(x) if known
        if columns is None:
            columns = self.columns(x)
        return x + sequences_as_rows(self.attention1.attend(columns, k, v), x.shape[0])  # (B, N, T, D)

    def feature_block(self, x: torch.Tensor) -> torch.Tensor:
        # x (B, N, T, D) after row attention: MLP, attention across the T tokens of a row, MLP
        x = x + self.linear2(F.gelu(self.linear1(self.layer_norm2(x))))
        tokens = self.layer_norm3(x).flatten(0, 1)  # (B*N, T, D)
        x = x + self.attention2(tokens, tokens).view_as(x)
        return x + self.linear4(F.gelu(self.linear3(self.layer_norm4(x))))

    def forward(
        self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, columns: torch.Tensor | None = None
    ) -> torch.Tensor:
        # x (B, N, T, D), support or query rows; k, v from support_key_value (or their heads)
        return self.feature_block(self.row_attention(x, k, v, columns))


KeyValues = Iterable[tuple[torch.Tensor, torch.Tensor]]  # per layer: the support's keys and values


class Tab2D(nn.Module):
    """Mitra. forward(x_support, y_support, x_query, padding_obs_support) -> (B, Q, C) or (B, Q)."""

    def __init__(self, config: MitraConfig) -> None:
        super().__init__()
        self.config = config
        self.x_quantile = Tab2DQuantileEmbeddingX()
        self.x_embedding = Tab2DEmbeddingX(config.dim)
        self.y_embedding: _Tab2DEmbeddingY
        if config.label_is_class:
            self.y_embedding = Tab2DEmbeddingYClasses(config.dim, config.dim_output)
        else:
            self.y_embedding = Tab2DEmbeddingYRegression(config.dim)
        self.layers = nn.ModuleList(Layer(config.dim, config.n_heads) for _ in range(config.n_layers))
        self.final_layer_norm = nn.LayerNorm(config.dim)
        self.final_layer = nn.Linear(config.dim, config.dim_output)

    def forward(
        self,
        x_support: torch.Tensor,  # (B, S, F) float32
        y_support: torch.Tensor,  # (B, S) int64 class ids, or float32 targets
        x_query: torch.Tensor,  # (B, Q, F) float32
        padding_obs_support: torch.Tensor,  # (B, S) bool, True = padded row
    ) -> torch.Tensor:
        support, stats = self.embed_support(x_support, y_support, padding_obs_support)  # (B, S, T, D)
        query = self.embed_query(stats, x_query)  # (B, Q, T, D)
        return self.predict_query_layers(query, self.encode_support_layers(support))

    def embed_support(
        self, x_support: torch.Tensor, y_support: torch.Tensor, padding_obs_support: torch.Tensor
    ) -> tuple[torch.Tensor, SupportStatistics]:
        """The support rows' tokens (B, S, T, D), label token first, and the statistics embed_query needs."""
        x_rank, stats = self.x_quantile.embed_support(x_support, padding_obs_support)  # (B, S, F)
        y_tokens = self.y_embedding.embed_support(y_support, padding_obs_support)  # (B, S, 1, D)
        return torch.cat([y_tokens, self.x_embedding(x_rank)], dim=2), stats  # (B, S, T, D)

    def embed_query(self, stats: SupportStatistics, x_query: torch.Tensor) -> torch.Tensor:
        """The query rows' tokens (B, Q, T, D), label token (the mask) first."""
        x_rank = self.x_quantile.embed_query(stats, x_query)  # (B, Q, F)
        y_tokens = self.y_embedding.embed_query(x_query.shape[0], x_query.shape[1])  # (B, Q, 1, D)
        return torch.cat([y_tokens, self.x_embedding(x_rank)], dim=2)  # (B, Q, T, D)

    def encode_support_layers(self, support: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's support keys and values, (B*T, S, D) each, from the support tokens (B, S, T, D).

        This is the whole support side: support rows never read query rows. It is a generator so that
        the full forward holds one layer's keys and values at a time. The last layer's support update
        feeds no output and is skipped.
        """
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            columns, k, v = layer.support_key_value(support)
            yield k, v
            if index < last:
                support = layer(support, k, v, columns)

    def predict_query_layers(self, query: torch.Tensor, key_values: KeyValues) -> torch.Tensor:
        """The output for the query tokens (B, Q, T, D), reading each layer's support keys and values.

        Returns:
            (B, Q, C) for classification, (B, Q) for single-output regression.
        """
        # One extra copy of the last query row, dropped at the end: ONNX Runtime multiplies a one-row
        # attention (Lq = 1) with a different kernel than several rows, which changes a row's output in
        # its last bits when it is sent alone, and int8's rounding of activations turns those bits into
        # 1e-3. From two rows on, each output row is computed the same whatever the row count, so a row
        # predicted alone or in any batch gets the same numbers (verify.batch_dependence checks it).
        query = torch.cat([query, query[:, -1:]], dim=1)  # (B, Q + 1, T, D)
        for layer, (k, v) in zip(self.layers, key_values, strict=True):
            query = layer(query, k, v)
        out = self.final_layer(self.final_layer_norm(query[:, :-1, 0]))  # (B, Q, C), label token only
        if self.config.label_is_class:
            return out
        return out[..., 0]  # (B, Q): single-output regression


_M = TypeVar("_M", bound=nn.Module)


@contextlib.contextmanager
def fused_attention(model: _M, enabled: bool = True) -> Iterator[_M]:
    """Within the block, every attention in `model` (a Tab2D, or a module holding one) exports as
    `com.microsoft.MultiHeadAttention` (PyTorch outputs are unchanged); the previous setting is
    restored afterwards."""
    modules = [m for m in model.modules() if isinstance(m, MultiheadAttention)]
    previous = [m.fused for m in modules]
    for module in modules:
        module.fused = enabled
    try:
        yield model
    finally:
        for module, value in zip(modules, previous):
            module.fused = value


def expected_parameter_shapes(config: MitraConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape an upstream checkpoint of this config holds."""
    return {name: tuple(p.shape) for name, p in _shape_only_model(config).state_dict().items()}


def _shape_only_model(config: MitraConfig) -> Tab2D:
    with torch.device("meta"):
        return Tab2D(config)


def count_parameters(config: MitraConfig) -> int:
    return sum(math.prod(shape) for shape in expected_parameter_shapes(config).values())
