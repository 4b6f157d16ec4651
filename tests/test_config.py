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
