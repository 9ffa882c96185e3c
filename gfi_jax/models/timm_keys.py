"""timm's state_dict key names -> the reference names our rule lists (`torch_keys`) use.

Checked against timm 1.0 (`timm.create_model(name).state_dict()`):
  resnet18, resnet50        timm's names are torchvision's (conv1, bn1, layer1.0.conv1, ..., fc)
  vgg16, vgg19              same `features.*`; the classifier is timm's ConvMlp: `pre_logits.fc1`
                            (a 7×7 conv, weight (4096, 512, 7, 7)), `pre_logits.fc2` (a 1×1 conv)
                            and `head.fc`, for torchvision's `classifier.0`, `.3` and `.6`
  efficientnet_lite0..2     timm's `tf_efficientnet_lite*` (TF "SAME" padding and BN eps 1e-3,
                            as our port): `conv_stem`, `bn1`, `blocks.<stage>.<i>.*`,
                            `conv_head`, `bn2`, `classifier`, for the efficientnet-lite-pytorch
                            reference's `_conv_stem`, `_bn0`, `_blocks.<n>.*`, `_conv_head`,
                            `_bn1`, `_fc`
  convnext_tiny             `stem.0`/`.1`, `stages.<s>.downsample.0`/`.1`, `stages.<s>.blocks.<b>.`
                            `conv_dw`, `norm`, `mlp.fc1`, `mlp.fc2`, `gamma` (shape (C,)), then
                            `head.norm`, `head.fc`, for torchvision's `features.0.0`/`.1`,
                            `features.<2s>.0`/`.1`, `features.<2s+1>.<b>.block.0`/`.2`/`.3`/`.5`,
                            `layer_scale` (C, 1, 1), `classifier.0`/`.2` (timm 1.0.31; LayerNorm eps
                            1e-6 throughout, as torchvision's)
  vit_b_16                  timm's `vit_base_patch16_224`: `cls_token`, `pos_embed`,
                            `patch_embed.proj`, `blocks.<i>.norm1`, `.attn.qkv` (fused q/k/v, as
                            torchvision's `in_proj_*`), `.attn.proj`, `.norm2`, `.mlp.fc1`/`.fc2`,
                            `norm`, `head`, for torchvision's `class_token`, `encoder.pos_embedding`,
                            `conv_proj`, `encoder.layers.encoder_layer_<i>.ln_1`, ... (timm 1.0.31)
timm's plain `efficientnet_lite*` (PyTorch padding, BN eps 1e-5) has the same names but computes
differently, and nothing in its weights tells the two apart: `caveat` says so at conversion.
timm has no AlexNet. A conv-style Linear (VGG's pre_logits) is flattened back to (out, C·kh·kw),
which is torchvision's C·H·W order, so the rule list's layout change then applies unchanged.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from gfi_jax.models import efficientnet_lite

_VGG_HEAD = {"classifier.0.": "pre_logits.fc1.", "classifier.3.": "pre_logits.fc2.",
             "classifier.6.": "head.fc."}
_LITE_TOP = {"_conv_stem.": "conv_stem.", "_bn0.": "bn1.", "_conv_head.": "conv_head.",
             "_bn1.": "bn2.", "_fc.": "classifier."}
# Inside a block: timm's InvertedResidual (expand ratio 6) and DepthwiseSeparableConv (ratio 1)
# number their BatchNorms from 1 in the order of their convs.
_LITE_EXPAND = {"_expand_conv.": "conv_pw.", "_bn0.": "bn1.", "_depthwise_conv.": "conv_dw.",
                "_bn1.": "bn2.", "_project_conv.": "conv_pwl.", "_bn2.": "bn3."}
_LITE_DS = {"_depthwise_conv.": "conv_dw.", "_bn1.": "bn1.", "_project_conv.": "conv_pw.",
            "_bn2.": "bn2."}


def _replace_prefix(key: str, table: dict[str, str]) -> str:
    return next((new + key[len(old):] for old, new in table.items() if key.startswith(old)), key)


def _lite_namer(variant: str) -> Callable[[str], str]:
    """`_blocks.<n>.<part>` -> `blocks.<stage>.<i>.<part'>`: timm nests blocks per stage."""
    where = [(s, i) for s, (repeats, *_rest) in enumerate(efficientnet_lite.STAGES[variant])
             for i in range(repeats)]
    expands = [b[2] != 1 for b in efficientnet_lite.blocks(variant)]

    def name(key: str) -> str:
        if not key.startswith("_blocks."):
            return _replace_prefix(key, _LITE_TOP)
        n, part = key[len("_blocks."):].split(".", 1)
        s, i = where[int(n)]
        return f"blocks.{s}.{i}." + _replace_prefix(part, _LITE_EXPAND if expands[int(n)] else _LITE_DS)
    return name


_CONVNEXT_BLOCK = {"block.0.": "conv_dw.", "block.2.": "norm.", "block.3.": "mlp.fc1.",
                   "block.5.": "mlp.fc2.", "layer_scale": "gamma"}
_CONVNEXT_TOP = {"features.0.0.": "stem.0.", "features.0.1.": "stem.1.",
                 "classifier.0.": "head.norm.", "classifier.2.": "head.fc."}


def _convnext_name(key: str) -> str:
    """`features.<2s>.<0|1>.*` (a downsample) / `features.<2s+1>.<b>.*` (a block) -> timm's
    `stages.<s>.downsample.*` / `stages.<s>.blocks.<b>.*`; stem and head by prefix."""
    top = _replace_prefix(key, _CONVNEXT_TOP)
    if top != key:
        return top
    _, f, rest = key.split(".", 2)
    s, block = divmod(int(f), 2)
    if not block:
        return f"stages.{s}.downsample.{rest}"
    b, part = rest.split(".", 1)
    return f"stages.{s}.blocks.{b}." + _replace_prefix(part, _CONVNEXT_BLOCK)


_VIT_TOP = {"class_token": "cls_token", "encoder.pos_embedding": "pos_embed",
            "conv_proj.": "patch_embed.proj.", "encoder.ln.": "norm.", "heads.head.": "head."}
_VIT_BLOCK = {"ln_1.": "norm1.", "self_attention.in_proj_": "attn.qkv.",
              "self_attention.out_proj.": "attn.proj.", "ln_2.": "norm2.", "mlp.0.": "mlp.fc1.",
              "mlp.3.": "mlp.fc2."}


def _vit_name(key: str) -> str:
    """`encoder.layers.encoder_layer_<i>.*` -> `blocks.<i>.*`; the rest by prefix."""
    if not key.startswith("encoder.layers."):
        return _replace_prefix(key, _VIT_TOP)
    layer, part = key[len("encoder.layers."):].split(".", 1)
    return f"blocks.{layer.removeprefix('encoder_layer_')}." + _replace_prefix(part, _VIT_BLOCK)


def _namer(arch_name: str) -> Callable[[str], str] | None:
    """Reference key -> timm key, for the architectures whose timm names were checked."""
    if arch_name in ("resnet18", "resnet50"):
        return lambda k: k
    if arch_name in ("vgg16", "vgg19"):
        return lambda k: _replace_prefix(k, _VGG_HEAD)
    if arch_name in efficientnet_lite.STAGES:
        return _lite_namer(arch_name)
    if arch_name.startswith("convnext_"):
        return _convnext_name
    if arch_name.startswith("vit_"):
        return _vit_name
    return None


def timm_names(arch) -> dict[str, str] | None:
    """timm key -> reference key for every param of `arch` (an Arch record), or None when timm
    has no such model (AlexNet)."""
    if (namer := _namer(arch.name)) is None:
        return None
    return {namer(t): t for t, _, _ in arch.torch_keys()}


def from_timm(arch, sd: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    """`sd` under the reference names when its keys are exactly timm's for `arch` (BatchNorm
    counters aside), else None: a partial match is left to the caller's key-by-key report."""
    table = timm_names(arch)
    keys = {k for k in sd if not k.endswith("num_batches_tracked")}
    if table is None or keys != table.keys():
        return None
    kinds = {t: kind for t, _, kind in arch.torch_keys()}
    out = {}
    for k in keys:
        a, t = sd[k], table[k]
        if kinds[t] in ("linear", "fc_chw") and np.ndim(a) == 4:  # timm's conv-style Linear
            a = np.reshape(a, (np.shape(a)[0], -1))
        if t.endswith(".layer_scale"):  # timm's gamma is (C,), torchvision's (C, 1, 1)
            a = np.reshape(a, (-1, 1, 1))
        out[t] = a
    return out


def caveat(arch) -> str | None:
    """What a timm-named checkpoint for `arch` cannot tell us, said at conversion."""
    if arch.name not in efficientnet_lite.STAGES:
        return None
    n = arch.name.removeprefix("efficientnet_lite")
    return (f"timm key names read as timm's tf_efficientnet_lite{n} (TF 'SAME' padding, BN eps "
            f"1e-3, as {arch.name}); a checkpoint of timm's efficientnet_lite{n} (PyTorch padding, "
            "BN eps 1e-5) has the same names but will not reproduce its logits here")
