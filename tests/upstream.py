"""Upstream AutoGluon Mitra as a test oracle: mitra_model.upstream (the library's loader), plus
`build_upstream`, an upstream Tab2D with random weights for tests that need no snapshot."""

from __future__ import annotations

import torch

from mitra_model.build.upstream import load_upstream, run_upstream, upstream_tab2d_module, upstream_version

__all__ = ["build_upstream", "load_upstream", "run_upstream", "upstream_tab2d_module", "upstream_version"]


def build_upstream(dim: int, dim_output: int, n_layers: int, n_heads: int, task: str, seed: int) -> torch.nn.Module:
    """An upstream Tab2D on CPU with every parameter random (LayerNorms included, so miswiring shows)."""
    tab2d = upstream_tab2d_module()
    torch.manual_seed(seed)
    model = tab2d.Tab2D(
        dim=dim, dim_output=dim_output, n_layers=n_layers, n_heads=n_heads, task=task,
        use_pretrained_weights=False, path_to_weights="", device="cpu",
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()
