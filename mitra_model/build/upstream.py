"""Upstream AutoGluon Mitra (`Tab2D` of autogluon.tabular 1.6.3): the model every build is checked against.

`autogluon.tabular.models.mitra._internal` only uses relative imports, so the `mitra` folder is
registered as a bare package of its own and AutoGluon's package `__init__`s (which need AutoGluon's
whole dependency tree) never run. Install it with

    pip install --no-deps autogluon.tabular==1.6.3 einops einx

(it also needs torch, safetensors and huggingface_hub, which the build has anyway).

Upstream on CPU ignores `padding_features` and `padding_obs_query` and lets padded support rows take
part in attention, as our rewrite does; its forward writes into `x_support` in place, so
`run_upstream` passes copies.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from importlib import metadata
from pathlib import Path

import torch
import torch.nn as nn

from mitra_model.errors import UpstreamMissingError
from mitra_model.model.snapshot import load_state_dict, read_model_config
from mitra_model.model.tab2d import MitraConfig

UPSTREAM_DISTRIBUTION = "autogluon.tabular"
UPSTREAM_PIN = "1.6.3"
INSTALL_COMMAND = f"pip install --no-deps {UPSTREAM_DISTRIBUTION}=={UPSTREAM_PIN} einops einx"
_ALIAS = "_upstream_mitra"  # the bare package name `mitra/` is registered under


def _mitra_dir() -> Path:
    spec = importlib.util.find_spec("autogluon")
    if spec is None or not spec.submodule_search_locations:
        raise UpstreamMissingError(f"upstream AutoGluon Mitra is not installed (the reference every build is "
                                   f"checked against): {INSTALL_COMMAND}")
    for root in spec.submodule_search_locations:
        candidate = Path(root) / "tabular" / "models" / "mitra"
        if (candidate / "_internal" / "models" / "tab2d.py").is_file():
            return candidate
    raise UpstreamMissingError(
        f"autogluon is installed but has no tabular/models/mitra/_internal/models/tab2d.py "
        f"(found {upstream_version()}): {INSTALL_COMMAND}"
    )


def upstream_tab2d_module() -> types.ModuleType:
    """Upstream's `tab2d` module, imported without AutoGluon's package `__init__`s.

    Raises:
        UpstreamMissingError: autogluon.tabular, einops or einx is missing (the message has the pip command).
    """
    if _ALIAS not in sys.modules:
        package = types.ModuleType(_ALIAS)
        package.__path__ = [str(_mitra_dir())]
        sys.modules[_ALIAS] = package
    try:
        return importlib.import_module(f"{_ALIAS}._internal.models.tab2d")
    except ModuleNotFoundError as exc:
        raise UpstreamMissingError(f"upstream AutoGluon Mitra needs {exc.name!r}, which is not installed: "
                                   f"{INSTALL_COMMAND}") from exc


def upstream_version() -> str:
    """`autogluon.tabular==<version>` of the installed upstream, or "autogluon.tabular missing"."""
    try:
        return f"{UPSTREAM_DISTRIBUTION}=={metadata.version(UPSTREAM_DISTRIBUTION)}"
    except metadata.PackageNotFoundError:
        return f"{UPSTREAM_DISTRIBUTION} missing"


def upstream_from_state(config: MitraConfig, state: dict[str, torch.Tensor]) -> nn.Module:
    """Upstream `Tab2D` on CPU, eval mode, with `state` loaded strictly (our names are upstream's).

    Raises:
        UpstreamMissingError: upstream is not installed.
        RuntimeError: `state` does not fit upstream's parameters (torch's strict load names them).
    """
    tab2d = upstream_tab2d_module()
    model = tab2d.Tab2D(
        dim=config.dim, dim_output=config.dim_output, n_layers=config.n_layers, n_heads=config.n_heads,
        task=config.task.value, use_pretrained_weights=False, path_to_weights="", device="cpu",
    )
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_upstream(snapshot_dir: Path) -> nn.Module:
    """Upstream `Tab2D` with a snapshot's safetensors weights (validated by snapshot.load_state_dict).

    Raises:
        SnapshotError: the snapshot's config.json or model.safetensors is bad.
        UpstreamMissingError: upstream is not installed.
    """
    config, _ = read_model_config(Path(snapshot_dir))
    return upstream_from_state(config, load_state_dict(Path(snapshot_dir), config))


def run_upstream(
    model: nn.Module,
    x_support: torch.Tensor,
    y_support: torch.Tensor,
    x_query: torch.Tensor,
    padding_obs_support: torch.Tensor,
) -> torch.Tensor:
    """Upstream's forward on copies of the contract inputs (it writes into x_support in place).

    Returns:
        (B, Q, C) logits (classifier) or (B, Q) values (regressor), as Tab2D.forward.
    """
    batch, n_features = x_support.shape[0], x_support.shape[2]
    with torch.no_grad():
        return model(
            x_support.clone(), y_support.clone(), x_query.clone(),
            padding_features=torch.zeros((batch, n_features), dtype=torch.bool),  # ignored on CPU
            padding_obs_support=padding_obs_support.clone(),
            padding_obs_query__=torch.zeros(x_query.shape[:2], dtype=torch.bool),  # ignored on CPU
        )
