"""The small types the model and the build share: what a task, a size, a kind of table and an input
shape are. Kept in a leaf module, so that model code never imports the build configuration."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mitra_model.model.architecture import LIMITS

TaskName = Literal["classification", "regression"]
SizeName = Literal["tiny", "full"]  # [sizes.<name>] of the configuration; `full` is the official Mitra's
DataKind = Literal["mixed", "continuous", "integer_ties", "large_magnitude", "constant"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Shape(_Strict):
    """One forward's dimensions: (batch, support rows, query rows, features), within LIMITS."""

    batch: int = Field(ge=1, le=LIMITS["batch"])
    n_support: int = Field(ge=1, le=LIMITS["n_support"])
    n_query: int = Field(ge=1, le=LIMITS["n_query"])
    n_features: int = Field(ge=1, le=LIMITS["n_features"])

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.batch, self.n_support, self.n_query, self.n_features)


class SizeConfig(_Strict):
    """An architecture's size: the official checkpoints are dim 512, 12 layers, 4 heads."""

    dim: int = Field(ge=8, le=LIMITS["dim"])
    n_layers: int = Field(ge=1, le=LIMITS["n_layers"])
    n_heads: int = Field(ge=1, le=LIMITS["n_heads"])

    @model_validator(mode="after")
    def _heads_divide_dim(self) -> SizeConfig:
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        return self
