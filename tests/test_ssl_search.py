"""ASHA through the SSL phase, end to end in a real Ray Tune search: the probe in every SSL report (Tune, MLflow),
a collapsed BYOL trial ended at once as `collapsed` — told to Optuna as PRUNED, named in the summary, never in the
ensemble's pool — and the others going on."""

import optuna
import yaml
from mlflow import MlflowClient

from tests.test_search import SPACE
from tune_xray.pipeline import run_search
from tune_xray.request import SearchRequest

BYOL = {"enabled": True, "epochs": 2, "batch_size": 32, "hidden_dim": 32, "out_dim": 16}


def test_a_collapsed_byol_trial_ends_at_once_and_the_others_are_judged_on_their_probe(tmp_path, capsys):
    import ray

    space = tmp_path / "ssl.yaml"
    space.write_text(yaml.safe_dump({
        "metric": "val_mean_auroc",
        "budget": {"trials": 3, "epochs": 1, "grace_period": 1, "reduction_factor": 2, "ssl_grace_period": 1},
        "base": {**SPACE["base"], "byol": BYOL, "ssl": {"probe_images": 64}},
        "params": {"ssl.collapse_std": {"choice": [0.0, 5.0]}},  # 5: above any healthy z_std·√d (≈ 1)
        "warm_start": [{"ssl.collapse_std": 0.0}, {"ssl.collapse_std": 5.0}, {"ssl.collapse_std": 0.0}]}))
    try:
        summary = run_search(SearchRequest(str(space), storage=str(tmp_path / "s"), local_dir="", name="ssl",
                                           gpus_per_trial=0.0))
    finally:
        ray.shutdown()
    out = capsys.readouterr().out
    rows = {r["trial"]: r for r in summary["rows"]}
    assert rows["t001"]["status"] == "collapsed" and "byol collapsed at epoch 1: z_std·√out_dim" in rows["t001"]["reason"]
    assert "t001" in out and "collapsed" in out.split("t001", 1)[1].splitlines()[0]
    assert summary["collapsed"] == 1 and summary["status"] == "complete"
    assert "t001" not in {m["trial"] for m in summary["ensemble"]["members"]}  # never in the pool
    others = [r for t, r in rows.items() if t != "t001"]
    assert all(r["status"] in ("complete", "pruned") for r in others)
    for row in (r for r in others if r["status"] == "pruned"):  # stopped at the SSL rung, said so
        assert row["reason"] == "stopped by ASHA after BYOL epoch 1"

    exp = tmp_path / "s" / "ssl"
    study = optuna.load_study(study_name="ssl", storage=f"sqlite:///{exp / 'optuna.db'}")
    collapsed = study.trials[1]
    assert collapsed.state == optuna.trial.TrialState.PRUNED and collapsed.user_attrs["status"] == "collapsed"
    client = MlflowClient(f"sqlite:///{exp / 'mlflow.db'}")
    run = client.get_run(rows["t000"]["mlflow_run_id"])
    probe = client.get_metric_history(run.info.run_id, "byol/probe_val_mean_auroc")
    assert [m.step for m in probe] == [1, 2] and all(0 <= m.value <= 1 for m in probe)  # the probe curve
