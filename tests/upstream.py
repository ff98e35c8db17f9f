"""Upstream AutoGluon Mitra as a test oracle, imported without AutoGluon's heavy package __init__s.

`autogluon.tabular.models.mitra._internal` only uses relative imports, so the `mitra` folder is
registered as a bare package of its own (its `__init__.py`, which pulls in AutoGluon, is skipped).
Installed by .ci/run with `pip install --no-deps autogluon.tabular==1.6.3 einops einx`.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import torch

_ALIAS = "_upstream_mitra"


def _mitra_dir() -> Path:
    spec = importlib.util.find_spec("autogluon")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("upstream oracle missing: pip install --no-deps autogluon.tabular==1.6.3 einops einx")
    for root in spec.submodule_search_locations:
        candidate = Path(root) / "tabular" / "models" / "mitra"
        if (candidate / "_internal" / "models" / "tab2d.py").is_file():
            return candidate
    raise ImportError("autogluon is installed but has no tabular/models/mitra/_internal (need autogluon.tabular==1.6.3)")


def upstream_tab2d_module() -> types.ModuleType:
    if _ALIAS not in sys.modules:
        package = types.ModuleType(_ALIAS)
        package.__path__ = [str(_mitra_dir())]
        sys.modules[_ALIAS] = package
    return importlib.import_module(f"{_ALIAS}._internal.models.tab2d")


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


def run_upstream(model: torch.nn.Module, x_support, y_support, x_query, padding_obs_support) -> torch.Tensor:
    """Upstream's forward on copies (it writes into x_support in place)."""
    batch, n_features = x_support.shape[0], x_support.shape[2]
    with torch.no_grad():
        return model(
            x_support.clone(), y_support.clone(), x_query.clone(),
            padding_features=torch.zeros((batch, n_features), dtype=torch.bool),
            padding_obs_support=padding_obs_support.clone(),
            padding_obs_query__=torch.zeros(x_query.shape[:2], dtype=torch.bool),
        )
