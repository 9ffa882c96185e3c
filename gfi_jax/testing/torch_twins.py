"""PyTorch twins of the ports for Captum comparisons (tests and benchmarks; needs torch)."""
from __future__ import annotations

import torch


class ReLU6(torch.nn.ReLU):
    """ReLU6 as an `nn.ReLU` subclass: Captum's GuidedBackprop overrides the backward of
    `nn.ReLU` modules only, so this is how the reference's ReLU6s get the guided rule."""

    def forward(self, x):
        return torch.clamp(x, 0, 6)


class Lite0(torch.nn.Module):
    """The reference EfficientNet-Lite0 forward with its own stem and head activations (the
    package reuses one `_swish` module for both, so the head could not be hooked alone)."""

    def __init__(self, net):
        super().__init__()
        self.net, self.stem_act, self.head_act = net, ReLU6(), ReLU6()
        for block in net._blocks:
            block._swish = ReLU6()

    def forward(self, x):
        n = self.net
        x = self.stem_act(n._bn0(n._conv_stem(x)))
        for block in n._blocks:
            x = block(x, drop_connect_rate=None)
        x = self.head_act(n._bn1(n._conv_head(x)))
        return n._fc(n._avg_pooling(x).flatten(1))
