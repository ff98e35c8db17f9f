"""Checkpoint folders in upstream's layout (`config.json` + `model.safetensors`): strict loading and
synthetic generation.

A synthetic snapshot has the real architecture and random weights. It says so in `config.json`
(`mitra_build_synthetic`) and in the safetensors metadata, and `Snapshot.synthetic` carries that
flag to every later stage, so nothing downstream can mistake it for the published weights.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mitra_model.errors import SnapshotError
from mitra_model.fileutil import atomic_directory, sha256_file
from mitra_model.model.architecture import MitraConfig, Task, limit_problem
from mitra_model.model.kinds import SizeConfig, TaskName

if TYPE_CHECKING:  # torch is imported where weights are loaded: reading a folder's digests stays light
    import torch

    from mitra_model.model.tab2d import Tab2D

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
SYNTHETIC_KEY = "mitra_build_synthetic"
# Output width of the official checkpoints: 10 classes (classifier), 1 value (regressor).
OFFICIAL_DIM_OUTPUT: dict[TaskName, int] = {"classification": 10, "regression": 1}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_CONFIG_INT_KEYS = ("dim", "dim_output", "n_layers", "n_heads")
MAX_CONFIG_BYTES = 64 * 1024


@dataclass(frozen=True)
class FileDigest:
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Snapshot:
    """A validated checkpoint folder."""

    path: Path
    config: MitraConfig
    synthetic: bool
    files: tuple[FileDigest, ...]

    def digest(self, name: str) -> FileDigest:
        return next(f for f in self.files if f.path == name)

    def onnx_metadata(self) -> dict[str, str]:
        """What an exported file records about its weights (content only, so exports stay reproducible)."""
        return {
            "mitra.weights_sha256": self.digest(WEIGHTS_FILE).sha256,
            "mitra.synthetic": "true" if self.synthetic else "false",
        }


def read_model_config(folder: Path) -> tuple[MitraConfig, bool]:
    """Parse and validate `config.json`; return the config and whether the snapshot is synthetic."""
    path = Path(folder) / CONFIG_FILE
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise SnapshotError(f"{path} is {path.stat().st_size} bytes; a Mitra config.json is a few hundred "
                                f"(refusing anything over {MAX_CONFIG_BYTES})")
        raw: Any = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SnapshotError(f"{path} is missing: a Mitra snapshot folder needs {CONFIG_FILE} and {WEIGHTS_FILE}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise SnapshotError(f"{path} is not valid JSON: {type(exc).__name__}: {str(exc)[:200]}") from None
    except OSError as exc:  # a folder named config.json, no permission, ...
        raise SnapshotError(f"{path} cannot be read: {exc.strerror or exc}") from None
    if not isinstance(raw, dict):
        raise SnapshotError(f"{path} must hold a JSON object with {', '.join(_CONFIG_INT_KEYS)}, task; found {type(raw).__name__}")
    missing = [key for key in (*_CONFIG_INT_KEYS, "task") if key not in raw]
    if missing:
        raise SnapshotError(f"{path} lacks required field(s) {', '.join(missing)} (upstream Tab2D.save_pretrained writes them)")
    for key in _CONFIG_INT_KEYS:
        value = raw[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SnapshotError(f"{path}: field `{key}` must be a positive integer, found {_short(value)}")
        problem = limit_problem(key, value)
        if problem:
            raise SnapshotError(f"{path}: field {problem} (mitra-build refuses it before building anything; "
                                "the official Mitra checkpoints have dim 512, 12 layers, 4 heads)")
    task = raw["task"]
    if task not in (Task.CLASSIFICATION.value, Task.REGRESSION.value):
        raise SnapshotError(f"{path}: field `task` must be \"CLASSIFICATION\" or \"REGRESSION\", found {task!r}")
    if raw["dim"] % raw["n_heads"]:
        raise SnapshotError(f"{path}: field `dim` ({raw['dim']}) must be divisible by `n_heads` ({raw['n_heads']})")
    config = MitraConfig(
        dim=raw["dim"], dim_output=raw["dim_output"], n_layers=raw["n_layers"], n_heads=raw["n_heads"], task=Task(task)
    )
    return config, bool(raw.get(SYNTHETIC_KEY))


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _refuse_pickles(folder: Path) -> None:
    if folder.is_file() and folder.suffix in _PICKLE_SUFFIXES:
        raise SnapshotError(
            f"{folder} is a pickle checkpoint; mitra-build never unpickles (it can run arbitrary code). "
            f"Pass a folder with {CONFIG_FILE} and {WEIGHTS_FILE} (upstream Tab2D.save_pretrained writes one)."
        )
    if not folder.is_dir():
        raise SnapshotError(f"snapshot folder {folder} does not exist or is not a folder")
    weights = folder / WEIGHTS_FILE
    if weights.exists() and not weights.is_file():
        raise SnapshotError(f"{weights} is not a file (a folder?): a Mitra snapshot needs {WEIGHTS_FILE} as a file")
    if not weights.exists():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise SnapshotError(
                f"{folder} has only pickle weights ({', '.join(pickles)}) and no {WEIGHTS_FILE}; mitra-build never "
                "unpickles. Convert the checkpoint to safetensors (upstream Tab2D.save_pretrained writes one)."
            )
        raise SnapshotError(f"{folder / WEIGHTS_FILE} is missing: a Mitra snapshot folder needs {CONFIG_FILE} and {WEIGHTS_FILE}")


def load_state_dict(folder: Path, config: MitraConfig) -> dict[str, torch.Tensor]:
    """Load `model.safetensors` and check every tensor's name, shape, dtype and finiteness."""
    # deferred: reading a snapshot's config.json needs no torch (pinning a revision imports this module)
    import torch
    from safetensors import SafetensorError, safe_open

    from mitra_model.model.tab2d import expected_parameter_shapes

    path = Path(folder) / WEIGHTS_FILE
    expected = expected_parameter_shapes(config)
    try:
        with safe_open(str(path), framework="pt") as handle:
            names = set(handle.keys())
            missing = sorted(set(expected) - names)
            unexpected = sorted(names - set(expected))
            if missing or unexpected:
                raise SnapshotError(
                    f"{path} does not match config.json (dim={config.dim}, n_layers={config.n_layers}, "
                    f"dim_output={config.dim_output}, task={config.task.value}): "
                    + "; ".join(
                        part
                        for part in (
                            f"missing tensors {_first(missing)}" if missing else "",
                            f"unexpected tensors {_first(unexpected)}" if unexpected else "",
                        )
                        if part
                    )
                )
            state: dict[str, torch.Tensor] = {}
            for name in sorted(names):
                tensor = handle.get_tensor(name)
                if tuple(tensor.shape) != expected[name]:
                    raise SnapshotError(f"{path}: tensor `{name}` has shape {tuple(tensor.shape)}, expected {expected[name]}")
                if tensor.dtype != torch.float32:
                    raise SnapshotError(f"{path}: tensor `{name}` has dtype {tensor.dtype}, expected torch.float32")
                if not torch.isfinite(tensor).all():
                    bad = int((~torch.isfinite(tensor)).sum())
                    raise SnapshotError(f"{path}: tensor `{name}` has {bad} non-finite value(s) (NaN or inf)")
                state[name] = tensor
    except SafetensorError as exc:
        raise SnapshotError(f"{path} is not a readable safetensors file: {exc}") from None
    return state


def _first(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def read_snapshot(folder: Path) -> Snapshot:
    """Validate a checkpoint folder's files (without building the model) and digest them."""
    folder = Path(folder)
    _refuse_pickles(folder)
    config, synthetic = read_model_config(folder)
    files = tuple(
        FileDigest(name, (folder / name).stat().st_size, sha256_file(folder / name)) for name in (CONFIG_FILE, WEIGHTS_FILE)
    )
    return Snapshot(path=folder, config=config, synthetic=synthetic, files=files)


def load_model(folder: Path) -> tuple[Tab2D, Snapshot]:
    """Read, validate and load a checkpoint folder into an eval-mode `Tab2D`.

    Raises:
        SnapshotError: missing/pickle/malformed files, a bad config field, or a tensor whose name,
            shape, dtype or values are wrong (the message names it).
    """
    # deferred: reading a snapshot's config.json needs no torch (pinning a revision imports this module)
    from mitra_model.model.tab2d import Tab2D

    snapshot = read_snapshot(folder)
    state = load_state_dict(snapshot.path, snapshot.config)
    model = Tab2D(snapshot.config)
    model.load_state_dict(state, strict=True)
    return model.eval(), snapshot


def random_model(config: MitraConfig, seed: int) -> Tab2D:
    """A Tab2D with every parameter random: PyTorch's default init, upstream's `init_weights` for the
    embeddings, and jittered LayerNorms (so a miswired norm cannot hide behind ones and zeros)."""
    # deferred: reading a snapshot's config.json needs no torch (pinning a revision imports this module)
    import torch

    from mitra_model.model.tab2d import Tab2D

    generator = torch.Generator().manual_seed(seed)
    model = Tab2D(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith(("x_embedding.", "y_embedding.")):
                param.copy_(torch.randn(param.shape, generator=generator))
            elif "layer_norm" in name:
                base = 1.0 if name.endswith("weight") else 0.0
                param.copy_(base + 0.1 * torch.randn(param.shape, generator=generator))
            else:
                fan_in = param.shape[-1] if param.dim() > 1 else param.shape[0]
                bound = 1 / math.sqrt(fan_in)
                param.copy_((torch.rand(param.shape, generator=generator) * 2 - 1) * bound)
    return model.eval()


def write_synthetic_snapshot(output: Path, *, task: TaskName, size_name: str, size: SizeConfig, seed: int) -> Snapshot:
    """Write a synthetic checkpoint folder (real architecture, random weights) atomically.

    Args:
        output: folder to create (replaced whole if it exists).
        task: "classification" (10 logits) or "regression" (1 value), like the official repos.
        size_name: name of the architecture preset (recorded in the marker).
        size: its dim / n_layers / n_heads.
        seed: makes the weights reproducible.
    """
    config = MitraConfig(
        dim=size.dim,
        dim_output=OFFICIAL_DIM_OUTPUT[task],
        n_layers=size.n_layers,
        n_heads=size.n_heads,
        task=Task(task.upper()),
    )
    # deferred: reading a snapshot's config.json needs no torch (pinning a revision imports this module)
    from safetensors.torch import save_file

    model = random_model(config, seed)
    marker = {"size": size_name, "seed": seed, "note": "random weights generated by mitra-build; NOT the published Mitra weights"}
    config_json = {
        "dim": config.dim,
        "dim_output": config.dim_output,
        "n_layers": config.n_layers,
        "n_heads": config.n_heads,
        "task": config.task.value,
        SYNTHETIC_KEY: marker,
    }
    with atomic_directory(Path(output)) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
        # One metadata key only: safetensors writes a multi-key header in hash order, not reproducibly
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={SYNTHETIC_KEY: json.dumps(marker, sort_keys=True)})
    return read_snapshot(Path(output))
