"""Ray's cost per trial: the same trial config run directly (`run_phases`, no Ray) and as a one-trial search
(Ray Tune driver → Ray Train TorchTrainer → worker), in this one process.

Prints the time from trial start to its first reported metric under Ray, both wall times, and Ray's share
of the trial's wall time: (Ray − direct) / Ray. Goals (issue #3): ≤ 10 s to first metric, ≤ 3 % overhead for a
trial of a few minutes.

    python scripts/bench_search_overhead.py [--epochs 40] [--images 2000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import yaml
from ray import tune

from tune_xray.config import build_config
from tune_xray.data.loader import prepare
from tune_xray.phases import run_phases
from tune_xray.search import run_search


class FirstResult(tune.Callback):
    """Wall-clock times of a trial's start, its first result, and its end (driver side)."""

    def __init__(self):
        self.start = self.first = self.end = None

    def on_trial_start(self, iteration, trials, trial, **info):
        self.start = self.start or time.perf_counter()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.first = self.first or time.perf_counter()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.end = time.perf_counter()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=40)  # ≈ 2.5 min: "a trial of a few minutes"
    parser.add_argument("--images", type=int, default=2000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_search-"))
    base = {"data": {"synthetic_images": args.images, "synthetic_size": 96, "cache_size": 96, "cache_dir": str(work)},
            "augment": {"image_size": 80}, "model": {"backbone": "test_resnet"},
            "supervised": {"epochs": args.epochs, "batch_size": 32, "early_stopping_patience": None}}
    space = work / "bench.yaml"
    space.write_text(yaml.safe_dump({"budget": {"trials": 1, "epochs": args.epochs}, "base": base,
                                     "params": {"supervised.optimizer.lr": {"choice": [1.0e-3]}}}))
    prepare(build_config(base).data)  # data and cache built once, outside both timings

    first_direct = []
    start = time.perf_counter()
    run_phases(build_config(base), work / "direct",
               report=lambda m, c=None: first_direct.append(first_direct[0] if first_direct else time.perf_counter()))
    direct = time.perf_counter() - start
    first_direct = first_direct[0] - start

    timer = FirstResult()
    parsed = argparse.Namespace(
        study=str(space), data=None, trials=1, smoke=False, storage=str(work / "store"), local_dir="", name="bench",
        resume=False, workers_per_trial=1, cpus_per_trial=2.0, gpus_per_trial=0.0, address=None, tracking_uri=None,
        overrides=[], seed=0, max_failures=0, no_asha=True, verbose=False)
    start = time.perf_counter()
    run_search(parsed, extra_callbacks=[timer])
    whole = time.perf_counter() - start
    trial = timer.end - timer.start

    print(f"trial: test_resnet, {args.images} synthetic images at 80 px, {args.epochs} epochs, 2 CPUs")
    print(f"direct (run_phases, no Ray)          {direct:7.1f} s")
    print(f"Ray trial (Tune → Train → worker)    {trial:7.1f} s   (whole search incl. Ray start: {whole:.1f} s)")
    print(f"trial start → first reported metric  {timer.first - timer.start:7.1f} s   (direct: {first_direct:.1f} s, "
          f"so Ray adds {timer.first - timer.start - first_direct:.1f} s before the first epoch's report)")
    print(f"Ray's share of the trial's wall time {100 * (trial - direct) / trial:7.1f} %")


if __name__ == "__main__":
    main()
