"""A Pareto search's front under three schedulers, same study and seed: multi-objective ASHA (promotion by
non-dominated sorting on every objective; Schmucker et al. 2021), ASHA on the validation metric alone, and no ASHA.
Prints each front (trial, metric, latency) and its hypervolume — the area the front dominates up to a reference
point (the metric at chance, 0.5 AUROC; the largest latency any run measured, ×1.1) — and the epochs each search
trained. Accuracy-only ASHA stops cheap, less accurate trials at the first rung, so the front loses its cheap end;
MO-ASHA keeps it.

    python scripts/compare_pareto_asha.py [--study deploy] [--seed 0] [--seeds 5] [--trials 9] [--epochs 4]

Each search is `python -m tune_xray.search STUDY --smoke` in a process of its own (its Ray, its stores) under a
temporary directory. Latency is each trial's own measurement at its first epoch's end: on a shared CPU it varies by
tens of percent between runs of one configuration, so read the fronts, not the third digit.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tune_xray.metrics import pareto_front  # noqa: E402

SCHEDULERS = {"MO-ASHA": ["--asha-on", "objectives"], "ASHA on the metric": ["--asha-on", "metric"],
              "no ASHA": ["--no-asha"]}


def hypervolume_2d(points: np.ndarray, reference: tuple[float, float]) -> float:
    """Area dominated by `points` (metric to maximise, cost to minimise) up to `reference` (metric, cost)."""
    kept = points[(points[:, 0] > reference[0]) & (points[:, 1] < reference[1])]
    area, best = 0.0, reference[0]
    for metric, cost in sorted(kept.tolist(), key=lambda p: p[1]):  # cheapest first: each adds a strip
        if metric > best:
            area += (metric - best) * (reference[1] - cost)
            best = metric
    return area


def search(study: str, label: str, flags: list[str], seed: int, trials: int, epochs: int, work: Path) -> dict:
    name = label.replace(" ", "-").lower()
    command = [sys.executable, "-m", "tune_xray.search", study, "--smoke", "--name", name, "--seed", str(seed),
               "--trials", str(trials), "--set", f"supervised.epochs={epochs}", "--storage", str(work),
               "--no-ensemble", "--no-report", *flags]
    done = subprocess.run(command, cwd=work, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{label}: exit {done.returncode}\n{done.stderr[-3000:]}")
    return json.loads((work / name / "summary.json").read_text())


def compare(study: str, seed: int, trials: int, epochs: int, work: Path) -> dict[str, float]:
    """One seed: each scheduler's search, its front printed; returns each scheduler's hypervolume, all three up to
    the same reference point (the metric at chance; the largest latency any of them measured, ×1.1)."""
    runs = {label: search(study, label, flags, seed, trials, epochs, work) for label, flags in SCHEDULERS.items()}
    metric = next(iter(runs.values()))["metric"]
    points = {label: np.array([[r[metric], r["cost"]["latency_ms"]] for r in s["rows"]
                               if r["status"] == "complete" and r.get("cost")]) for label, s in runs.items()}
    reference = (0.5, 1.1 * max(p[:, 1].max() for p in points.values() if len(p)))
    print(f"\n{study} --smoke, seed {seed}, {trials} trials of {epochs} epochs; hypervolume of "
          f"{metric} (max) and latency_ms (min) up to ({reference[0]}, {reference[1]:.2f} ms)")
    volumes = {}
    for label, summary in runs.items():
        front = points[label][pareto_front(points[label], ["max", "min"])] if len(points[label]) else points[label]
        epochs_run = sum(r.get("epochs_done") or 0 for r in summary["rows"])
        volumes[label] = hypervolume_2d(front, reference)
        print(f"  {label:>20s}: {summary['complete']} complete, {summary['pruned']} pruned, {epochs_run} epochs "
              f"trained; front of {len(front)}: "
              + ", ".join(f"({m:.3f}, {ms:.2f} ms)" for m, ms in sorted(front.tolist(), key=lambda p: p[1]))
              + f"; hypervolume {volumes[label]:.4f}")
    return volumes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", default="deploy")
    parser.add_argument("--seed", type=int, default=0, help="the first seed")
    parser.add_argument("--seeds", type=int, default=1, help="how many seeds, from --seed on")
    parser.add_argument("--trials", type=int, default=9)
    parser.add_argument("--epochs", type=int, default=4, help="each trial's budget (rungs at 1 and 3 with η 3)")
    args = parser.parse_args()
    volumes = {label: [] for label in SCHEDULERS}
    with tempfile.TemporaryDirectory(prefix="pareto-asha-") as tmp:
        for seed in range(args.seed, args.seed + args.seeds):
            work = Path(tmp) / f"seed{seed}"
            work.mkdir()
            for label, volume in compare(args.study, seed, args.trials, args.epochs, work).items():
                volumes[label].append(volume)
    print(f"\nhypervolume over {args.seeds} seed(s) ({args.seed}–{args.seed + args.seeds - 1}), mean ± sd:")
    baseline = np.array(volumes["no ASHA"])
    for label, values in volumes.items():
        sd = f" ± {np.std(values, ddof=1):.4f}" if len(values) > 1 else ""
        ratio = np.array(values) / baseline  # within a seed all three share the reference point: comparable
        ratio_sd = f" ± {np.std(ratio, ddof=1):.3f}" if len(values) > 1 else ""
        print(f"  {label:>20s}: {np.mean(values):.4f}{sd}  ({', '.join(f'{v:.4f}' for v in values)}); "
              f"of no ASHA's: {np.mean(ratio):.3f}{ratio_sd}")
    print("(each seed's reference point is its own largest latency ×1.1, so raw hypervolumes differ by seed; the "
          "ratio to no ASHA on the same seed compares the schedulers)")


if __name__ == "__main__":
    main()
