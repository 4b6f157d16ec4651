"""`python -m tune_xray.train [--config FILE] [--set key=value ...] [--print-config]`: one run, no Ray.

Runs one trial config (BYOL when `byol.enabled`, then supervised fine-tuning) on the embedded synthetic
dataset unless `data.source` names other data; prints one line per epoch and a final summary, and writes
a run directory with config.yaml, summary.json, best.pt and val/test predictions.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import yaml

from .config import ConfigError, load_config
from .data.splits import DataError
from .models import WeightsError


def format_epoch(metrics: dict) -> str:
    keep = ("phase", "epoch", "train_loss", "val_loss", "val_mean_auroc", "val_accuracy", "byol_loss",
            "byol_val_loss", "z_std", "ema_tau", "lr")
    parts = []
    for k in keep:
        if k in metrics:
            v = metrics[k]
            parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return "  ".join(parts)


def print_report(metrics: dict, checkpoint_dir: str | None = None) -> None:
    print(format_epoch(metrics), flush=True)


def print_summary(summary: dict) -> None:
    def fmt(m: dict) -> str:
        keys = ("mean_auroc", "macro_f1", "accuracy", "mean_sensitivity", "mean_specificity")
        return "  ".join(f"{k}={m[k]:.4f}" for k in keys if k in m and not math.isnan(m[k]))

    sup = summary["supervised"]
    print(f"selected epoch {sup['best_epoch']} of {sup['epochs_run']} (on validation)")
    print(f"val : {fmt(summary['val'])}")
    if summary["test"]:
        print(f"test: {fmt(summary['test'])}  (thresholds from val; test never used for selection)")
    else:
        print("test: predictions stored, not scored (supervised.record_test: true scores them)")
    for split in ("val", "test"):
        if sup.get(f"{split}_skipped_labels"):
            print(f"{split}: AUROC skipped for labels with one class only: {sup[f'{split}_skipped_labels']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tune_xray.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file of TrialConfig sections (data, augment, model, byol, ...)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, e.g. --set supervised.optimizer.lr=1e-4 (repeatable)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--run-dir", help="default: OUTPUT_DIR/<backbone>-<timestamp>")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
        return 0
    from .phases import run_phases
    from .phases.common import Diverged

    run_dir = Path(args.run_dir or Path(cfg.output_dir) / f"{cfg.model.backbone}-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        summary = run_phases(cfg, run_dir, report=print_report)
    except (ConfigError, DataError, WeightsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Diverged as err:  # a result of the configuration, not a crash: one line
        print(f"diverged: {err} (run dir: {run_dir})", file=sys.stderr)
        return 1
    print_summary(summary)
    print(f"run dir: {run_dir}  ({summary['wall_time_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
