"""python -m weights_conversion --arch vgg19 --source PATH|torchvision|package --out DIR

The same command as `gfi-jax convert` (`gfi_jax.cli.convert`): no torch needed."""
from __future__ import annotations

import argparse
import sys

from gfi_jax import cli


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m weights_conversion",
                                description="Convert a PyTorch checkpoint (.pth, or "
                                            ".safetensors with torchvision's or timm's key "
                                            "names) to gfi_jax weights (no torch needed).")
    cli.convert_args(p)
    return cli.convert(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
