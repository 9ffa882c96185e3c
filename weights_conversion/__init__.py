"""`python -m weights_conversion`: PyTorch checkpoints -> gfi_jax weights folders.

A command line over `gfi_jax.weights.convert` (see `weights_conversion.convert`); it imports
gfi_jax, and gfi_jax never imports this package.
"""
