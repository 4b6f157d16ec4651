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
    assert rows["t001"]["status"] == "collapsed"
    assert "byol collapsed at epoch 1: z_std·√out_dim" in rows["t001"]["reason"]
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


def test_ssl_runs_once_per_key_and_a_new_search_starts_from_an_earlier_ones(tmp_path, capsys):
    """Two trials that differ only in their fine-tune share one BYOL phase: the second reuses the first's and says
    so. A second search starts from the first's stored phase (`model.init_from`); one naming a trial that has none
    is one error before anything runs."""
    import ray

    from tune_xray.phases.ssl_store import main as list_store

    space = tmp_path / "reuse.yaml"
    study = {"metric": "val_mean_auroc", "budget": {"trials": 2, "epochs": 1, "grace_period": 1, "reduction_factor": 2},
             "base": {**SPACE["base"], "byol": BYOL, "ssl": {"probe_images": 64}},
             "params": {"supervised.optimizer.lr": {"choice": [1.0e-3, 3.0e-3]}},
             "warm_start": [{"supervised.optimizer.lr": 1.0e-3}, {"supervised.optimizer.lr": 3.0e-3}]}
    space.write_text(yaml.safe_dump(study))
    try:
        first = run_search(SearchRequest(str(space), storage=str(tmp_path / "s"), local_dir="", name="first",
                                         gpus_per_trial=0.0, max_concurrent=1, no_report=True))
        out = capsys.readouterr().out
        rows = {r["trial"]: r for r in first["rows"]}
        assert rows["t000"]["ssl_epochs_done"] == 2 and "ssl_from" not in rows["t000"]
        assert rows["t001"]["ssl_from"]["trial"] == "t000" and rows["t001"]["ssl_epochs_done"] == 0
        assert "t001" in out and "BYOL reused from t000's run" in out.split("t001", 1)[1].splitlines()[0]
        client = MlflowClient(f"sqlite:///{tmp_path / 's' / 'first' / 'mlflow.db'}")
        assert client.get_run(rows["t001"]["mlflow_run_id"]).data.tags["tune_xray.ssl_from"].startswith(
            "reused from t000's run")
        assert len(list((tmp_path / "s" / "first" / "ssl").iterdir())) == 1  # one key, pre-trained once

        assert list_store([str(tmp_path / "s" / "first")]) == 0
        assert f"model.init_from: {{choice: [{tmp_path / 's' / 'first'}:t000]}}" in capsys.readouterr().out

        later = {**study, "base": {**study["base"], "model": {**study["base"]["model"],
                                                             "init_from": str(tmp_path / "s" / "first")}}}
        space.write_text(yaml.safe_dump(later))
        second = run_search(SearchRequest(str(space), storage=str(tmp_path / "s"), local_dir="", name="second",
                                          gpus_per_trial=0.0, no_report=True, no_ensemble=True))
        assert all(r["ssl_from"]["init_from"] == str(tmp_path / "s" / "first") and r["ssl_from"]["trial"] == "t000"
                   and r["ssl_epochs_done"] == 0 for r in second["rows"])
        assert second["complete"] == 2

        missing = {**later, "base": {**later["base"], "model": {**later["base"]["model"],
                                                                "init_from": f"{tmp_path / 's' / 'first'}:t099"}}}
        space.write_text(yaml.safe_dump(missing))
        from tune_xray.config import ConfigError

        try:
            run_search(SearchRequest(str(space), storage=str(tmp_path / "s"), local_dir="", name="third",
                                     gpus_per_trial=0.0))
            raise AssertionError("a missing SSL phase was not refused")
        except ConfigError as err:
            assert "keeps no SSL phase of t099; it keeps t000" in str(err)
        assert not (tmp_path / "s" / "third").exists()
    finally:
        ray.shutdown()
