"""The verdicts, table and plot of ``make bench-quality`` (:mod:`benchmarks.quality`).

Curves are averaged over seeds step by step; "second half" is every evaluation after ``steps / 2``.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

CURVES = ("ours_model", "ours_ema", "upstream_model", "upstream_ema")
#: Our EMA may trail our trained weights by at most this much from :data:`EMA_FROM_STEP` on (issue target).
EMA_GAP_DB, EMA_FROM_STEP = 0.5, 100


def mean_curve(seeds: list[dict[str, Any]], name: str, key: str) -> list[tuple[int, float]]:
    """``(step, mean over seeds)`` at the steps every seed evaluated."""
    per_seed = [{p["step"]: p[key] for p in s["curves"][name]} for s in seeds]
    steps = sorted(set.intersection(*(set(d) for d in per_seed)))
    return [(st, statistics.fmean(d[st] for d in per_seed)) for st in steps]


def second_half(seeds: list[dict[str, Any]], name: str, steps: int) -> float:
    return statistics.fmean(v for st, v in mean_curve(seeds, name, "psnr") if st > steps / 2)


def verdicts(seeds: list[dict[str, Any]], steps: int) -> dict[str, Any]:
    trained = {side: second_half(seeds, f"{side}_model", steps) for side in ("ours", "upstream")}
    exported = {side: statistics.fmean(s["exported"][side]["psnr"] for s in seeds) for side in ("ours", "upstream")}
    gaps = [
        (p["step"], m["psnr"] - p["psnr"])
        for s in seeds
        for m, p in zip(s["curves"]["ours_model"], s["curves"]["ours_ema"])
        if p["step"] >= EMA_FROM_STEP
    ]
    worst = max(gaps, key=lambda g: g[1]) if gaps else (0, 0.0)
    return {
        "trained_second_half_psnr": trained,
        "trained_ok": trained["ours"] >= trained["upstream"],
        "exported_psnr": exported,
        "exported_ok": exported["ours"] >= exported["upstream"],
        "ema_worst_gap_db": worst[1],
        "ema_worst_gap_step": worst[0],
        "ema_ok": worst[1] <= EMA_GAP_DB,
    }


def plot(seeds: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    style = {"ours_model": "C0-", "ours_ema": "C0--", "upstream_model": "C3-", "upstream_ema": "C3--"}
    label = {
        "ours_model": "ours, trained",
        "ours_ema": "ours, EMA",
        "upstream_model": "magvit2-pytorch trainer, trained",
        "upstream_ema": "magvit2-pytorch trainer, EMA",
    }
    for name in CURVES:
        for ax, key in ((a, "psnr"), (b, "codebook_usage")):
            xs, ys = zip(*mean_curve(seeds, name, key))
            ax.plot(xs, [100 * y for y in ys] if key == "codebook_usage" else ys, style[name], label=label[name])
    a.set(xlabel="step", ylabel="held-out PSNR (dB)", title=title)
    b.set(xlabel="step", ylabel="FSQ codebook used (%)", title="codebook usage, held-out clips")
    a.legend(fontsize=8)
    a.grid(alpha=0.3)
    b.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(result: dict[str, Any], png: Path) -> bool:
    """Prints the table and the verdicts, draws the plot; False when a verdict failed."""
    seeds, setup = result["seeds"], result["setup"]
    cols = {n: {k: dict(mean_curve(seeds, n, k)) for k in ("psnr", "ssim", "codebook_usage")} for n in CURVES}
    print(
        f"\n{result['experiment']}, {len(seeds)} seed(s), {setup['steps']} steps, batch {setup['batch']}, "
        f"lr {setup['lr']}, device {result['device']}; held-out PSNR dB / SSIM / codebook used %"
    )
    print(f"{'step':>6} | {'ours trained':>20} | {'ours EMA':>20} | {'upstream trained':>20} | {'upstream EMA':>20}")
    for st in sorted(cols["ours_model"]["psnr"]):
        cells = []
        for n in CURVES:
            c = cols[n]
            cells.append(
                f"{c['psnr'][st]:6.2f} {c['ssim'][st]:.3f} {100 * c['codebook_usage'][st]:5.1f}"
                if st in c["psnr"]
                else f"{'-':>20}"
            )
        print(f"{st:>6} | " + " | ".join(f"{x:>20}" for x in cells))
    secs = {side: statistics.fmean(s["step_secs"][side] for s in seeds) for side in ("ours", "upstream")}
    s0 = seeds[0]
    print(
        f"seconds per step (median): ours {secs['ours']:.3f}, upstream {secs['upstream']:.3f} "
        f"(its discriminator optimizer stepped {s0['upstream_discr_optimizer_steps']} times in "
        f"{s0['upstream_steps']} steps; its generator LR {s0['upstream_lr']:g})"
    )
    plot(seeds, png, f"{result['experiment']}: held-out PSNR")
    v = result["verdicts"]
    if not v:
        return True
    t, e = v["trained_second_half_psnr"], v["exported_psnr"]
    rows = [
        ("trained weights, mean PSNR of the second half", t["ours"], t["upstream"], v["trained_ok"]),
        ("what each hands out (final EMA), PSNR", e["ours"], e["upstream"], v["exported_ok"]),
    ]
    for what, ours, up, ok in rows:
        verdict = "PASS" if ok else "FAIL"
        print(f"{verdict}  {what}: ours {ours:.2f} dB, upstream {up:.2f} dB (target: ours >= upstream)")
    print(
        f"{'PASS' if v['ema_ok'] else 'FAIL'}  our EMA behind our trained weights from step {EMA_FROM_STEP}: at most "
        f"{v['ema_worst_gap_db']:.2f} dB (step {v['ema_worst_gap_step']}; target <= {EMA_GAP_DB} dB)"
    )
    return bool(v["trained_ok"] and v["exported_ok"] and v["ema_ok"])
