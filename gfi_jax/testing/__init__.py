"""Helpers shared by the test suite and the benchmarks; `import gfi_jax` never loads them.

- `gfi_jax.testing.oracle`: an independent plain-PyTorch GFI, the reference the JAX engine is
  checked against. It imports torch, which only the test extra installs
  (`pip install -e ".[test]"`).
- `gfi_jax.testing.random_models`: random-init zoo models (no download, no torch).
- `gfi_jax.testing.torch_twins`: PyTorch twins of the ports for Captum (imports torch).
"""
