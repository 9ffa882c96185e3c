"""PyTorch state_dict keys -> Flax param keys: the rule vocabulary the model files use.

Each model file says which key of its PyTorch reference's state_dict fills which of its
params (`torch_keys(variant)`); the registry record points to that list. A rule is
`(torch key, flax key, kind)`; flax keys are the "/"-joined nnx state paths. Kinds say how
the array changes layout:
  conv    OIHW -> HWIO (depthwise (C,1,k,k) -> (k,k,1,C) by the same transpose)
  linear  (out, in) -> (in, out)
  copy    unchanged (biases, BatchNorm scale/bias/statistics)
  fc_chw  a Linear after PyTorch's C·H·W flatten, re-ordered for our H·W·C flatten
"""
from __future__ import annotations

import numpy as np

Rule = tuple[str, str, str]


def conv(t: str, f: str, bias: bool = True) -> list[Rule]:
    return [(f"{t}.weight", f"{f}/kernel", "conv")] + ([(f"{t}.bias", f"{f}/bias", "copy")] if bias else [])


def linear(t: str, f: str, kind: str = "linear") -> list[Rule]:
    return [(f"{t}.weight", f"{f}/kernel", kind), (f"{t}.bias", f"{f}/bias", "copy")]


def bn(t: str, f: str) -> list[Rule]:
    return [(f"{t}.weight", f"{f}/scale", "copy"), (f"{t}.bias", f"{f}/bias", "copy"),
            (f"{t}.running_mean", f"{f}/mean", "copy"), (f"{t}.running_var", f"{f}/var", "copy")]


def classifier_key(rules: list[Rule]) -> str:
    """The torch key of the last Linear's weight: its first dimension counts the classes.
    (Every rule list ends with the classifier.)"""
    return next(t for t, _, kind in reversed(rules) if kind in ("linear", "fc_chw"))


def to_flax(kind: str, a: np.ndarray, chw: tuple[int, int, int] | None = None) -> np.ndarray:
    """One PyTorch array -> the Flax layout of `kind` (`chw`: the flattened map, for fc_chw)."""
    if kind == "conv":
        return a.transpose(2, 3, 1, 0)
    if kind == "linear":
        return a.T
    if kind == "fc_chw":
        c, h, w = chw
        return a.reshape(a.shape[0], c, h, w).transpose(2, 3, 1, 0).reshape(c * h * w, a.shape[0])
    return a


def torch_shape(kind: str, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The PyTorch shape that `to_flax(kind, ·)` turns into `flax_shape`."""
    if kind == "conv":
        h, w, i, o = flax_shape
        return (o, i, h, w)
    if kind in ("linear", "fc_chw"):
        return tuple(reversed(flax_shape))
    return tuple(flax_shape)
