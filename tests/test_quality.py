"""The offline benchmark's split, store, statistics and resumable filling
(experiments/quality/)."""
import json

import numpy as np
import pytest

import gfi_jax
from experiments.quality import offline_benchmark as B
from experiments.quality import report, stats, tasks
from experiments.quality.store import Store, config_hash


def test_split_is_by_class_and_fixed():
    assert [tasks.split_of(c) for c in (0, 2, 4, 6, 998, 1, 3)] == \
        ["tune", "test", "tune", "test", "test", None, None]
    ds = tasks.Dataset(np.zeros((6, 2, 2, 3)), np.array([0, 2, 4, 6, 8, 10]),
                       tuple("abcdef"), np.zeros((6, 12)))
    assert ds.indices("tune").tolist() == [0, 2, 4] and ds.indices("test").tolist() == [1, 3, 5]
    with pytest.raises(ValueError, match="split"):
        ds.indices("val")


def test_store_adds_each_item_once_and_hides_other_configs(tmp_path):
    s = Store(tmp_path, "m")
    row = lambda item, cfg="c1", v=1.0: {"method": "Grad", "config": cfg, "code": "1",  # noqa: E731
                                         "task": "grid", "item": item, "scores": {"energy": v},
                                         "seconds": 0.1, "split": "test"}
    assert s.add("Grad", [row("a"), row("b"), row("a")]) == 2
    assert s.add("Grad", [row("b", v=9.0), row("c")]) == 1      # b is kept as first stored
    assert s.scores("Grad", "c1", "1", "grid")["b"]["scores"]["energy"] == 1.0
    assert set(s.scores("Grad", "c1", "1", "grid")) == {"a", "b", "c"}
    assert s.scores("Grad", "c2", "1", "grid") == {} and s.scores("Grad", "c1", "2", "grid") == {}
    s.add("Grad", [row("a", cfg="c2")])
    assert len(s.rows("Grad")) == 4 and set(s.scores("Grad", "c2", "1", "grid")) == {"a"}
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})


def test_store_write_killed_midway_leaves_the_old_file(tmp_path, monkeypatch):
    s = Store(tmp_path, "m")
    row = {"method": "X", "config": "c", "code": "1", "task": "image", "item": "a",
           "scores": {}, "seconds": 0.0, "split": "test"}
    s.add("X", [row])
    before = s.path("X").read_bytes()

    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(KeyboardInterrupt):
        s.add("X", [dict(row, item="b")])
    monkeypatch.undo()
    assert s.path("X").read_bytes() == before
    assert [p.name for p in s.folder.iterdir()] == ["x.jsonl"]     # no temporary left behind


def _add_one_by_one(root, tag, start):
    s = Store(root, "m")
    start.wait()
    for i in range(150):
        s.add("Grad", [{"method": "Grad", "config": "c", "code": "1", "task": tag,
                        "item": f"{tag}{i}", "scores": {}, "seconds": 0.0, "split": "test"}])


def test_two_fills_sharing_a_store_keep_each_others_rows(tmp_path):
    import multiprocessing
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(2)
    procs = [ctx.Process(target=_add_one_by_one, args=(tmp_path, tag, start))
             for tag in ("grid", "image")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert len(Store(tmp_path, "m").rows("Grad")) == 300


def test_bootstrap_intervals():
    v = np.random.default_rng(0).normal(1.0, 2.0, 400)
    m, lo, hi = stats.bootstrap_ci(v)
    assert lo < m < hi and m == pytest.approx(v.mean())
    assert hi - lo == pytest.approx(2 * 1.96 * v.std() / np.sqrt(len(v)), rel=0.1)
    assert stats.bootstrap_ci(np.full(10, 0.5)) == (0.5, 0.5, 0.5)
    # Paired: a constant shift on noisy items is found exactly, with a zero-width interval.
    d = stats.paired_ci(v + 0.1, v)
    assert d == pytest.approx((0.1, 0.1, 0.1)) and stats.separated(d)
    assert not stats.separated(stats.paired_ci(v, v[::-1]))
    with pytest.raises(ValueError, match="same items"):
        stats.paired_ci(v, v[:10])


def _dataset(model, n=12, size=64):
    """Synthetic images whose labels are what the model predicts, with confident fake probs,
    so the items exist for a random-init model."""
    x = np.random.default_rng(0).normal(0, 1, (n, size, size, 3)).astype(np.float32)
    labels = 2 * np.arange(n)                       # even classes: 6 tune, 6 test
    probs = np.full((n, 1000), 0.1 / 999)
    probs[np.arange(n), labels] = 0.9
    return tasks.Dataset(x, labels, tuple(f"img{i}.png" for i in range(n)), probs)


def test_fill_resumes_after_a_kill_without_losing_or_doubling(tmp_path, monkeypatch, random_resnet18):
    model = random_resnet18
    ds = _dataset(model)
    args = B.parse_args(["--split", "test", "--steps", "4", "--batch", "2",
                         "--store", str(tmp_path / "a")])
    items = {"grid": tasks.grid_items(ds, "test", 5, 0), "image": tasks.image_items(ds, "test", 5, 0)}
    assert len({it.id for it in items["grid"]}) == 5 and len(items["image"]) == 5
    spec = ("grad", {})
    log = lambda s: None  # noqa: E731
    whole = Store(args.store, model.name)
    for task in ("grid", "image"):
        assert B.fill(model, ds, whole, "Grad", spec, items[task], task, args, log, np.inf) == 5

    # The same run into another store, killed after its second stored batch.
    args.store = str(tmp_path / "b")
    killed = Store(args.store, model.name)
    calls, add = [0], killed.add

    def add_then_die(*a, **k):
        n = add(*a, **k)
        calls[0] += 1
        if calls[0] == 2:
            raise KeyboardInterrupt
        return n
    monkeypatch.setattr(killed, "add", add_then_die)
    with pytest.raises(KeyboardInterrupt):
        B.fill(model, ds, killed, "Grad", spec, items["image"], "image", args, log, np.inf)
    monkeypatch.undo()
    assert len(killed.rows("Grad")) == 4
    assert B.fill(model, ds, killed, "Grad", spec, items["image"], "image", args, log, np.inf) == 1
    assert B.fill(model, ds, killed, "Grad", spec, items["image"], "image", args, log, np.inf) == 0
    a = {r["item"]: r["scores"] for r in whole.rows("Grad", task="image")}
    b = {r["item"]: r["scores"] for r in killed.rows("Grad", task="image")}
    assert a == b and set(a) == {it.id for it in items["image"]}
    assert set(a["img1"]) == {"deletion", "insertion", "road_morf", "road_lerf"}

    # A changed setting is a different config: nothing counts, everything is recomputed.
    args.steps = 5
    assert B.collect(killed, model, ds, "Grad", spec, items["image"], "image", args) == {}


def test_probe_refuses_changed_maps_under_one_code_version(tmp_path, monkeypatch, random_resnet18):
    model = random_resnet18
    store = Store(tmp_path, model.name)
    B.check_probe(store, model, "Grad", "grad", {}, "1", 1e-3)
    B.check_probe(store, model, "Grad", "grad", {}, "1", 1e-3)       # unchanged: fine
    real = B.M.probe_maps
    monkeypatch.setattr(B.M, "probe_maps", lambda *a: real(*a) * 1.01)
    with pytest.raises(SystemExit, match="bump"):
        B.check_probe(store, model, "Grad", "grad", {}, "1", 1e-3)
    B.check_probe(store, model, "Grad", "grad", {}, "2", 1e-3)       # a new version: fine
    monkeypatch.setattr(B, "numerics", lambda: "another-machine")
    B.check_probe(store, model, "Grad", "grad", {}, "1", 1e-3)       # other rounding: its own


def test_numerics_tag_is_stable_and_short():
    assert B.numerics() == B.numerics() and len(B.numerics()) == 12


def test_summary_ranks_and_pairs():
    rows = lambda vals: {f"i{k}": {"scores": {"energy": v}, "seconds": 1.0}  # noqa: E731
                         for k, v in enumerate(vals)}
    base = np.random.default_rng(0).random(50)
    task_rows = {"GFI default": rows(base), "A": rows(base + 0.2), "B": rows(base - 0.01)}
    s = report.summary(task_rows, "GFI default", "energy")
    assert [s[k]["rank"] for k in task_rows] == [2, 1, 3]
    assert s["A"]["diff"] == pytest.approx((0.2, 0.2, 0.2)) and "diff" not in s["GFI default"]
    assert s["A"]["n_paired"] == 50
    json.dumps(s)


def test_summary_table_bolds_the_best_and_pairs_with_the_default():
    def rows(vals, keys):
        return {f"i{k}": {"scores": dict.fromkeys(keys, v), "seconds": 1.0}
                for k, v in enumerate(vals)}
    base = np.random.default_rng(1).random(40)
    grid, image = list(report.METRICS["grid"]), list(report.METRICS["image"])
    rows_ = {"grid": {"GFI default": rows(base, grid), "CAM": rows(base + 0.3, grid)},
             "image": {"GFI default": rows(base, image), "CAM": rows(base + 0.1, image)}}
    lines = report.summary_table(rows_, report.summaries(rows_, "GFI default"),
                                 {"GFI default": 232.0, "CAM": 0.8}, {"CAM": "x=1 (full: 2)"})
    gfi, cam = lines[2].split(" | "), lines[3].split(" | ")
    assert cam[0] == "| CAM, x=1 (full: 2)" and cam[1].startswith("**")   # best grid energy
    assert cam[2].startswith("+0.300 [+0.300, +0.300] better") and gfi[2] == "—"
    assert gfi[3].startswith("**") and not cam[3].startswith("**")    # lower deletion wins
    assert cam[6].startswith("+0.100") and cam[6].endswith("worse") and cam[7] == "0.8 |"


def test_main_fills_then_reports_from_the_store_alone(tmp_path, monkeypatch, random_resnet18):
    ds = _dataset(random_resnet18)
    monkeypatch.setattr(B.tasks, "load", lambda model, folder, size=None: ds)
    store = tmp_path / "store"
    args = ["--split", "test", "--mosaics", "4", "--images", "3", "--steps", "4", "--batch", "2",
            "--methods", "Grad,Center", "--gfi", "GFI short:preset=reference,stage1_steps=1,"
            "stage2_steps=1", "--store", str(store), "--out", str(tmp_path / "q.md"), "--quiet"]
    rows = B.main(args, model=random_resnet18)
    assert set(rows["grid"]) == {"Grad", "Center", "GFI short"}
    assert all(len(r) == 4 for r in rows["grid"].values())
    assert all(len(r) == 3 for r in rows["image"].values())
    centre = [r["scores"]["energy"] for r in rows["grid"]["Center"].values()]
    np.testing.assert_allclose(centre, 0.25, atol=1e-6)   # symmetric: a quarter per cell
    files = {p.name: p.read_bytes() for p in (store / random_resnet18.name).iterdir()}
    again = B.main(args + ["--report-only"], model=random_resnet18)
    assert again == rows       # the report comes from the store; nothing was recomputed
    assert {p.name: p.read_bytes() for p in (store / random_resnet18.name).iterdir()} == files
    text = (tmp_path / "q.md").read_text()
    assert "python -m experiments.quality.offline_benchmark --split test" in text
    assert "split: **test**" in text and "| Grad | 4 |" in text and "ROAD MoRF" in text
    assert (tmp_path / "q.png").stat().st_size > 1000
    B.main(args + ["--report-only", "--paired-with", "Center"], model=random_resnet18)
    text = (tmp_path / "q.md").read_text()     # the first row is Grad; pair with another
    assert "paired difference to **Center**" in text and "| Δ vs Center |" in text
    summary = text.split("## Summary", 1)[1].split("## ", 1)[0].splitlines()
    cells = {ln.split(" | ")[0][2:]: ln.split(" | ") for ln in summary if ln.startswith("| ")}
    assert cells["Center"][2] == "—" and cells["Grad"][2][0] in "+-"   # Δ is to Center now
    with pytest.raises(SystemExit, match="--paired-with 'Gard' is not a row"):
        B.main(args + ["--report-only", "--paired-with", "Gard"], model=random_resnet18)


def test_specs_run_the_reference_preset_once_where_it_is_the_default(random_resnet18):
    """On a model whose default preset is 'reference' the table has one row for it, and
    --methods 'GFI reference' selects that row."""
    from types import SimpleNamespace

    from experiments.quality import methods as M
    args = lambda methods: SimpleNamespace(  # noqa: E731
        methods=methods, gfi=[], smoothgrad_samples=2, ig_steps=2, rise_masks=10, mp_steps=2)
    assert M.G.default_preset(random_resnet18.arch.name) == "reference"
    names = list(M.specs(args(None), random_resnet18))
    assert "GFI default (reference)" in names and "GFI reference" not in names
    assert len(names) == 11 and "GFI paper" in names
    assert list(M.specs(args("GFI reference,Grad"), random_resnet18)) == \
        ["GFI default (reference)", "Grad"]


def test_ties_probe_finds_no_gap_where_the_perturbed_run_is_the_same(random_resnet18):
    from experiments.quality import ties
    cfg = gfi_jax.preset("reference", stage1_steps=3, stage2_steps=4)
    x = np.random.default_rng(0).normal(0, 1, (2, 64, 64, 3)).astype(np.float32)
    t = np.array([3, 5])
    table = ties.rows(random_resnet18, x, t, cfg, noise=0.0, seed=0)
    bf16 = [r for r in table if r[1] == "bfloat16 vs float32"]
    same = [r for r in table if r[1] == "input noise"]     # noise 0: the run alone again
    assert len(bf16) == len(same) == 2
    for r in same:     # J of m_v on the clean basis is J of m_a: the plumbing is consistent
        assert r[3] == "1.000" and r[5] == r[6] and float(r[7]) == 0 and float(r[8]) == 0
    assert all(np.isfinite(float(v)) for r in bf16 for v in r[3:])
