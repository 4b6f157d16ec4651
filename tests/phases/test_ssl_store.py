"""The SSL store's key: everything that shapes a pre-trained backbone, nothing that only the fine-tune reads."""

import pytest

from tune_xray.config import ConfigError
from tune_xray.phases.ssl_store import resolve_init, ssl_key


def test_the_key_follows_what_shapes_the_ssl_phase_and_nothing_else(make_config):
    base = ssl_key(make_config(byol={"enabled": True}), 1)
    assert base == ssl_key(make_config(byol={"enabled": True}), 1)
    for same in ({"supervised": {"optimizer": {"lr": 0.5}}}, {"augment": {"image_size": 56, "tta": "hflip"}},
                 {"model": {"backbone": "test_resnet", "drop_rate": 0.3}}, {"data": {"num_workers": 2}}):
        assert ssl_key(make_config(byol={"enabled": True}, **same), 1) == base, same
    for other in ({"byol": {"enabled": True, "optimizer": {"lr": 0.05}}}, {"seed": 1},
                  {"augment": {"image_size": 56, "hflip": 0.0}}, {"model": {"backbone": "test_efficientnet"}},
                  {"data": {"synthetic_images": 301}}):
        assert ssl_key(make_config(**{"byol": {"enabled": True}, **other}), 1) != base, other
    assert ssl_key(make_config(byol={"enabled": True}), 2) != base  # each rank draws its own batch


def test_init_from_names_what_is_not_there(tmp_path):
    with pytest.raises(ConfigError, match="no experiment directory"):
        resolve_init(str(tmp_path / "nope"))
    (tmp_path / "exp").mkdir()
    with pytest.raises(ConfigError, match=r"keeps no SSL phase \(.*ssl is empty"):
        resolve_init(f"{tmp_path / 'exp'}:t003")
