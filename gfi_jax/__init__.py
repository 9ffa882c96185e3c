"""gfi-jax: Guided Feature Inversion (Du et al., KDD 2018) in JAX/Flax."""
# The one place the version is written: pyproject.toml reads it (setuptools dynamic version).
__version__ = "0.1.0"

from gfi_jax.models import ARCHS, LoadedModel, get_arch, imagenet_classes, layer_shapes
from gfi_jax.weights import load_model
from gfi_jax.models.custom import WrappedModel, wrap
from gfi_jax.gfi import Config, Explanation, Extensions, explain, preset
from gfi_jax.methods import METHODS, attribute

__all__ = ["ARCHS", "METHODS", "attribute", "Config", "Explanation", "Extensions", "explain",
           "preset", "LoadedModel", "get_arch", "imagenet_classes", "layer_shapes", "load_model",
           "WrappedModel", "wrap"]
