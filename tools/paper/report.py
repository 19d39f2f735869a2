"""Tables and plots of the reproduction from the cached results, into docs/BENCHMARKS.md and docs/*.png.

    python -m tools.paper.report [--print]

Replaces the text between the ``<!-- paper-tables:begin -->`` and ``<!-- paper-tables:end -->`` markers of
docs/BENCHMARKS.md (appends the markers the first time); writes docs/paper_accuracy.png (accuracy against
MACs cut per criterion: no fine-tuning, supervised, distillation) and docs/paper_budget.png (Consensus at
the deepest level against the fine-tuning budget). Needs matplotlib (``pip install -e ".[bench]"``).
"""
from __future__ import annotations

import argparse
import statistics

from .common import CONFIG, ROOT, Config, load_result
from .finetune_runs import MODES, best_single, unit_name

BEGIN, END = "<!-- paper-tables:begin -->", "<!-- paper-tables:end -->"


def pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.2f}"


def mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return pct(values[0])
    return f"{statistics.mean(values) * 100:.2f} ± {statistics.stdev(values) * 100:.2f}"


def label(criterion: str) -> str:
    return {"consensus": "Consensus (8 metrics)", "published": "published code's order"}.get(criterion, criterion)


def ft_accuracies(criterion: str, level: int, mode: str, seeds, config: Config) -> list[float]:
    rows = [load_result("finetune", unit_name(criterion, level, mode, s, config.train_images), config) for s in seeds]
    return [r.accuracy for r in rows if r is not None]


def grouped(config: Config) -> list[tuple[str, list[str]]]:
    """(row label, criteria pooled into it): random seeds pooled into one row."""
    rows = [(label(c), [c]) for c in ["consensus", *config.single_metrics]]
    rows.append((f"random ({len(config.random_seeds)} seeds)", [f"random{s}" for s in config.random_seeds]))
    rows.append((label("published"), ["published"]))
    return rows


def table_prune(config: Config) -> list[str]:
    orig = load_result("prune", "original", config)
    lv = config.levels
    first = load_result("prune", "consensus", config)
    cuts = {r.level: r.macs_cut for r in first.levels} if first else {}
    out = ["| criterion | " + " | ".join(f"{l} blocks (-{cuts.get(l, 0):.2%} MACs)" for l in lv)
           + " | pruning run to 21 blocks |", "|---|" + "---:|" * (len(lv) + 1),
           f"| original (no block removed) | {pct(orig.accuracy)}" + " |" * len(lv) + " |"]
    for name, crits in grouped(config):
        runs = [load_result("prune", c, config) for c in crits]
        runs = [r for r in runs if r and r.levels]
        if not runs:
            continue
        cells = [mean_sd([r.level(l).accuracy for r in runs]) for l in lv]
        secs = statistics.mean(r.prune_seconds for r in runs)
        out.append(f"| {name} | " + " | ".join(cells) + f" | {secs:.0f} s |")
    return out


def table_finetune(config: Config) -> list[str]:
    best = best_single(config)
    lv = config.levels
    head = " | ".join(f"{l}, {m[:3]}." for m in MODES for l in lv)
    out = ["| criterion | runs | " + head + " | fine-tune s (mean) |", "|---|---|" + "---:|" * (2 * len(lv) + 1)]
    for name, crits in grouped(config):
        multi = crits[0] in ("consensus", best)
        seeds = config.ft_seeds if multi else (0,)
        cells, secs, runs = [], [], 0
        for m in MODES:
            for l in lv:
                accs = [a for c in crits for a in ft_accuracies(c, l, m, seeds, config)]
                runs = max(runs, len(accs))
                cells.append(mean_sd(accs))
        for c in crits:
            for s in seeds:
                for m in MODES:
                    for l in lv:
                        r = load_result("finetune", unit_name(c, l, m, s, config.train_images), config)
                        if r:
                            secs.append(r.finetune_seconds)
        tag = " (best single)" if crits[0] == best else ""
        out.append(f"| {name}{tag} | {runs} | " + " | ".join(cells)
                   + f" | {statistics.mean(secs) if secs else 0:.0f} |")
    return out


def table_consensus_vs_singles(config: Config) -> list[str]:
    """Consensus minus each single metric, seed 0 (same seed for all), per level and mode."""
    out = ["| Consensus minus | " + " | ".join(f"{l}, {m[:3]}." for m in MODES for l in config.levels) + " |",
           "|---|" + "---:|" * (2 * len(config.levels))]
    for metric in config.single_metrics:
        cells = []
        for m in MODES:
            for l in config.levels:
                c = ft_accuracies("consensus", l, m, (0,), config)
                s = ft_accuracies(metric, l, m, (0,), config)
                cells.append(f"{(c[0] - s[0]) * 100:+.2f}" if c and s else "-")
        out.append(f"| {metric} | " + " | ".join(cells) + " |")
    return out


def table_robustness(config: Config) -> list[str]:
    best = best_single(config)
    orig = load_result("robustness", "original", config)
    if orig is None:
        return ["(robustness not run yet)"]
    attacks = [(a.attack, a.eps) for a in orig.attacks]
    out = ["| model | clean | " + " | ".join(f"{a.upper()} {e * 255:.0f}/255" for a, e in attacks) + " |",
           "|---|---:|" + "---:|" * len(attacks)]

    def line(name, row):
        return f"| {name} | {pct(row.clean)} | " + " | ".join(pct(a.accuracy) for a in row.attacks) + " |"
    out.append(line("original", orig))
    for c in ("consensus", best):
        for m in MODES:
            for l in config.levels:
                row = load_result("robustness", unit_name(c, l, m, 0, config.train_images), config)
                if row:
                    out.append(line(f"{label(c)}, {l} blocks, {m}", row))
    return out


def table_latency(config: Config) -> list[str]:
    out = []
    for threads in (2, 1):
        b1 = load_result("latency", f"t{threads}-b1-r30", config)
        b64 = load_result("latency", f"t{threads}-b64-r30", config)
        if not (b1 and b64):
            continue
        o1, o64 = b1.rows[0], b64.rows[0]
        out += [f"**{threads} thread{'s' if threads > 1 else ''}** (original: {o1.median_ms:.3f} ms at batch 1, "
                f"{o64.median_ms:.2f} ms at batch 64; p90 {o1.p90_ms:.3f} / {o64.p90_ms:.2f} ms)", "",
                "| model | MACs cut | latency cut, batch 1 | latency cut, batch 64 | batch-64 cut / MACs cut |",
                "|---|---:|---:|---:|---:|"]
        for r1, r64 in zip(b1.rows[1:], b64.rows[1:]):
            out.append(f"| {r1.model} | {r1.macs_cut:.2%} | {r1.latency_cut:.1%} | {r64.latency_cut:.1%} "
                       f"| {r64.latency_cut / r64.macs_cut:.2f} |")
        out.append("")
    return out or ["(latency not run yet)"]


def latency_fit(config: Config, threads: int, batch: int) -> dict | None:
    """Least-squares fit over the original and every pruned model of
    latency = fixed + sum over stages of (blocks left in the stage) x (time per block of that stage),
    which says where the time goes: the part no block removal can cut, and what a block costs per stage."""
    import numpy as np

    from onnx_consensus import find_blocks

    from .common import original_model

    lat = load_result("latency", f"t{threads}-b{batch}-r30", config)
    if lat is None:
        return None
    blocks = find_blocks(original_model(config)).by_id()
    stages = sorted({b.stage for b in blocks.values()})
    total = {s: sum(1 for b in blocks.values() if b.stage == s) for s in stages}
    rows, ys = [], []
    for r in lat.rows:
        left = dict(total)
        if r.model != "original":
            crit, level = r.model.rsplit("-L", 1)
            for bid in load_result("prune", crit, config).order[:int(level)]:
                left[blocks[bid].stage] -= 1
        rows.append([1.0] + [left[s] for s in stages])
        ys.append(r.median_ms)
    coef, *_ = np.linalg.lstsq(np.array(rows), np.array(ys), rcond=None)
    pred = np.array(rows) @ coef
    return {"fixed_ms": float(coef[0]), "per_block_ms": {int(s): float(c) for s, c in zip(stages, coef[1:])},
            "original_ms": ys[0], "blocks_per_stage": total,
            "max_abs_residual_ms": float(np.abs(pred - np.array(ys)).max())}


def table_latency_fit(config: Config) -> list[str]:
    out = ["| threads, batch | original ms | fixed (not removable) | per block: stage 1 / 2 / 3 | "
           "fixed share | worst fit residual |", "|---|---:|---:|---:|---:|---:|"]
    for threads in (2, 1):
        for batch in (1, 64):
            f = latency_fit(config, threads, batch)
            if f is None:
                continue
            per = " / ".join(f"{v:.3f}" for v in f["per_block_ms"].values())
            out.append(f"| {threads}, {batch} | {f['original_ms']:.3f} | {f['fixed_ms']:.3f} ms | {per} ms | "
                       f"{f['fixed_ms'] / f['original_ms']:.1%} | {f['max_abs_residual_ms']:.3f} ms |")
    return out


def curve_budgets(config: Config) -> tuple[int, ...]:
    from .budget_curve import MULTI_EPOCH_BUDGETS

    return tuple(config.curve_budgets) + MULTI_EPOCH_BUDGETS


def table_curve(config: Config) -> list[str]:
    lv = max(config.levels)
    out = ["| images seen | epochs over | test top-1 | fine-tune s |", "|---:|---|---:|---:|"]
    for b in curve_budgets(config):
        r = load_result("finetune", unit_name("consensus", lv, "supervised", 0, b), config)
        if r:
            over = f"1 x first {b:,}" if b <= 60_000 else f"{b // 60_000} x all 60,000"
            out.append(f"| {b:,} | {over} | {pct(r.accuracy)} | {r.finetune_seconds:.0f} |")
    return out


def plots(config: Config) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    orig = load_result("prune", "original", config)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharey=False)
    for ax, mode in zip(axes, ("none", *MODES)):
        for name, crits in grouped(config):
            xs, ys = [0.0], [orig.accuracy * 100]
            for l in config.levels:
                runs = [load_result("prune", c, config) for c in crits]
                runs = [r for r in runs if r and r.levels]
                if not runs:
                    continue
                cut = runs[0].level(l).macs_cut
                if mode == "none":
                    accs = [r.level(l).accuracy for r in runs]
                else:
                    accs = [a for c in crits for a in ft_accuracies(c, l, mode, config.ft_seeds, config)]
                if accs:
                    xs.append(cut * 100)
                    ys.append(statistics.mean(accs) * 100)
            style = "-o" if crits[0] == "consensus" else "--."
            ax.plot(xs, ys, style, label=name, linewidth=2.2 if crits[0] == "consensus" else 1.2)
        ax.set_title({"none": "right after pruning", "supervised": f"supervised fine-tune ({config.train_images:,} images)",
                      "distillation": f"distillation ({config.train_images:,} images, no labels)"}[mode])
        ax.set_xlabel("MACs removed (%)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Fashion-MNIST test top-1 (%)")
    axes[0].legend(fontsize=8)
    fig.suptitle("ResNet-56, Fashion-MNIST: accuracy against MACs removed, per criterion")
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "paper_accuracy.png", dpi=90)
    plt.close(fig)

    lv = max(config.levels)
    pts = [(b, load_result("finetune", unit_name("consensus", lv, "supervised", 0, b), config))
           for b in curve_budgets(config)]
    pts = [(b, r.accuracy * 100) for b, r in pts if r]
    if pts:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.semilogx([b for b, _ in pts], [a for _, a in pts], "-o", label=f"Consensus, {lv} blocks removed")
        ax.axhline(orig.accuracy * 100, color="grey", linestyle=":", label="original")
        ax.set_xlabel("fine-tuning images seen (each budget its own run and cosine schedule)")
        ax.set_ylabel("test top-1 (%)")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(ROOT / "docs" / "paper_budget.png", dpi=90)
        plt.close(fig)


def render(config: Config) -> str:
    sections = [
        ("Table 1: test top-1 (%) right after pruning, no training", table_prune),
        (f"Table 2: test top-1 (%) after fine-tuning on {config.train_images:,} images (sup. = supervised, "
         "dis. = distillation; mean ± sd over seeds)", table_finetune),
        ("Table 2b: Consensus minus each single metric, percentage points, seed 0", table_consensus_vs_singles),
        ("Table 3: robustness, accuracy (%) on the first 1,000 test images", table_robustness),
        ("Table 4: onnxruntime latency against MACs (no fine-tuning; latency depends on the graph only)",
         table_latency),
        ("Table 4b: where the time goes (least-squares fit of the Table 4 latencies on blocks left per stage)",
         table_latency_fit),
        ("Table 5: Consensus, 21 blocks removed (-78.80% MACs), supervised, against the budget", table_curve),
    ]
    lines = [BEGIN, f"<!-- generated by python -m tools.paper.report from .cache/paper/{config.key()}/ -->", ""]
    for title, fn in sections:
        lines += [f"#### {title}", "", *fn(config), ""]
    lines.append(END)
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--print", action="store_true", help="print the tables instead of writing the docs")
    args = ap.parse_args(argv)
    text = render(CONFIG)
    if args.print:
        print(text)
        return
    doc = ROOT / "docs" / "BENCHMARKS.md"
    body = doc.read_text()
    if BEGIN in body:
        head, rest = body.split(BEGIN, 1)
        body = head + text + rest.split(END, 1)[1]
    else:
        body = body.rstrip("\n") + "\n\n" + text + "\n"
    doc.write_text(body)
    plots(CONFIG)
    print(f"wrote {doc} and docs/paper_*.png")


if __name__ == "__main__":
    main()
