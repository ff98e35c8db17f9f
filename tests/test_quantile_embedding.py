"""The exportable quantile pieces against the torch ops upstream uses."""

from __future__ import annotations

import pytest
import torch

from mitra_model.model.tab2d import N_QUANTILES, bucketize_strict, support_quantiles


def _reference_bucketize(values: torch.Tensor, boundaries: torch.Tensor) -> torch.Tensor:
    return torch.vmap(torch.bucketize, in_dims=(0, 0))(values, boundaries)  # what upstream calls


@pytest.mark.parametrize("kind", ["ties", "random", "values-equal-boundaries", "outside-range"])
def test_bucketize_strict_equals_torch_bucketize(kind: str) -> None:
    g = torch.Generator().manual_seed(0)
    rows = 12
    if kind == "ties":
        boundaries = torch.sort(torch.randint(0, 4, (rows, N_QUANTILES), generator=g).float()).values
        values = torch.randint(-1, 5, (rows, 300), generator=g).float()
    elif kind == "random":
        boundaries = torch.sort(torch.randn(rows, N_QUANTILES, generator=g)).values
        values = torch.randn(rows, 300, generator=g)
    elif kind == "values-equal-boundaries":
        boundaries = torch.sort(torch.randn(rows, N_QUANTILES, generator=g)).values
        values = boundaries[:, torch.randint(0, N_QUANTILES, (300,), generator=g)]
    else:
        boundaries = torch.sort(torch.randn(rows, N_QUANTILES, generator=g)).values
        values = torch.cat([torch.full((rows, 5), -1e9), torch.full((rows, 5), 1e9), torch.full((rows, 5), 9999.0)], 1)
    expected = _reference_bucketize(values, boundaries)
    assert torch.equal(bucketize_strict(values, boundaries, N_QUANTILES), expected)


def test_bucketize_counts_only_boundaries_strictly_below() -> None:
    boundaries = torch.tensor([[1.0, 2.0, 2.0, 2.0, 3.0]])
    values = torch.tensor([[0.5, 1.0, 2.0, 2.5, 3.0, 4.0]])
    assert bucketize_strict(values, boundaries, 5).tolist() == [[0, 0, 1, 4, 4, 5]]


@pytest.mark.parametrize("n_support", [1, 2, 3, 7, 100, 1001])
def test_support_quantiles_equal_torch_quantile(n_support: int) -> None:
    g = torch.Generator().manual_seed(n_support)
    x = torch.randn(2, n_support, 3, generator=g)
    x[:, :, 1] = torch.randint(0, 3, (2, n_support), generator=g).float()
    padding = torch.zeros(2, n_support, dtype=torch.bool)
    if n_support > 2:
        padding[1, -(n_support // 3) :] = True
    levels = torch.arange(1, 1000, dtype=torch.float) / 1000
    padded = x.clone()
    padded[padding] = 9999
    expected = torch.quantile(padded, q=levels, dim=1).permute(1, 2, 0)  # (B, F, 999)
    torch.testing.assert_close(support_quantiles(x, padding), expected, rtol=0, atol=1e-6 * float(padded.abs().max()))
