"""Tables and the quality-against-cost figure of the offline benchmark, from stored rows only."""
from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np

from experiments import common
from experiments.quality import methods as M
from experiments.quality import stats, tasks
from gfi_jax.files import atomic_writer

# metric -> (label, higher is better)
METRICS = {"grid": {"energy": ("grid energy", True), "hit": ("grid hit", True)},
           "image": {"deletion": ("deletion AUC", False), "insertion": ("insertion AUC", True),
                     "road_morf": ("ROAD MoRF", False), "road_lerf": ("ROAD LeRF", True)}}


def values(rows: dict[str, dict], metric: str, ids=None) -> np.ndarray:
    ids = list(rows) if ids is None else ids
    return np.array([rows[i]["scores"][metric] for i in ids], np.float64)


def summary(task_rows: dict[str, dict], default: str, metric: str) -> dict[str, dict]:
    """Per method: mean and CI, paired difference to `default` on the items both have (with
    CI), and the rank among methods by mean (1: best)."""
    higher = next(v[1] for t in METRICS.values() for k, v in t.items() if k == metric)
    out = {}
    for name, rows in task_rows.items():
        if not rows:
            continue
        r = {"n": len(rows), "ci": stats.bootstrap_ci(values(rows, metric))}
        base = task_rows.get(default, {})
        both = [i for i in rows if i in base]
        if name != default and both:
            r["diff"] = stats.paired_ci(values(rows, metric, both), values(base, metric, both))
            r["n_paired"] = len(both)
        out[name] = r
    means = {k: v["ci"][0] for k, v in out.items()}
    for k, v in out.items():
        v["rank"] = 1 + sum((m > means[k]) if higher else (m < means[k]) for m in means.values())
    return out


def summaries(rows: dict[str, dict], default: str) -> dict[tuple[str, str], dict]:
    """`summary` for every (task, metric) present, computed once: the bootstraps are the
    report's slow part, and the summary and the task tables read the same numbers."""
    return {(t, m): summary(task_rows, default, m)
            for t, task_rows in rows.items() for m in METRICS[t]}


def _ci(c) -> str:
    return f"{c[0]:.3f} [{c[1]:.3f}, {c[2]:.3f}]"


def _diff(r: dict, higher: bool) -> str:
    if "diff" not in r:
        return "—"
    d = r["diff"]
    mark = ""
    if stats.separated(d):
        mark = " better" if (d[0] > 0) == higher else " worse"
    return f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]{mark}"


def task_table(task: str, task_rows, sums, costs, notes, ref: str = "default") -> list[str]:
    metrics_ = METRICS[task]
    header = ["method", "n"]
    for label, higher in metrics_.values():
        arrow = "↑" if higher else "↓"
        header += [f"{label} {arrow} (rank)", f"Δ {label} vs {ref}"]
    header += ["GFLOP / map", "s / map (median)", "settings"]
    lines = []
    for name, rows in task_rows.items():
        if not rows:
            lines.append([name, 0] + ["—"] * (2 * len(metrics_)) + [
                f"{costs[name]:.3g}", "—", notes.get(name, "")])
            continue
        cells = [name, len(rows)]
        for m, (label, higher) in metrics_.items():
            r = sums[task, m][name]
            cells += [f"{_ci(r['ci'])} ({r['rank']})", _diff(r, higher)]
        secs = np.median([row["seconds"] for row in rows.values()])
        cells += [f"{costs[name]:.3g}", f"{secs:.3g}", notes.get(name, "")]
        lines.append(cells)
    return common.table(header, lines)


# The summary's columns: (task, metric) with a paired Δ column after the ones in PAIRED.
SUMMARY = [("grid", "energy"), ("image", "deletion"), ("image", "insertion"),
           ("image", "road_morf")]
PAIRED = {("grid", "energy"), ("image", "road_morf")}


def summary_table(rows, sums, costs, notes, ref: str = "default") -> list[str]:
    """One line per method over the headline metrics (the README's table): mean [95% CI],
    the best mean in bold, the paired Δ to the default for grid energy and ROAD MoRF.
    `sums`: `summaries(rows, default)`."""
    header = ["method"]
    for t, m in SUMMARY:
        label, higher = METRICS[t][m]
        header.append(f"{label} {'↑' if higher else '↓'} (n)")
        if (t, m) in PAIRED:
            header.append(f"Δ vs {ref}")
    lines = []
    for name in dict.fromkeys([*rows.get("grid", {}), *rows.get("image", {})]):
        note = f", {notes[name]}" if notes.get(name) else ""
        cells = [name + note]
        for key in SUMMARY:
            r = sums.get(key, {}).get(name)
            bold = r is not None and r["rank"] == 1
            cells.append("—" if r is None else
                         (f"**{r['ci'][0]:.3f}**" if bold else f"{r['ci'][0]:.3f}")
                         + f" [{r['ci'][1]:.3f}, {r['ci'][2]:.3f}] ({r['n']})")
            if key in PAIRED:
                cells.append("—" if r is None else _diff(r, METRICS[key[0]][key[1]][1]))
        lines.append(cells + [f"{costs[name]:.3g}"])
    return common.table(header + ["GFLOP / map"], lines)


def markdown(args, model, specs, rows, costs, ds, items, figure_name: str) -> list[str]:
    default = args.paired_with or next(iter(specs))
    ref = "default" if default == next(iter(specs)) else default
    notes = {name: M.reduced(*spec) for name, spec in specs.items()}
    sums = summaries(rows, default)
    n_test = len(ds.indices(args.split))
    out = [f"- split: **{args.split}** ({tasks.SPLIT_RULE}; {n_test} images of the "
           f"{len(ds.x)}); tuning used the tune split only",
           f"- model: {model.name} ({model.metadata.get('source', '?')}); input "
           f"{ds.x.shape[1]}²",
           "- means with 95% percentile-bootstrap intervals over items (10,000 resamples); "
           f"Δ: the paired difference to **{default}**, on the items both have, with its own "
           "interval ('better'/'worse' where it excludes 0). (rank) is by mean among the rows "
           "and means little where intervals overlap",
           f"- store: `{Path(args.store).relative_to(common.ROOT) if Path(args.store).is_relative_to(common.ROOT) else args.store}` "
           "(per-item scores; the tables are regenerated from it)",
           "- GFLOP / map: analytic (convolutions and matmuls, an input gradient costed as one "
           "forward); s / map: measured while filling, median over stored items, on "
           "whichever 2-core CPU VM filled them (Intel Xeon or AMD EPYC; the machine line "
           "below is the one that wrote this report). The first batch includes compiling, "
           "and fills often ran two at a time, which can double a median: compare methods' "
           "speed in the `bench_methods` tables", "",
           "## Summary", "", *summary_table(rows, sums, costs, notes, ref), ""]
    if "grid" in rows:
        out += [f"## Grid pointing game ({len(items['grid'])} mosaics requested)", "",
                f"2×2 mosaics of {args.split} images correct alone with p >= "
                f"{args.min_confidence:g}, four classes, one random cell explained (chance "
                "0.25). Mosaics share images, so the intervals are somewhat optimistic.", "",
                *task_table("grid", rows["grid"], sums, costs, notes, ref), "",
                f"![quality against cost]({figure_name})", ""]
    if "image" in rows:
        out += [f"## Deletion, insertion and ROAD ({len(items['image'])} images requested)", "",
                f"Correctly classified {args.split} images. Deletion/insertion: {args.steps} "
                "steps, blurred substrate (σ 5 px). ROAD: noisy linear imputation (noise σ "
                f"{args.road_noise:g} in input units) at 10, 30, 50, 70, 90% of the pixels, "
                "the mean probability over the levels.", "",
                *task_table("image", rows["image"], sums, costs, notes, ref), ""]
    return out


def figure(path: Path, grid_rows: dict[str, dict], costs: dict[str, float], title: str) -> None:
    """Grid energy (mean, 95% CI) against analytic GFLOPs per map, log scale, one point per
    method; written through a temporary name."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=110)
    placed: list[tuple[float, float]] = []     # (log10 x, label y) of the labels so far
    points = [(name, stats.bootstrap_ci(values(rows, "energy")), len(rows))
              for name, rows in grid_rows.items() if rows]
    for name, (m, lo, hi), n in sorted(points, key=lambda p: -p[1][0]):
        x = max(costs[name], 1e-3)             # a cost of 0 (Center) at the axis' left end
        color = "C3" if name.startswith("GFI") else "C0"
        ax.errorbar([x], [m], yerr=[[m - lo], [hi - m]], fmt="o", color=color, capsize=3)
        y = m
        while any(abs(np.log10(x) - px) < 1.5 and abs(y - py) < 0.014 for px, py in placed):
            y -= 0.014                         # labels of nearby points stack downwards
        placed.append((np.log10(x), y))
        ax.annotate(f"{name} (n={n})", (x, m), xytext=(x * 1.25, y + 0.004), fontsize=7)
    ax.set_xscale("log")
    ax.axhline(0.25, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("analytic GFLOP per map (log scale)")
    ax.set_ylabel("grid energy (95% CI)")
    ax.set_title(f"Quality against cost: {title}\n"
                 f"{datetime.date.today():%Y-%m-%d}; dashed: chance", fontsize=9)
    fig.tight_layout()
    with atomic_writer(path) as f:
        fig.savefig(f, format="png")
    plt.close(fig)
