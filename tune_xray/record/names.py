"""The names shared across tune_xray, in one leaf module that imports nothing (the model: `ray.tune.result`).

Who writes each: a trial (tune_xray.trial) writes the report keys and its result files; the search's Experiment
(tune_xray.experiment) writes the experiment directory's files; the costs are measured by explain.eval_cost.
"""

# ── in a trial's config ──────────────────────────────────────────────────────────────────────────────────────────
TRIAL_NUMBER = "optuna_trial"  # in every search trial's config: the Optuna trial it is
REPEAT_OF = "repeat_of"  # in a repeat trial's config (tune_xray.repeat): its source trial
REPEAT_SEED = "repeat_seed"  # … and its seed
CV_OF = "cv_of"  # in a fold trial's config (tune_xray.cv): the search trial whose configuration it trains
CV_FOLD = "cv_fold"  # … its fold
CV_FOLDS = "cv_folds"  # … of how many
SSL_STORE = "ssl_store"  # in a trial's train config: the experiment's store of finished SSL phases
TRIAL_NAME = "trial_name"  # in a trial's train config: its Tune name (`t007-<trial id>`)

# ── in a trial's reports ─────────────────────────────────────────────────────────────────────────────────────────
TIME_ATTR = "epochs_done"  # ASHA's clock: supervised epochs done (training_iteration restarts on retries)
SSL_TIME_ATTR = "ssl_epochs_done"  # ASHA's clock in the SSL phase: its epochs done (every report of a trial with one)
SSL_PHASE = "ssl_phase"  # in every report of a trial with an SSL phase: byol or cass
PROBE = "ssl_probe"  # in an SSL report with a probe: its value of the study's metric (phases.probe), what ASHA judges
SSL_FROM = "ssl_from"  # in every report of a trial that fine-tunes a stored SSL phase: which (phases.ssl_store)
FINISHED = "trial_finished"  # in the last report of a trial that ran to its own end (budget or early stop)
STATUS = "status"  # in a trial's last report: complete, diverged or infeasible (pruned / error / interrupted: Tune's)
REASON = "reason"
SCAN_BACKEND = "scan_backend"  # in every report: the selective scan the trial's SSM layers run ("none": no SSM)
RAN_WITH = "ran_with"  # in every report: the device and global batch sizes the trial ran with (a resume may change
# the resources of the trials it starts: each trial's record says its own)
STARTED_FROM = "started_from"  # in every report: {backbone: its pretrained file and sha256, or why from scratch}
REPLAY = "replay"  # in the first report after a resume: the restored epochs' reports (see tracking.TrialRuns)

# ── a trial's status (record.status.trial_status; summary.summarize adds `interrupted`) ─────────────────────────
STATUSES = ("complete", "pruned", "infeasible", "diverged", "collapsed", "error", "interrupted")

# ── a trial's result files ───────────────────────────────────────────────────────────────────────────────────────
FINAL_FILE = "final.json"  # the last report, kept with the results so a finished run re-reports it on retry
RESULT_FILES = (FINAL_FILE, "config.yaml", "summary.json", "best.pt", "predictions_val.csv", "predictions_test.csv",
                "supervised_history.json")

# ── the experiment directory's files (tune_xray.experiment) ──────────────────────────────────────────────────────
INVOCATION_FILE = "search.json"
SUMMARY_FILE = "summary.json"
PARENT_ID_FILE = "mlflow_parent_run_id"  # the search's MLflow parent run, which a --resume reopens
SQLITE_STORES = ("optuna.db", "mlflow.db")  # the default stores, beside the experiment
LOCK_FILE = ".search.lock"
ENSEMBLE_DIR = "ensemble"
ENSEMBLE_FILE = f"{ENSEMBLE_DIR}/ensemble.json"  # the latest selection (record.models.EnsembleRecord)
EXTERNAL_DIR = "external"  # tune_xray.external: each source's predictions
REPEATS_DIR = "repeats"
CV_DIR = "cv"  # tune_xray.cv: the finalists' fold trials, out-of-fold predictions and the fold ensemble
TEST_READS = "test_reads.json"
REPORT_FILE = "report.html"

# ── the costs a trial measures of its model (explain.eval_cost), per image, in every fine-tune report ────────────
# inference ms per image at batch 1 at the eval view (TTA views included) on the trial's device, the same at batch 32
# (throughput, shown, never a limit), parameters (M), GFLOPs per image
COST_METRICS = ("latency_ms", "latency_ms_b32", "params_m", "gflops")
COSTS = ("latency_ms", "params_m", "gflops")  # those a study may name as an objective or a limit
# the costs a trial's own measurement judges fairly: the model's wherever it runs. Its latency is measured while other
# trials may share its device (packed GPUs, a CPU's cores): a latency limit is judged after the search, with the model
# alone on the driver's device (costs.remeasure_costs), never in the trial
JUDGED_IN_TRIAL = ("params_m", "gflops")


def bare(metric: str) -> str:
    """`val_mean_auroc` / `best_val_mean_auroc` → `mean_auroc`: the metric's name on any split."""
    return metric.removeprefix("best_").removeprefix("val_")
