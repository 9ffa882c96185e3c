"""`gfi-jax` command line: `models` (the zoo) and `convert` (checkpoint -> weights folder)."""
from __future__ import annotations

import argparse
import sys


def _models(args) -> int:
    from gfi_jax.models import ARCHS, layer_shapes
    from gfi_jax.weights import default_weights_dir

    print(f"{'model':<20}{'l0':<10}{'l1':<16}{'input':<8}{'min':<6}weights")
    for name, arch in ARCHS.items():
        cached = (default_weights_dir(name) / "metadata.json").is_file()
        print(f"{name:<20}{arch.l0:<10}{arch.l1:<16}{arch.preprocessing.size:<8}{arch.min_size:<6}"
              f"{'cached' if cached else '-'}")
        if args.layers:
            for layer, shape in layer_shapes(name, args.size).items():
                print(f"    {layer:<24}{shape}")
    return 0


def _convert(args) -> int:
    from weights_conversion.__main__ import main as convert_main
    argv = ["--arch", args.arch, "--source", args.source] + (["--out", args.out] if args.out else [])
    return convert_main(argv)


def main(argv: list[str] | None = None) -> int:
    from gfi_jax.models import ARCHS

    p = argparse.ArgumentParser(prog="gfi-jax", description="Guided Feature Inversion in JAX.")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("models", help="list the architectures, their GFI layers and cached weights")
    m.add_argument("--layers", action="store_true", help="also list every layer with its shape")
    m.add_argument("--size", type=int, default=224, help="input size for --layers (default 224)")
    m.set_defaults(run=_models)
    c = sub.add_parser("convert", help="convert a PyTorch checkpoint (see python -m weights_conversion)")
    c.add_argument("--arch", required=True, choices=sorted(ARCHS))
    c.add_argument("--source", required=True, help="PATH, 'torchvision' or 'package'")
    c.add_argument("--out", default=None, help="weights folder (default: the user cache)")
    c.set_defaults(run=_convert)
    args = p.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
