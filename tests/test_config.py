import pytest

from tune_xray.config import ConfigError, load_config


def test_defaults_follow_s0():
    cfg = load_config()
    assert cfg.data.source == "synthetic" and cfg.data.cache_size == 256 and cfg.augment.image_size == 224
    assert (cfg.byol.optimizer.name, cfg.byol.optimizer.lr, cfg.byol.optimizer.weight_decay) == ("lars", 0.2, 1.5e-6)
    assert cfg.byol.hidden_dim == 1024 and cfg.byol.out_dim == 256 and cfg.byol.ema_tau == 0.996


def test_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  backbone: densenet121\nsupervised:\n  epochs: 3\n")
    cfg = load_config(path, ["supervised.optimizer.lr=1e-4", "augment.brightness=[0.8, 1.2]", "byol.enabled=true"])
    assert cfg.model.backbone == "densenet121" and cfg.supervised.epochs == 3
    assert cfg.supervised.optimizer.lr == 1e-4 and cfg.augment.brightness == (0.8, 1.2) and cfg.byol.enabled


def test_typo_names_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("supervised:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"c.yaml: unknown key 'supervised.epoch'"):
        load_config(path)


@pytest.mark.parametrize("override,key", [
    ("augment.hflip=1.5", "augment.hflip"),
    ("augment.erasing=4", "augment.erasing"),
    ("augment.blur_sigma=[1.0, 0.1]", "augment"),
    ("supervised.optimizer.name=rmsprop", "supervised.optimizer.name"),
    ("supervised.scheduler.name=cosin", "supervised.scheduler.name"),
])
def test_out_of_range_or_unknown_value(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])


def test_malformed_override():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["supervised.epochs"])


def test_crop_larger_than_cache_fails_at_load():
    with pytest.raises(ConfigError, match="augment.image_size 300 exceeds data.cache_size 256"):
        load_config(None, ["augment.image_size=300"])


def test_selection_metric_typo_fails_at_load():
    with pytest.raises(ConfigError, match="supervised.selection_metric"):
        load_config(None, ["supervised.selection_metric=val_mean_aucroc"])


def test_an_unknown_set_key_says_it_came_from_set_and_what_is_near():
    with pytest.raises(ConfigError, match=r"--set supervised.batchsize: unknown key; did you mean "
                                          r"supervised.batch_size\?"):
        load_config(None, ["supervised.batchsize=64"])
    with pytest.raises(ConfigError, match=r"--set byol.optimizer.learning_rate: unknown key; byol.optimizer has "
                                          r"name, lr, weight_decay"):
        load_config(None, ["byol.optimizer.learning_rate=0.1"])


def test_the_search_s_help_gives_every_default_and_a_study_s_space(capsys):
    from tune_xray.search import main

    assert main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("--seed SEED TPE sampler seed (default: 0)", "(default: tune_xray_runs)",
                  "--ensemble-size ENSEMBLE_SIZE Caruana ensemble size chosen on val at the end (default: 5)",
                  "--cpus-per-trial CPUS_PER_TRIAL CPUs each trial reserves"):
        assert shown in text, shown
    assert "space:" not in text
    assert main(["byol", "--smoke", "--data", "folder:x", "--help"]) == 0
    text = capsys.readouterr().out
    assert "objective: val_mean_auroc (max)" in text and "byol.optimizer.name" in text and "model.backbone" in text
