"""What the search saves: a full grid (every combination at full budget, no early stopping) vs TPE + ASHA on the
same axes, as real tune_xray searches, in this one process.

Task: synthetic NIH-format data (multi-label, 14 findings), timm's test_resnet at 56 px. Axes (3 × 3 × 3 = 27):
fine-tune LR, weight decay, LR schedule. Reported per search: the best validation mean AUROC reached, trial-epochs
spent (fine-tune epochs summed over trials), wall time. The grid's seed noise: its best configuration run again
with new seeds (tune_xray.repeat), sd over the seeds. Goal (issue #13): TPE + ASHA reach the grid's best within
that noise with ≤ 1/5 of the grid's trial-epochs. TPE runs as shipped (independent, 10 random start-up trials)
and with Optuna's options for parallel TPE (multivariate, constant_liar, fewer start-up trials).

    python scripts/bench_search_efficiency.py [--epochs 6] [--trials 14] [--images 2000]
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from tune_xray.experiment import Experiment
from tune_xray.pipeline import run_search
from tune_xray.repeat import run_repeats
from tune_xray.request import SearchRequest

AXES = {"supervised.optimizer.lr": [3.0e-4, 2.0e-3, 1.0e-2],
        "supervised.optimizer.weight_decay": [0.0, 1.0e-3, 5.0e-2],
        "supervised.scheduler.name": ["none", "cosine", "step"]}


def space(epochs: int, trials: int, images: int, grid: bool, sampler: dict | None = None) -> dict:
    out = {
        "metric": "val_mean_auroc",
        "budget": {"trials": trials, "epochs": epochs, "grace_period": 1, "reduction_factor": 3},
        "base": {"data": {"synthetic_images": images, "synthetic_size": 64, "cache_size": 64},
                 "augment": {"image_size": 56}, "model": {"backbone": "test_resnet"},
                 "supervised": {"batch_size": 32, "early_stopping_patience": None,
                                "scheduler": {"t_max": epochs, "step_size": max(1, epochs // 3)}}},
        "params": {key: {"choice": values} for key, values in AXES.items()},
    }
    if grid:  # every combination, evaluated first (and only: trials = 27)
        out["warm_start"] = [dict(zip(AXES, combo)) for combo in itertools.product(*AXES.values())]
    if sampler:
        out["sampler"] = sampler
    return out


def search(work: Path, name: str, spec: dict, no_asha: bool) -> dict:
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    request = SearchRequest(str(path), storage=str(work / "runs"), local_dir="", name=name, gpus_per_trial=0.0,
                            max_failures=0, no_asha=no_asha, no_ensemble=True, no_report=True)
    start = time.perf_counter()
    summary = run_search(request)
    rows = summary["rows"]
    return {"search": name, "trials": len(rows), "trial_epochs": int(sum(r["epochs_done"] or 0 for r in rows)),
            "best_val": summary["best"]["best_val_mean_auroc"], "best": summary["best"]["name"],
            "wall_s": time.perf_counter() - start, "dir": summary["experiment_dir"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--trials", type=int, default=14, help="TPE + ASHA trials")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--seeds", type=int, default=2, help="new seeds of the grid's best, for its noise")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_efficiency-"))
    n_grid = int(np.prod([len(v) for v in AXES.values()]))
    results = [search(work, "grid", space(args.epochs, n_grid, args.images, grid=True), no_asha=True)]
    noise = run_repeats(Experiment.at(results[0]["dir"]), top=1, seeds=args.seeds)["rows"][0]
    for name, sampler in (("tpe-asha", None),
                          ("tpe-asha-multivariate-liar", {"multivariate": True, "constant_liar": True,
                                                          "n_startup_trials": 4})):
        results.append(search(work, name, space(args.epochs, args.trials, args.images, False, sampler), False))
    grid = results[0]
    print(f"\ntask: synthetic NIH ({args.images} images, 14 labels), test_resnet at 56 px, {args.epochs} epochs; "
          f"axes {', '.join(f'{k} {v}' for k, v in AXES.items())}")
    print(f"grid best's seed noise: {noise['mean']:.4f} ± {noise['sd']:.4f} over {noise['seeds']} seeds "
          f"({', '.join(f'{v:.4f}' for v in noise['values'])})")
    print(f"{'search':28s} {'trials':>6s} {'trial-epochs':>12s} {'share of grid':>13s} {'best val mAUROC':>15s} "
          f"{'gap to grid':>11s} {'wall':>7s}")
    for r in results:
        share = r["trial_epochs"] / grid["trial_epochs"]
        print(f"{r['search']:28s} {r['trials']:6d} {r['trial_epochs']:12d} {share:13.2f} "
              f"{r['best_val']:15.4f} {r['best_val'] - grid['best_val']:+11.4f} {r['wall_s']:6.0f}s   {r['best']}")
    for r in results[1:]:
        gap = (grid["best_val"] - r["best_val"]) / noise["sd"]
        print(f"{r['search']}: {gap:.1f} sd of the grid best's seed noise below the grid's best "
              f"({'within' if gap <= 1 else 'outside'} 1 sd; the grid best's own seed mean is {noise['mean']:.4f}), "
              f"with {r['trial_epochs'] / grid['trial_epochs']:.2f} of its trial-epochs (goal ≤ 0.20)")
    (work / "results.json").write_text(json.dumps({"results": results, "noise": noise}, indent=1, default=str))
    print(f"results: {work / 'results.json'}")


if __name__ == "__main__":
    main()
