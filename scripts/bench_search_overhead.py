"""Ray's cost per trial: the same trial config run directly (`run_phases`, no Ray) and as a one-trial search in
both ways a one-worker trial can run (`--one-worker-trials`): trainer (Ray Tune trial → Ray Train TorchTrainer →
worker actor) and tune (the Tune trial trains in its own process), in this one process.

Prints the time from trial start to its first reported metric under Ray, both wall times, and Ray's share
of the trial's wall time: (Ray − direct) / Ray. Goals (issue #3): ≤ 10 s to first metric, ≤ 3 % overhead for a
trial of a few minutes. Then where the CPU went while the trial trained (Linux): its worker's share of the
cores, and that of every other process — on a small machine, what Ray's own processes take from training.

    python scripts/bench_search_overhead.py [--epochs 40] [--images 2000] [--modes trainer,tune]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import yaml
from ray import tune

from tune_xray.config import build_config
from tune_xray.data.loader import prepare
from tune_xray.phases import run_phases
from tune_xray.pipeline import run_search
from tune_xray.request import SearchRequest


def cpu_seconds() -> dict[int, float]:
    """CPU seconds (user + system) so far of every process on this machine, by pid."""
    ticks, out = os.sysconf("SC_CLK_TCK"), {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(pid)] = (int(fields[11]) + int(fields[12])) / ticks
    return out


class FirstResult(tune.Callback):
    """Wall-clock times of a trial's start, its first result, and its end (driver side), and the CPU each
    process used between the second and the last result (the worker is gone by the trial's end)."""

    def __init__(self):
        self.start = self.first = self.end = None
        self.results, self.window = 0, []

    def on_trial_start(self, iteration, trials, trial, **info):
        self.start = self.start or time.perf_counter()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.first = self.first or time.perf_counter()
        self.results += 1
        if self.results >= 2:
            snapshot = (time.perf_counter(), cpu_seconds())
            self.window = [self.window[0] if self.window else snapshot, snapshot]

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.end = time.perf_counter()

    def cpu_shares(self) -> tuple[float, float, float]:
        """Over the window: its wall seconds, the CPU share of the busiest process (the trial's worker) and
        that of every other process together, each as a share of the machine's cores."""
        (t0, before), (t1, after) = self.window
        used = sorted((cpu - before.get(pid, 0.0) for pid, cpu in after.items()), reverse=True)
        capacity = (t1 - t0) * os.cpu_count()
        return t1 - t0, used[0] / capacity, sum(used[1:]) / capacity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=40)  # ≈ 2.5 min: "a trial of a few minutes"
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--modes", default="trainer,tune", help="--one-worker-trials values, in this order")
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

    print(f"trial: test_resnet, {args.images} synthetic images at 80 px, {args.epochs} epochs, 2 CPUs")
    print(f"direct (run_phases, no Ray)          {direct:7.1f} s   (first report after {first_direct:.1f} s)")
    what = {"trainer": "Tune → Train → worker", "tune": "the Tune trial trains itself"}
    for mode in args.modes.split(","):  # the first starts Ray; run both orders to see what that costs
        timer = FirstResult()
        request = SearchRequest(str(space), trials=1, storage=str(work / "store"), local_dir="", name=f"bench-{mode}",
                                cpus_per_trial=2.0, gpus_per_trial=0.0, max_failures=0, no_asha=True,
                                one_worker_trials=mode, no_ensemble=True)
        start = time.perf_counter()
        run_search(request, extra_callbacks=[timer])
        whole = time.perf_counter() - start
        trial = timer.end - timer.start
        print(f"\n--one-worker-trials {mode} ({what[mode]})")
        print(f"  trial wall time                    {trial:7.1f} s   (whole search incl. Ray start: {whole:.1f} s)")
        print(f"  trial start → first reported metric {timer.first - timer.start:6.1f} s   (Ray adds "
              f"{timer.first - timer.start - first_direct:.1f} s before the first epoch's report)")
        print(f"  Ray's share of the trial's wall time {100 * (trial - direct) / trial:6.1f} %")
        if len(timer.window) == 2 and timer.window[1][0] > timer.window[0][0] and Path("/proc").is_dir():  # 2+ results
            seconds, worker, others = timer.cpu_shares()
            print(f"  CPU over {seconds:.0f} s of epochs: the training process {100 * worker:.1f} %, every other "
                  f"process (Ray's daemons and actors, the Tune driver) {100 * others:.1f} % of {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
