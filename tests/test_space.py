import optuna
import pytest
import yaml

from tune_xray.config import ConfigError
from tune_xray.space import SEARCH_SPACES, load_study

MINIMAL = {"budget": {"trials": 2, "epochs": 1},
           "params": {"supervised.optimizer.name": {"choice": ["sgd", "adamw"]},
                      "supervised.optimizer.lr": {"by": "supervised.optimizer.name",
                                                  "cases": {"sgd": {"loguniform": [0.01, 0.1]},
                                                            "adamw": {"value": 0.001}}},
                      "supervised.scheduler.name": {"choice": ["none", "cosine"]},
                      "supervised.scheduler.t_max": {"choice": [5, 10],
                                                     "when": {"supervised.scheduler.name": "cosine"}}}}


def _write(tmp_path, tree):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))  # objectives keep their order
    return str(path)


@pytest.mark.parametrize("name", sorted(p.stem for p in SEARCH_SPACES.glob("*.yaml")))
def test_shipped_search_spaces_validate(name):
    study = load_study(name)
    assert study.metric.startswith("val_") and study.space.warm_start
    smoke = study.resolve(smoke=True).trial_config({})
    backbones = [smoke.cass.cnn, smoke.cass.transformer] if smoke.cass.enabled else [smoke.model.backbone]
    assert all(b.startswith("test_") for b in backbones)  # --smoke runs on timm's tiny test models


def test_conditional_parameters_appear_only_with_their_parent(tmp_path):
    study = load_study(_write(tmp_path, MINIMAL))
    optuna_study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(40):
        trial = optuna_study.ask()
        values = study.sample(trial)
        optuna_study.tell(trial, 0.0)
        p = trial.params
        assert ("supervised.scheduler.t_max" in p) == (p["supervised.scheduler.name"] == "cosine")
        assert ("supervised.optimizer.lr:sgd" in p) == (p["supervised.optimizer.name"] == "sgd")
        if p["supervised.optimizer.name"] == "adamw":
            assert values["supervised.optimizer.lr"] == 0.001  # fixed value, not an Optuna parameter
        seen.add((p["supervised.optimizer.name"], p["supervised.scheduler.name"]))
        cfg = study.resolve().trial_config(values)
        assert cfg.supervised.optimizer.name == p["supervised.optimizer.name"]
    assert len(seen) == 4


@pytest.mark.parametrize("edit,message", [
    (lambda t: t["params"].update({"supervised.optimizer.lrr": {"choice": [0.1]}}),
     "params.supervised.optimizer.lrr: value 0.1 is not allowed: unknown key"),
    (lambda t: t["params"].update({"supervised.epochs": {"choise": [1, 2]}}), "exactly one of"),
    (lambda t: t["params"].update({"augment.hflip": {"choice": []}}), "choice is empty"),
    (lambda t: t["params"].update({"supervised.optimizer.weight_decay": {"loguniform": [0.1, 0.01]}}),
     "inverted"),
    (lambda t: t["params"].update({"augment.erasing": {"int": [0, 5]}}), "params.augment.erasing: value 5"),
    (lambda t: t["params"].update({"augment.hflip": {"choice": [0.5], "when": {"augment.vflip": 0.5}}}),
     "'when' names 'augment.vflip'"),
    (lambda t: t.update({"metric": "test_mean_auroc"}), "metric"),
    (lambda t: t.update({"base": {"supervised": {"epochs": 100}}}),
     "base.supervised.epochs: the search sets it to the file's budget.epochs (1)"),
    (lambda t: t["params"].update({"supervised.epochs": {"choice": [5, 10]}}), "params.supervised.epochs: the search"),
    (lambda t: t.update({"base": {"supervised": {"selection_metric": "val_loss"}}}),
     "base.supervised.selection_metric: the search sets it to the file's metric (val_mean_auroc)"),
    (lambda t: t.update({"base": {"device": "cuda:1"}}), "base.device: a trial runs on the device its resources"),
    (lambda t: t.update({"base": {"cass": {"enabled": True}, "model": {"pretrained_path": "w.pth"}}}),
     "with cass.enabled the backbones trained are the CASS arms"),
    (lambda t: t.update({"budgett": {}}), "unknown key 'budgett'"),
    (lambda t: t.update({"sampler": {"multivariat": True}}), "unknown key 'sampler.multivariat'"),
    (lambda t: t.update({"sampler": {"n_startup_trials": 0}}), "sampler.n_startup_trials"),
    (lambda t: t.update({"warm_start": [{"supervised.optimizer.name": "rmsprop"}]}), "warm_start[0]"),
    (lambda t: (t["params"].update({"augment.preprocess": {"choice": {"off": [], "eq": ["equalize"]}}}),
                t.update({"warm_start": [{"augment.preprocess": "on"}]})), "warm_start[0]"),
])
def test_bad_search_space_is_one_clear_error(tmp_path, edit, message):
    tree = yaml.safe_load(yaml.safe_dump(MINIMAL))
    edit(tree)
    path = _write(tmp_path, tree)
    with pytest.raises(ConfigError) as err:
        load_study(path)
    assert path in str(err.value) and message in str(err.value)


def test_unknown_study_lists_the_known_ones():
    with pytest.raises(ConfigError, match="known studies: .*byol"):
        load_study("byoll")


def test_cyclic_conditions_are_an_error(tmp_path):
    tree = yaml.safe_load(yaml.safe_dump(MINIMAL))
    tree["params"]["supervised.scheduler.name"]["when"] = {"supervised.scheduler.t_max": 5}
    with pytest.raises(ConfigError, match="cycle"):
        load_study(_write(tmp_path, tree))


def test_warm_start_takes_a_labelled_choice_by_label_or_value(tmp_path):
    tree = yaml.safe_load(yaml.safe_dump(MINIMAL))
    tree["params"]["augment.preprocess"] = {"choice": {"off": [], "eq+blur": ["equalize", "blur"]}}
    tree["warm_start"] = [{"augment.preprocess": "eq+blur"}, {"augment.preprocess": []}]
    study = load_study(_write(tmp_path, tree))
    assert [p["augment.preprocess"] for p in study.warm_start_points()] == ["eq+blur", "off"]


def test_smoke_keeps_every_axis_meaningful_and_records_what_ran():
    """--smoke: each backbone its family's test model, drawn sizes shrunk in proportion (two drawn values
    never train as one), and the trial's record shows the resolved values with the drawn ones beside."""
    from tune_xray.searcher import DefineByRun
    from tune_xray.space import smoke_backbone

    assert [smoke_backbone(n) for n in ("mambavision_t2", "vmamba_s", "convnextv2_large", "swinv2_cr_small_ns_224",
                                        "coatnet_2_rw_224", "vit_base_patch16_384", "densenet121",
                                        "efficientnetv2_s")] == [
        "test_mambavision", "test_vmamba", "test_convnext", "test_vit_relpos", "test_vit_relpos", "test_vit",
        "test_resnet", "test_efficientnet"]
    study = load_study("byol")
    resolved = study.resolve(smoke=True).placed(0.0)
    space = DefineByRun(resolved)
    optuna_study = optuna.create_study()
    trained = {}
    for batch, hidden, backbone in [(256, 1024, "mambavision_t2"), (512, 4096, "vmamba_s")]:
        optuna_study.enqueue_trial({"byol.batch_size": batch, "byol.hidden_dim": hidden, "model.backbone": backbone})
        trial = optuna_study.ask()
        config = space(trial)
        trained[batch] = config
        assert config["sampled.model.backbone"] == backbone and config["model.backbone"] == smoke_backbone(backbone)
        recorded = trial.user_attrs["trained"]
        assert recorded["model.backbone"] == smoke_backbone(backbone) and recorded["smoke"] is True
        assert study.sampled_from(config)["byol.batch_size"] == batch  # the drawn value is kept beside
        cfg = resolved.trial_config(study.sampled_from(config))
        assert (cfg.byol.batch_size, cfg.byol.hidden_dim) == (config["byol.batch_size"], config["byol.hidden_dim"])
    assert trained[256]["byol.batch_size"] != trained[512]["byol.batch_size"]
    assert trained[256]["byol.hidden_dim"] != trained[512]["byol.hidden_dim"]
    sizes = {load_study("supervised").resolve(smoke=True).trial_config({"augment.image_size": s}).augment.image_size
             for s in (224, 256)}
    assert len(sizes) == 2


def test_a_resume_loads_what_a_search_before_the_resolved_study_pickled():
    """A search started before the study was resolved once pickled its define-by-run space as (study, overrides,
    smoke) and its trials' run record calls resolve_trial with them: both still give the same trial config."""
    import pickle

    from tune_xray.searcher import DefineByRun
    from tune_xray.trial import resolve_trial

    study = load_study("byol")
    old = DefineByRun.__new__(DefineByRun)
    old.__dict__.update(study=study, overrides={"device": "cpu"}, smoke=True)
    space = pickle.loads(pickle.dumps(old))
    assert space.resolved.overrides == {"device": "cpu"} and space.resolved.smoke
    config = space(optuna.create_study().ask())
    assert resolve_trial(study, config, {"device": "cpu"}, True) == resolve_trial(space.resolved, config)


def test_sampler_options_reach_optuna(tmp_path):
    tree = {**MINIMAL, "sampler": {"multivariate": True, "constant_liar": True, "n_startup_trials": 3}}
    from tune_xray.searcher import DefineByRun, optuna_searcher

    study = load_study(_write(tmp_path, tree))
    searcher = optuna_searcher(DefineByRun(study.resolve()), "s", f"sqlite:///{tmp_path / 'o.db'}", 0,
                               "best_val_mean_auroc")
    sampler = searcher.sampler
    assert sampler._multivariate and sampler._constant_liar and sampler._n_startup_trials == 3
    assert load_study(_write(tmp_path, MINIMAL)).space.sampler.multivariate is False  # Optuna's defaults


@pytest.mark.parametrize("edit, message", [
    ({"objectives": {"latency_ms": "min", "val_mean_auroc": "max"}}, "the first objective is the validation metric"),
    ({"objectives": {"val_mean_auroc": "max", "latency": "min"}}, "['latency'] unknown"),
    ({"objectives": {"val_mean_auroc": "max", "val_loss": "min"}}, "the first objective is the validation metric"),
    ({"objectives": {"val_mean_auroc": "max", "gflops": "smallest"}}, "objectives.gflops"),
    ({"metric": "val_loss", "objectives": {"val_mean_auroc": "max"}}, "metric: val_loss contradicts"),
    ({"sampler": {"name": "nsga2", "multivariate": True}}, "['multivariate'] are not options of the nsga2"),
    ({"sampler": {"population_size": 10}}, "['population_size'] are not options of the tpe"),
    ({"ensemble": {"latency_ms": 0}}, "ensemble.latency_ms"),
    ({"ensemble": {"select_on": "test"}}, "ensemble.select_on"),
    ({"limits": {"latency": 25}}, "limits.latency"),
    ({"limits": {"latency_ms": 0}}, "each limit is a positive cost"),
    ({"smoke": {"limits": {"params_m": -1}}}, "each limit is a positive cost"),
])
def test_objectives_sampler_and_budget_errors_name_the_key(tmp_path, edit, message):
    path = _write(tmp_path, {**MINIMAL, **edit})
    with pytest.raises(ConfigError) as err:
        load_study(path)
    assert path in str(err.value) and message in str(err.value)


def test_a_pareto_study_and_its_multi_objective_sampler(tmp_path):
    from tune_xray.searcher import DefineByRun, optuna_searcher

    tree = {**MINIMAL, "objectives": {"val_mean_auroc": "max", "latency_ms": "min", "params_m": "min"},
            "sampler": {"name": "nsga2", "population_size": 4}, "ensemble": {"latency_ms": 20},
            "smoke": {"ensemble": {"latency_ms": 3}}}
    study = load_study(_write(tmp_path, tree))
    assert (study.metric, study.mode, study.costs) == ("val_mean_auroc", "max", [("latency_ms", "min"),
                                                                                 ("params_m", "min")])
    none = {"latency_x_cheapest": None}
    assert study.resolve().ensemble == {"latency_ms": 20, "params_m": None, **none}
    assert study.resolve(smoke=True).ensemble == {"latency_ms": 3, "params_m": None, **none}
    assert study.resolve(smoke=True, latency_ms=7, params_m=2).ensemble == {"latency_ms": 7, "params_m": 2, **none}
    # a budget relative to the cheapest completed trial (one that holds on any machine); --latency-budget replaces it
    relative = load_study(_write(tmp_path, {**tree, "smoke": {"ensemble": {"latency_x_cheapest": 2.5}}}))
    assert relative.resolve(smoke=True).ensemble == {"latency_ms": None, "params_m": None, "latency_x_cheapest": 2.5}
    assert relative.resolve(smoke=True, latency_ms=4).ensemble["latency_x_cheapest"] is None
    with pytest.raises(ConfigError, match="one latency budget"):
        load_study(_write(tmp_path, {**tree, "ensemble": {"latency_ms": 20, "latency_x_cheapest": 2}}))
    searcher = optuna_searcher(DefineByRun(study.resolve()), "s", f"sqlite:///{tmp_path / 'o.db'}", 0,
                               "best_val_mean_auroc")
    assert isinstance(searcher.sampler, optuna.samplers.NSGAIISampler)
    assert [d.name for d in searcher.study.directions] == ["MAXIMIZE", "MINIMIZE", "MINIMIZE"]
    assert searcher.study.metric_names == ["best_val_mean_auroc", "latency_ms", "params_m"]
    single = load_study(_write(tmp_path, MINIMAL))
    assert single.costs == [] and single.resolve().ensemble == {"latency_ms": None, "params_m": None, **none}


@pytest.mark.parametrize("sampler", [{"n_startup_trials": 2}, {"name": "nsga2", "population_size": 2}])
def test_a_multi_objective_study_is_told_every_objective_and_samples_past_pruned_trials(tmp_path, sampler):
    """A complete trial is told its metric and its costs; a pruned one is PRUNED with no intermediate value (TPE
    ranks those against a single direction, which a multi-objective study has not); TPE or NSGA-II then keeps
    proposing."""
    from tune_xray.searcher import DefineByRun, optuna_searcher

    tree = {**MINIMAL, "objectives": {"val_mean_auroc": "max", "latency_ms": "min"}, "sampler": sampler}
    study = load_study(_write(tmp_path, tree))
    searcher = optuna_searcher(DefineByRun(study.resolve()), "s", f"sqlite:///{tmp_path / 'o.db'}", 0,
                               "best_val_mean_auroc")
    for i in range(6):
        searcher.suggest(f"t{i}")
        result = {"best_val_mean_auroc": 0.5 + i / 20, "latency_ms": 5.0 - i / 2, "epochs_done": 1}
        searcher.on_trial_result(f"t{i}", result)
        searcher.on_trial_complete(f"t{i}", {**result, "status": "complete"} if i % 2 else result)
    trials = searcher.study.get_trials(deepcopy=False)
    assert [t.state.name for t in trials] == ["PRUNED", "COMPLETE"] * 3
    assert trials[1].values == [0.55, 4.5] and all(not t.intermediate_values for t in trials)
    assert {t.number for t in searcher.study.best_trials} == {5}


def test_an_errored_trial_run_again_by_a_resume_reaches_optuna_with_its_real_end(tmp_path):
    """Tune's resume_errored runs a trial that erred again; Optuna holds it as FAIL and a finished trial cannot
    change: its real end is added as a trial of its own (same parameters, `rerun_of`), once."""
    import pickle

    from tune_xray.searcher import DefineByRun, optuna_searcher

    study = load_study(_write(tmp_path, MINIMAL))
    searcher = optuna_searcher(DefineByRun(study.resolve()), "s", f"sqlite:///{tmp_path / 'o.db'}", 0,
                               "best_val_mean_auroc")
    searcher.suggest("t0")
    searcher.on_trial_complete("t0", error=True)
    resumed = pickle.loads(pickle.dumps(searcher))  # the driver killed, the search resumed
    result = {"best_val_mean_auroc": 0.7, "epochs_done": 2, "status": "complete"}
    resumed.on_trial_complete("t0", result)
    resumed.on_trial_complete("t0", result)  # told once
    trials = resumed.study.get_trials(deepcopy=False)
    assert [(t.state.name, t.value) for t in trials] == [("FAIL", None), ("COMPLETE", 0.7)]
    assert trials[1].params == trials[0].params and trials[1].user_attrs["rerun_of"] == 0


def test_hard_limits_reach_every_trial_and_optunas_constraints(tmp_path):
    """`limits:` (and its smoke form) lands in each trial's config, which names what is over; each Optuna trial
    gets its constraints (cost − limit): a trial over a limit is told COMPLETE (it is a result: infeasible), and
    the study's best trials leave it out."""
    import pickle

    from tune_xray.searcher import DefineByRun, optuna_searcher

    tree = {**MINIMAL, "limits": {"latency_ms": 25}, "smoke": {"limits": {"latency_ms": 3}}}
    study = load_study(_write(tmp_path, tree))
    assert study.resolve().limits == {"latency_ms": 25} and study.resolve(smoke=True).limits == {"latency_ms": 3}
    supervised = study.resolve().trial_config({}).supervised
    assert supervised.limits == {"latency_ms": 25}
    # a trial does not judge its own latency (taken while it may share its device): judged after the search
    assert supervised.over_limits({"latency_ms": 31.25}) == ""
    limited = load_study(_write(tmp_path, {**tree, "limits": {"params_m": 1, "latency_ms": 25}}))
    judged = limited.resolve().trial_config({}).supervised
    assert judged.over_limits({"params_m": 1.5, "latency_ms": 31.25}) == "params_m 1.5 over its limit 1"
    assert judged.over_limits({"params_m": 0.5, "latency_ms": 31.25}) == ""
    assert limited.resolve().unlimited().trial_config({}).supervised.limits == {}  # a repeat's, a fold's
    assert load_study(_write(tmp_path, MINIMAL)).resolve().limits == {}
    searcher = optuna_searcher(DefineByRun(study.resolve()), "s", f"sqlite:///{tmp_path / 'o.db'}", 0,
                               "best_val_mean_auroc")
    searcher = pickle.loads(pickle.dumps(searcher))  # Tune pickles the searcher, its sampler with it
    for i, (auroc, ms, status) in enumerate([(0.9, 40.0, "infeasible"), (0.7, 10.0, "complete")]):
        searcher.suggest(f"t{i}")
        searcher.on_trial_complete(f"t{i}", {"best_val_mean_auroc": auroc, "latency_ms": ms, "epochs_done": 1,
                                             "status": status})
    trials = searcher.study.get_trials(deepcopy=False)
    assert [(t.state.name, t.constraints) for t in trials] == [("COMPLETE", {"latency_ms": 15.0}),
                                                               ("COMPLETE", {"latency_ms": -15.0})]
    assert searcher.study.best_trial.number == 1  # the infeasible trial's higher AUROC does not make it best
