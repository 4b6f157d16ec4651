"""`python -m tune_xray.search STUDY`: a search-space file run as Ray Tune + Optuna (TPE) + ASHA, each trial
trained in its Tune trial (a Ray Train run when it has several DDP ranks), every trial an MLflow child run.
Optimises the study's validation metric (default val mean AUROC, max); trials store their test predictions, and
test is read once, at the end, for the record of the ensemble, the best single trial and the top-K.

    python -m tune_xray.search byol --smoke                 # the BYOL ablation at tiny scale (CPU, minutes)
    python -m tune_xray.search byol --data nih:/data/nih --gpus-per-trial 1 --cpus-per-trial 8
    python -m tune_xray.search byol --resume                # continue an interrupted search
"""

# tune_xray.search's command line: its help (the docstring above, as `--help` prints it) and its options, parsed
# here without loading what runs a search (Ray, Optuna): the benches and the tests parse it too

from __future__ import annotations

import argparse

from .request import EXTERNAL_SPLITS, default


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The docstring as written, and every option's default where its help does not already say it."""

    def _get_help_string(self, action):
        text = action.help or ""
        shown = action.default is not None and action.default is not False and action.default != [] \
            and action.default is not argparse.SUPPRESS
        if action.option_strings and shown and "default" not in text:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tune_xray.search", description=__doc__,
                                     formatter_class=HelpFormatter,
                                     epilog="python -m tune_xray.search STUDY --help also lists that study's space.")
    parser.add_argument("study", help="a file stem in search_spaces/ (byol, supervised, ...) or a YAML path")
    parser.add_argument("--data", help="synthetic (default) | nih:PATH | folder:PATH | medmnist:PATH.npz | csv:PATH | "
                        "chexpert:DIR | mimic:DIR")
    parser.add_argument("--trials", type=int, help="number of trials (default: the file's budget)")
    parser.add_argument("--smoke", action="store_true", help="tiny data, image size, epochs and test_* backbone")
    parser.add_argument("--storage", default=default("storage"),
                        help="experiment storage: a directory or s3://, gs://")
    parser.add_argument("--local-dir", default=default("local_dir"), help="where optuna.db and mlflow.db live "
                        "when --storage is a URI")
    parser.add_argument("--name", help="experiment name (default: the study name)")
    parser.add_argument("--resume", nargs="?", const=True, default=default("resume"), metavar="NAME",
                        help="continue the interrupted search NAME (default: --name, or the study's name) as it "
                        "was started")
    parser.add_argument("--workers-per-trial", type=int, default=default("workers_per_trial"),
                        help="Ray Train workers (DDP ranks) per trial")
    parser.add_argument("--cpus-per-trial", type=float, default=default("cpus_per_trial"),
                        help="CPUs each trial reserves: its process and, on a GPU, its data loader's workers")
    parser.add_argument("--one-worker-trials", choices=["tune", "trainer"], default=default("one_worker_trials"),
                        help="a one-worker trial trains in the Tune trial's own process (tune: no Ray Train worker "
                        "group to start) or as a Ray Train run (trainer); two or more workers are always a Train run")
    parser.add_argument("--gpus-per-trial", type=float, default=default("gpus_per_trial"),
                        help="default: 1 when the cluster has a GPU when the search starts, else 0 (an autoscaling "
                        "cluster whose GPU workers start from 0: pass it); fractions pack trials onto a GPU")
    parser.add_argument("--max-concurrent", type=int, default=default("max_concurrent"), metavar="N",
                        help="at most N trials at once, N waiting for resources (an autoscaler sees them all); "
                        "default: as many as the cluster holds, read again as it grows, and one waiting")
    parser.add_argument("--max-pending", type=int, default=default("max_pending"), metavar="N",
                        help="at most N trials waiting for resources beyond those running (an autoscaler adds nodes "
                        "for them); default: as many as one new node like the cluster's largest can start")
    parser.add_argument("--address", help="a Ray cluster to join (host:port, or auto: the one `ray start` recorded "
                        "here); default: RAY_ADDRESS, else a `ray start` cluster on this machine, else a Ray of the "
                        "search's own — never another search's")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite in the experiment dir; on a "
                        "cluster, an MLflow server http://…)")
    parser.add_argument("--optuna-storage", help="Optuna storage: a database URL (postgresql://…) or journal:PATH "
                        "(default: sqlite in the experiment dir)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="fixed override on every trial, e.g. --set supervised.batch_size=64")
    parser.add_argument("--seed", type=int, default=default("seed"), help="TPE sampler seed")
    parser.add_argument("--max-failures", type=int, default=default("max_failures"),
                        help="retries per trial (Tune and Train)")
    parser.add_argument("--no-asha", action="store_true", help="run every trial to its own end")
    parser.add_argument("--asha-on", choices=["objectives", "metric"], default=default("asha_on"),
                        help="a Pareto search's ASHA: promote by non-dominated sorting on every objective "
                        "(multi-objective ASHA), or on the validation metric alone")
    parser.add_argument("--ensemble-size", type=int, default=default("ensemble_size"),
                        help="Caruana ensemble size chosen on val at the end")
    parser.add_argument("--no-ensemble", action="store_true", help="end with the leaderboard, no ensemble")
    parser.add_argument("--latency-budget", type=float, metavar="MS", help="the ensemble adds members only while "
                        "their measured latencies (ms per image, batch 1) sum to at most MS (default: the study "
                        "file's `ensemble:`)")
    parser.add_argument("--params-budget", type=float, metavar="M", help="... and their parameters to at most M "
                        "million")
    parser.add_argument("--repeats", type=int, default=default("repeats"), metavar="K", help="then run the best "
                        "--repeat-top "
                        "configurations again with K new seeds each (full budget, no ASHA): mean ± sd over seeds")
    parser.add_argument("--repeat-top", type=int, default=default("repeat_top"), metavar="N",
                        help="how many of the best configurations --repeats re-runs")
    parser.add_argument("--cv-folds", type=int, default=default("cv_folds"), metavar="K", help="then train the best "
                        "--cv-top "
                        "configurations on K patient-grouped folds of train + val each (full budget, no ASHA; test "
                        "untouched): mean ± sd over folds, out-of-fold predictions, and an ensemble chosen on them")
    parser.add_argument("--cv-top", type=int, default=default("cv_top"), metavar="N",
                        help="how many of the best configurations --cv-folds cross-validates")
    parser.add_argument("--no-report", action="store_true",
                        help="no report.html at the end (python -m tune_xray.report)")
    parser.add_argument("--record-test-per-trial", action="store_true",
                        help="also score each trial on test (record_test_* in its run); by default test is read "
                        "once, at the end, for the record of the ensemble, the best single trial and the top-K")
    parser.add_argument("--external", action="append", default=[], metavar="SPEC",
                        help="a data source from elsewhere (any --data spec; repeatable): after every choice the "
                        "search's registered model is recorded on it once — labels matched by name, AUROC with 95 %% "
                        "patient-bootstrap intervals — in summary.json, the report and the model version; nothing "
                        "that selects reads it")
    parser.add_argument("--external-split", choices=EXTERNAL_SPLITS, default=default("external_split"),
                        help="which of each external source's images are recorded: all (default), or one split")
    parser.add_argument("--verbose", action="store_true", help="show the trials' own output")
    return parser


def named_study(parser: argparse.ArgumentParser, argv: list[str]) -> str | None:
    """The study a command line names (its first positional argument), whatever else it holds."""
    takes_value = {s for a in parser._actions if a.option_strings and a.nargs != 0 for s in a.option_strings}
    skip = False
    for token in argv:
        if skip:
            skip = False
        elif token.startswith("-"):
            skip = token in takes_value and token not in ("--resume",)
        else:
            return token
    return None


def given_keys(argv: list[str], parsed: dict) -> set[str]:
    """The keys this command line sets itself, not by default: parsed again with every default a marker of its own
    (what a --resume compares with the search it continues)."""
    parser = build_parser()
    markers = {key: [] if isinstance(value, list) else object() for key, value in parsed.items()}  # `--set` appends
    parser.set_defaults(**markers)
    return {key for key, value in vars(parser.parse_args(argv)).items() if value is not markers[key]}
