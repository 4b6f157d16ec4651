"""What ASHA through the SSL phase saves, and what it costs in the result: the byol study's smoke space at a scale
where SSL decides the outcome, N trials per search with the same sampler seed, today's ASHA (fine-tune rungs only;
every trial pre-trains its whole BYOL budget) against ASHA through SSL (rungs in BYOL epochs judged on the probe,
then the fine-tune's), in this one process.

Why SSL matters here: the fine-tune trains the head alone (`supervised.freeze: head_only`) on test_resnet, trained
from scratch, so what a trial scores is what its BYOL phase learnt. The axes are the BYOL learning rate over three
decades (LARS; the high end collapses or diverges, the low end barely moves the random features) and the target
momentum: some configurations are measurably worse after fine-tuning, and the probe can see it early. The probe
runs in both searches (a weighted kNN, phases.probe) so that τ can be measured on today's, whose scheduler ignores
it: today's CPU-seconds include it (its share is printed by scripts/bench_probe.py). Collapse detection is off in
today's search and on in ours.

Printed per search and seed: SSL epochs trained, total trial-epochs (BYOL + fine-tune), CPU-seconds (the trials'
own wall time, one CPU each), the best validation mean AUROC with its selection-set 95 % CI, and — on today's
search, where every trial pre-trains fully — Kendall's τ between a trial's final probe and its final validation
value (completed trials), and the same τ for the probe at each SSL rung's epoch: how well a rung can rank. Goal
(issue 39): ≥ 3× fewer SSL epochs for a best validation value within the CI of today's.

    python scripts/bench_ssl_fidelity.py [--trials 12] [--seeds 3] [--byol-epochs 27] [--images 1000] [--ssl-grace 3]
        [--ssl-eta 3]

The defaults put SSL rungs at BYOL epochs 3, 9 and 27 of 27: the shape byol.yaml's budget gives S0's 100 epochs
(rungs at 10, 30 and 90).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna
import yaml
from scipy.stats import kendalltau

from tune_xray.pipeline import run_search
from tune_xray.request import SearchRequest


def space(args, through_ssl: bool) -> dict:
    budget = {"trials": args.trials, "epochs": args.finetune_epochs, "grace_period": 1, "reduction_factor": 3}
    if through_ssl:
        budget.update(ssl_grace_period=args.ssl_grace, ssl_reduction_factor=args.ssl_eta)
    collapse = {} if through_ssl else {"collapse_std": 0.0, "collapse_probes": 0}
    return {
        "metric": "val_mean_auroc",
        "budget": budget,
        "base": {"data": {"synthetic_images": args.images, "synthetic_size": 64, "cache_size": 64,
                          "val_fraction": 0.2},  # a selection set twice the default's: narrower CIs
                 "augment": {"image_size": 56}, "model": {"backbone": "test_resnet"},
                 "byol": {"enabled": True, "epochs": args.byol_epochs, "batch_size": 32, "hidden_dim": 64,
                          "out_dim": 32, "scheduler": {"name": "none"}},
                 "ssl": {"probe_images": 200, **collapse},
                 "supervised": {"batch_size": 32, "freeze": "head_only", "early_stopping_patience": None,
                                "optimizer": {"name": "adamw", "lr": 1.0e-2}}},
        "params": {"byol.optimizer.lr": {"loguniform": [1.0e-3, 3.0]},
                   "byol.ema_tau": {"choice": [0.9, 0.99, 0.996]}},
    }


def search(work: Path, name: str, spec: dict, seed: int) -> dict:
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    request = SearchRequest(str(path), storage=str(work / "runs"), local_dir="", name=name, gpus_per_trial=0.0,
                            max_failures=0, seed=seed, no_ensemble=True, no_report=True)
    start = time.perf_counter()
    summary = run_search(request)
    wall = time.perf_counter() - start
    rows, exp = summary["rows"], Path(summary["experiment_dir"])
    seconds = 0.0
    for row in rows:
        result = next(exp.glob(f"{row['trial']}-*/result.json"), None)
        lines = result.read_text().strip().splitlines() if result else []
        seconds += float(json.loads(lines[-1]).get("time_total_s", 0.0)) if lines else 0.0
    ssl = int(sum(r.get("ssl_epochs_done") or 0 for r in rows))
    fine = int(sum(r.get("epochs_done") or 0 for r in rows))
    best = summary["best"]
    return {"search": name, "seed": seed, "ssl_epochs": ssl, "trial_epochs": ssl + fine, "cpu_s": seconds,
            "wall_s": wall, "best_val": best["best_val_mean_auroc"], "ci": best["selection_ci"],
            "statuses": {s: summary[s] for s in ("complete", "pruned", "collapsed", "diverged") if summary.get(s)},
            "tau": probe_tau(exp, name, rows), "experiment": str(exp)}


def probe_tau(exp: Path, name: str, rows: list[dict], epoch: int | None = None) -> float | None:
    """Kendall's τ between each completed trial's probe (Optuna's ssl_probe attribute) at BYOL `epoch` (None: its
    last) and its best validation value."""
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{exp / 'optuna.db'}")
    by_number = {t.number: t for t in study.trials}
    pairs = []
    for row in rows:
        trial = by_number.get(int(row["trial"][1:]))
        curve = (trial.user_attrs.get("ssl_probe") if trial else None) or {}
        at = str(epoch) if epoch is not None else max(curve, key=int, default=None)
        if row["status"] == "complete" and at in curve:
            pairs.append((curve[at], row["best_val_mean_auroc"]))
    if len(pairs) < 3:
        return None
    return float(kendalltau(*zip(*pairs)).statistic)


def rungs(args) -> list[int]:
    """The BYOL epochs at which ASHA through SSL judges the probe: the grace period, × the reduction factor."""
    out, epoch = [], args.ssl_grace
    while epoch < args.byol_epochs:
        out.append(epoch)
        epoch *= args.ssl_eta
    return out


def row_text(r: dict) -> str:
    ci = f"{r['best_val']:.4f} [{r['ci'][0]:.4f}, {r['ci'][1]:.4f}]"
    tau = "" if r["tau"] is None else f"{r['tau']:+.2f}"
    return (f"{r['search']:16s} {r['ssl_epochs']:10d} {r['trial_epochs']:12d} {r['cpu_s']:7.0f} {ci:>28s} "
            f"{tau:>13s}  {r['statuses']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--byol-epochs", type=int, default=27)
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--ssl-grace", type=int, default=3, help="budget.ssl_grace_period of the through-SSL search")
    parser.add_argument("--ssl-eta", type=int, default=3, help="its budget.ssl_reduction_factor")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="bench_ssl_fidelity-"))
    results = []
    for seed in range(args.seeds):
        for name, through in (("today", False), ("through-ssl", True)):
            results.append(search(work, f"{name}-s{seed}", space(args, through), seed))
            print(f"done: {row_text(results[-1])}", flush=True)  # a run cut short still has its finished searches
    print(f"\ntask: synthetic NIH ({args.images} images, 14 labels), test_resnet from scratch at 56 px, BYOL "
          f"{args.byol_epochs} epochs, then the head alone for {args.finetune_epochs} epochs; {args.trials} trials "
          f"per search, axes byol.optimizer.lr (LARS, 1e-3 … 3) and byol.ema_tau; SSL rungs every ×{args.ssl_eta} "
          f"from BYOL epoch {args.ssl_grace}")
    print(f"{'search':16s} {'SSL epochs':>10s} {'trial-epochs':>12s} {'CPU-s':>7s} {'best val mAUROC [95 % CI]':>28s} "
          f"{'τ(probe, val)':>13s}  statuses")
    for r in results:
        print(row_text(r))
    pairs = list(zip(results[::2], results[1::2]))
    within = [t["ci"][0] <= o["best_val"] for t, o in pairs]
    ratios = [t["ssl_epochs"] / max(o["ssl_epochs"], 1) for t, o in pairs]
    taus = [t["tau"] for t, _ in pairs if t["tau"] is not None]
    print(f"SSL epochs, today / through SSL: {', '.join(f'{x:.1f}×' for x in ratios)} (mean {np.mean(ratios):.1f}×; "
          f"goal ≥ 3×)")
    cpu = [t["cpu_s"] / max(o["cpu_s"], 1e-9) for t, o in pairs]
    print(f"CPU-seconds, today / through SSL: {', '.join(f'{x:.1f}×' for x in cpu)}")
    print(f"best val through SSL within today's 95 % CI (at or above its lower end): {sum(within)} of {len(pairs)} "
          f"seeds")
    if taus:
        print(f"Kendall τ (final probe vs final val, today's completed trials): {', '.join(f'{t:+.2f}' for t in taus)}")
    for epoch in rungs(args):  # what a rung sees: the probe there against the end (today's: every trial has both)
        at = [probe_tau(Path(t["experiment"]), t["search"], json.loads(
            (Path(t["experiment"]) / "summary.json").read_text())["rows"], epoch) for t, _ in pairs]
        print(f"Kendall τ (probe at BYOL epoch {epoch}, a rung, vs final val): "
              f"{', '.join('n/a' if t is None else f'{t:+.2f}' for t in at)}")
    (work / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"results: {work / 'results.json'}")


if __name__ == "__main__":
    main()
