"""Plain-PyTorch Guided Feature Inversion (Du et al., KDD 2018): the test oracle for gfi_jax.

Written only from the paper text (Sec. 3, Algorithms 1-2, Sec. 4.1.1) and from
/work/shared/paper/authors-code-behaviour.md (the table of how the released code differs).
Two presets: ``paper`` follows the text, ``reference`` follows the released code.
Import it as ``from gfi_jax.testing import oracle``; it needs torch (the test extra:
``pip install -e ".[test]"``), so nothing in the shipped package imports it.

Choices where the texts are silent or ambiguous (the JAX engine must mirror them):
  C1  Batch: one torch.optim.Adam over a (B, C1) omega; the backpropagated loss is the SUM of the
      per-image losses. Adam is elementwise and image b's loss depends only on omega[b], so each
      image follows exactly its own Adam trajectory (features() must not mix images: eval mode).
      torch's Adam: m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g^2;
      omega -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps), t counted from 1; eps=1e-8,
      betas=(0.9, 0.999), no weight decay, no amsgrad (== optax.adam's m_hat/(sqrt(v_hat)+eps)).
  C2  Mask normalization guards. paper: den = max - min; m = (m - min) / where(den > 0, den, 1)
      (a constant map becomes all zeros). reference: m = (m - min) / where(max != 0, max, 1).
      min/max are taken per image over the whole spatial map with amin/amax, whose gradient
      is shared equally between tied elements (as jnp.min/jnp.max do).
  C3  The reference mask is NOT clamped to [0, 1]: (m - min)/max lies in [0, 1] only when
      m >= 0, i.e. when f^{l1} >= 0 (post-ReLU / pooled layers, as the released code's pool5);
      we follow the released code's formula as written. The paper mask is in [0, 1] by construction.
  C4  Upsampling: paper = bilinear, align_corners=False (half-pixel centres, like
      jax.image.resize 'bilinear' for upscaling; the text only says "bilinear"); reference =
      bilinear, align_corners=True (UpsamplingBilinear2d, per the table). No antialiasing.
  C5  Order: paper normalizes at l1 resolution and then upsamples (Alg. 1/2 line 6, Eq. 7 and the
      text after it); reference upsamples first and then applies (m - min)/max (per the table).
  C6  ||.||^2 is the plain sum of squares over all elements of f^{l0} of one image (not a mean).
      reference: divided by ||f^{l0}(x)||^2, guarded with where(den > 0, den, 1).
  C7  ||omega||_1 is sum(abs(omega)); at omega == 0 its gradient is sign(0) = 0 in torch and JAX.
  C8  lr schedule. paper: stage 1 constant lr (Alg. 1 has no decay); stage 2 uses a FRESH Adam
      (zero moments, bias-correction step count restarts at 1) and lr * 0.5**(t // 10) for
      t = 0..stage2_steps-1 (Alg. 2 lines 12-13). reference: one Adam for all steps, lr *
      0.5**(s // 10) for the global step s, moments carried across the stage switch.
  C9  Outputs. 'mask' is the preset's normalized mask at input resolution from the final omega
      (paper: Alg. 2 line 14 returns the raw sum; we return the same normalized/upsampled mask the
      loss used, as the interpretation shown to the user). 'mask_l1' is the RAW weighted sum
      sum_i omega_i f_i^{l1}(x) at l1 resolution (exactly what Alg. 1/2 line 12/14 return).
  C10 f^{l0}(x), f^{l1}(x) are computed once from the clean x without grad. Stage-2 passes Phi and
      Phi_bg through features() in two separate calls. Everything is float32 (or float64 with
      dtype=torch.float64 and a float64 network: the rounding-free comparison).
  C11 f_c: softmax(logits)[c] ("softmax") or sigmoid(logits[c]) ("sigmoid", multi-label heads);
      the same f_c is used in the highlight and the suppress terms.
  C13 log_keep (not in the paper; an option of this project): the highlight term is
      log f_c(Phi), whose gradient does not vanish when c has a small probability in Phi.
      log_suppress, likewise: the suppress term is log f_c(Phi_bg).
  C14 area (not in the paper; an option of this project): stage 2 adds area * mean(mask), the
      mean over the input-resolution mask the blends use.
  C15 Several l1 layers, "a+b" (an option of this project): each layer's f^{l1}(x) is resized
      with F.interpolate (bilinear, the preset's align_corners) to the finest of their grids.
      combine "sum": the channels are concatenated into one basis. combine "product": one map
      per layer, sum over that layer's slice of omega (omega is the concatenation, in the
      order the layers are named), each upsampled and normalized as a single-layer mask is
      (C4, C5), the mask their normalized product.
  C16 norm_grad (not in the paper; an option of this project): the gradient through every
      normalization's min and max (C2); the values are unchanged. "exact": autograd's.
      "detach": none (min and max detached).
  C12 'loss' is the per-image total loss (data terms + regularizer) evaluated at omega BEFORE the
      step's update; 'omega_trace' is omega after the update AND the projection.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True, kw_only=True)
class OracleConfig:
    preset: str                  # "paper" or "reference" (a label; behaviour comes from the fields)
    stage1_steps: int            # paper 11 (t = 0..10); reference 11 (steps 0..10)
    stage2_steps: int            # paper 71 (t = 0..70); reference 69 (steps 11..79)
    gamma: float                 # stage-1 regularizer weight: paper 10 (L1); reference 5 (sum w^2)
    delta: float                 # stage-2 regularizer weight: paper 1 (L1); reference 2 (sum w^2)
    omega_max: Optional[float]   # projection upper bound: paper None; reference 1e5
    reg: str                     # "l1" (sum |w|) or "l2sq" (sum w^2)
    stage1_relative: bool        # divide the stage-1 error by ||f^{l0}(x)||^2 (reference)
    mask_norm: str               # "minmax" (paper) or "max" (reference: (m - min)/max)
    upsample_first: bool         # reference: upsample then normalize; paper: normalize then upsample
    align_corners: bool          # paper False, reference True
    fresh_adam_stage2: bool      # paper True (new Adam + schedule restart); reference False
    lr_schedule: str             # "stage2" (decay counted inside stage 2) or "global" (from step 0)
    lr: float = 1e-2
    omega_init: float = 0.1
    lam: float = 1.0             # lambda, weight of the suppress term f_c(Phi_bg)
    score: str = "softmax"       # or "sigmoid"
    log_keep: bool = False       # C13: the highlight term is log f_c(Phi) instead of f_c(Phi)
    log_suppress: bool = False   # C13: the suppress term is log f_c(Phi_bg)
    area: float = 0.0            # C14: weight of the stage-2 term mean(mask)
    combine: str = "sum"         # C15: "sum" or "product" over several l1 layers
    norm_grad: str = "exact"     # C16: the gradient through the normalization's min and max
    lr_decay_every: int = 10
    lr_decay_factor: float = 0.5
    adam_betas: tuple = (0.9, 0.999)
    adam_eps: float = 1e-8

    def __post_init__(self):
        assert self.reg in ("l1", "l2sq") and self.mask_norm in ("minmax", "max")
        assert self.lr_schedule in ("stage2", "global") and self.score in ("softmax", "sigmoid")
        assert self.combine in ("sum", "product")
        assert self.norm_grad in ("exact", "detach")
        assert self.stage1_steps >= 0 and self.stage2_steps >= 0
        assert self.stage1_steps + self.stage2_steps > 0


def paper_config(**overrides) -> OracleConfig:
    base = dict(preset="paper", stage1_steps=11, stage2_steps=71, gamma=10.0, delta=1.0,
                omega_max=None, reg="l1", stage1_relative=False, mask_norm="minmax",
                upsample_first=False, align_corners=False, fresh_adam_stage2=True,
                lr_schedule="stage2")
    return OracleConfig(**{**base, **overrides})


def reference_config(**overrides) -> OracleConfig:
    base = dict(preset="reference", stage1_steps=11, stage2_steps=69, gamma=5.0, delta=2.0,
                omega_max=1e5, reg="l2sq", stage1_relative=True, mask_norm="max",
                upsample_first=True, align_corners=True, fresh_adam_stage2=False,
                lr_schedule="global")
    return OracleConfig(**{**base, **overrides})


def lr_schedule(cfg: OracleConfig) -> np.ndarray:
    """Step size used at every one of the stage1_steps + stage2_steps steps (C8)."""
    lrs = []
    for s in range(cfg.stage1_steps + cfg.stage2_steps):
        if cfg.lr_schedule == "global":
            k = s // cfg.lr_decay_every
        elif s < cfg.stage1_steps:
            k = 0
        else:
            k = (s - cfg.stage1_steps) // cfg.lr_decay_every
        lrs.append(cfg.lr * cfg.lr_decay_factor ** k)
    return np.asarray(lrs, dtype=np.float64)


def _normalize(m: torch.Tensor, kind: str, grad: str = "exact") -> torch.Tensor:
    """Per-image normalization of m (B, h, w) over its spatial map (C2, C16)."""
    mn = m.amin(dim=(1, 2), keepdim=True)
    mx = m.amax(dim=(1, 2), keepdim=True)
    if grad == "detach":
        mn, mx = mn.detach(), mx.detach()
    if kind == "minmax":
        den = mx - mn
        return (m - mn) / torch.where(den > 0, den, torch.ones_like(den))
    return (m - mn) / torch.where(mx != 0, mx, torch.ones_like(mx))


def _upsample(m: torch.Tensor, size, align_corners: bool) -> torch.Tensor:
    return F.interpolate(m[:, None], size=size, mode="bilinear",
                         align_corners=align_corners)[:, 0]


def make_mask(omega: torch.Tensor, f1, size, cfg: OracleConfig) -> torch.Tensor:
    """omega (B, C1), f1 (B, C1, h, w) -> mask (B, H, W) as the preset defines it (C4, C5).
    f1 a list of (B, Ck, h, w), one per l1 layer: the product mask of C15."""
    if isinstance(f1, torch.Tensor):
        f1 = [f1]
    mask, start = None, 0
    for f in f1:
        w = omega[:, start:start + f.shape[1]]
        start += f.shape[1]
        m = torch.einsum("bc,bchw->bhw", w, f)          # Eq. 6: sum_i omega_i f_i^{l1}(x)
        if cfg.upsample_first:
            m = _normalize(_upsample(m, size, cfg.align_corners), cfg.mask_norm,
                           cfg.norm_grad)
        else:
            m = _normalize(m, cfg.mask_norm, cfg.norm_grad)
        mask = m if mask is None else mask * m
    if len(f1) > 1:
        mask = _normalize(mask, cfg.mask_norm, cfg.norm_grad)
    return mask if cfg.upsample_first else _upsample(mask, size, cfg.align_corners)


def _reg(omega: torch.Tensor, cfg: OracleConfig) -> torch.Tensor:
    return omega.abs().sum(1) if cfg.reg == "l1" else (omega ** 2).sum(1)       # (B,), C7


def _score(logits: torch.Tensor, target: torch.Tensor, cfg: OracleConfig,
           log: bool = False) -> torch.Tensor:
    """f_c per image (C11), or log f_c (C13)."""
    if cfg.score == "softmax":
        probs = (torch.log_softmax if log else torch.softmax)(logits, dim=1)
    else:
        probs = (torch.nn.functional.logsigmoid if log else torch.sigmoid)(logits)
    return probs.gather(1, target[:, None])[:, 0]


def explain(features: Callable, x, p, target, l0: str, l1: str, cfg: OracleConfig,
            dtype: torch.dtype = torch.float32) -> dict:
    """Run both GFI stages on a batch; see the module docstring for every convention."""
    x = torch.as_tensor(x, dtype=dtype)                # runs on x's device (CPU or GPU)
    p = torch.as_tensor(p, dtype=dtype, device=x.device)
    target = torch.as_tensor(target, dtype=torch.int64, device=x.device)
    B, _, H, W = x.shape
    with torch.no_grad():                                # C10: the clean image's features, once
        clean = features(x)
        f0_x = clean[l0].to(dtype)
        parts = [clean[n].to(dtype) for n in l1.split("+")]                  # C15
        hw1 = (max(f.shape[2] for f in parts), max(f.shape[3] for f in parts))
        parts = [f if f.shape[2:] == hw1 else
                 F.interpolate(f, size=hw1, mode="bilinear", align_corners=cfg.align_corners)
                 for f in parts]
        f1_x = torch.cat(parts, 1)                       # the basis omega weighs
        f1_mask = parts if cfg.combine == "product" else f1_x
    ref_sq = (f0_x ** 2).flatten(1).sum(1)
    ref_sq = torch.where(ref_sq > 0, ref_sq, torch.ones_like(ref_sq))

    omega = torch.full((B, f1_x.shape[1]), cfg.omega_init, dtype=dtype,
                       device=x.device, requires_grad=True)
    lrs = lr_schedule(cfg)
    S = len(lrs)

    def new_adam():
        return torch.optim.Adam([omega], lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps)

    opt = new_adam()
    losses, trace = [], []                               # kept on the device until the end
    for s in range(S):
        stage1 = s < cfg.stage1_steps
        if s == cfg.stage1_steps and cfg.fresh_adam_stage2:
            opt = new_adam()                             # C8: paper's Alg. 2 starts a new Adam
        for group in opt.param_groups:
            group["lr"] = float(lrs[s])
        mask = make_mask(omega, f1_mask, (H, W), cfg)[:, None]      # (B, 1, H, W)
        phi = x * mask + p * (1 - mask)                             # Eq. 2
        if stage1:                                                  # Eq. 8 / reference
            diff = (features(phi)[l0].to(dtype) - f0_x) ** 2
            err = diff.flatten(1).sum(1)
            if cfg.stage1_relative:
                err = err / ref_sq
            loss = err + cfg.gamma * _reg(omega, cfg)
        else:                                                       # Eq. 9 / reference
            phi_bg = x * (1 - mask) + p * mask                      # Eq. 4 with m_bg = 1 - m
            hi = _score(features(phi)["logits"].to(dtype), target, cfg, log=cfg.log_keep)
            lo = _score(features(phi_bg)["logits"].to(dtype), target, cfg, log=cfg.log_suppress)
            loss = -hi + cfg.lam * lo + cfg.delta * _reg(omega, cfg)
            if cfg.area:                                            # C14
                loss = loss + cfg.area * mask.flatten(1).mean(1)
        losses.append(loss.detach())
        opt.zero_grad()
        loss.sum().backward()                            # C1: sum of per-image losses
        opt.step()
        with torch.no_grad():                            # projection after every step
            omega.clamp_(min=0.0, max=cfg.omega_max)
        trace.append(omega.detach().clone())

    with torch.no_grad():
        final_mask = make_mask(omega, f1_mask, (H, W), cfg)
        raw_l1 = torch.einsum("bc,bchw->bhw", omega, f1_x)
    np_ = lambda t: t.detach().cpu().numpy().copy()   # noqa: E731
    return {"omega": np_(omega), "mask": np_(final_mask), "mask_l1": np_(raw_l1),
            "loss": np_(torch.stack(losses, 1).reshape(B, S)),
            "omega_trace": np_(torch.stack(trace, 1).reshape(B, S, -1)), "lr": lrs}


def rank_k_target(features: Callable, x, k: int = 1) -> np.ndarray:
    """The reference preset's target: the class ranked k-th by the clean image's softmax."""
    with torch.no_grad():
        logits = features(torch.as_tensor(x, dtype=torch.float32))["logits"]
    return torch.argsort(logits, dim=1, descending=True)[:, k - 1].cpu().numpy()


def torch_features(name: str, net) -> Callable:
    """`features(x) -> {layers..., "logits"}` of a torchvision VGG/AlexNet/ResNet-18 or an
    `efficientnet_lite_pytorch` EfficientNet-Lite0, with the layers gfi_jax names l0/l1
    (the whole network every call). Modules run in place: in-place ReLU outputs are cloned."""
    if name in ("vgg16", "vgg19", "alexnet"):
        idx = {"vgg19": {35: "conv5_4", 36: "pool5"}, "vgg16": {29: "conv5_3", 30: "pool5"},
               "alexnet": {12: "pool5"}}[name]

        def features(x):
            out, h = {}, x
            for i, layer in enumerate(net.features):
                h = layer(h)
                if i in idx:
                    out[idx[i]] = h.clone()
            out["logits"] = net.classifier(torch.flatten(net.avgpool(h), 1))
            return out
    elif name == "resnet18":
        def features(x):
            h = net.maxpool(net.relu(net.bn1(net.conv1(x))))
            h = net.layer4[0](net.layer3(net.layer2(net.layer1(h))))
            b = net.layer4[1]                                  # the last block, unrolled
            act1 = b.relu(b.bn1(b.conv1(h)))
            h = b.relu(b.bn2(b.conv2(act1)) + h)
            return {"layer4.1.act1": act1, "layer4": h,
                    "logits": net.fc(torch.flatten(net.avgpool(h), 1))}
    elif name == "efficientnet_lite0":
        def features(x):
            h = net._swish(net._bn0(net._conv_stem(x)))
            for block in net._blocks:
                h = block(h)
            head = net._swish(net._bn1(net._conv_head(h)))
            return {"head": head, "logits": net._fc(torch.flatten(net._avg_pooling(head), 1))}
    else:
        raise ValueError(f"no torch features for {name!r}")
    return features


__all__ = ["OracleConfig", "paper_config", "reference_config", "explain", "make_mask",
           "lr_schedule", "rank_k_target", "torch_features"]
