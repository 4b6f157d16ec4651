"""Pretrained weights as researchers get them (models.pretrained, tune_xray.weights): every form of
`model.pretrained`, the URL path and
the hub's through a loopback server or a cache filled in the hub's layout, trainer files read without running pickled
code, the EMA copy only when asked, and a search that fetches each file once and records it."""

import hashlib
import json
import sys
import types

import pytest
import timm
import torch
import yaml
from mlflow.tracking import MlflowClient

from tests.loopback import COMMIT, Loopback, safetensors_file, torch_file
from tests.test_search import SPACE
from tune_xray.config import ConfigError
from tune_xray.models import create_backbone
from tune_xray.models.pretrained import WeightsError, read_checkpoint, resolve, started_from
from tune_xray.weights import main


@pytest.fixture
def online(monkeypatch, tmp_path):
    """Downloads allowed (only the loopback server answers), into caches of this test's own."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    with Loopback() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


def _state(name: str, seed: int) -> dict:
    torch.manual_seed(seed)
    return timm.create_model(name).state_dict()


def _same(model, state: dict) -> bool:
    own = model.state_dict()
    shared = [k for k in own if k in state and own[k].shape == state[k].shape and own[k].dtype.is_floating_point]
    return len(shared) > 2 and all(torch.equal(own[k], state[k]) for k in shared)


def test_each_form_of_model_pretrained_names_its_file():
    assert resolve("test_resnet", False) is None
    assert resolve("test_resnet", True).name == "hf-hub:timm/test_resnet.r160_in1k"  # timm's default tag
    assert resolve("densenet121", "tv_in1k").location == "timm/densenet121.tv_in1k"  # a tag's short form
    assert resolve("densenet121.tv_in1k", True).tag == "densenet121.tv_in1k"  # the tag in the backbone's name
    assert resolve("convnext_small", "convnext_small.fb_in22k").location == "timm/convnext_small.fb_in22k"
    assert resolve("mambavision_l.in21k", True).name == \
        "hf-hub:nvidia/MambaVision-L-21K:mambavision_large_21k.pth.tar"  # NVIDIA's ImageNet-21K release
    assert resolve("mambavision_t2", True).name == "hf-hub:nvidia/MambaVision-T2-1K:mambavision_tiny2_1k.pth.tar"
    vmamba = resolve("vmamba_s", True)
    assert vmamba.source == "url" and vmamba.location.endswith("/vssm_small_0229_ckpt_epoch_222.pth")
    assert resolve("test_mambavision", True) is None  # no published weights: from scratch, said in the record
    assert resolve("test_resnet", "hf-hub:org/repo:w.pth").name == "hf-hub:org/repo:w.pth"
    assert resolve("test_resnet", "https://h.example/w-0a1b2c3d.pth").source == "url"
    assert resolve("test_resnet", "weights/w.safetensors").source == "file"
    with pytest.raises(ConfigError, match=r"'test_resnet.in22k' is not a pretrained tag of test_resnet; its tags: "
                                          r"\['test_resnet.r160_in1k'\]"):
        resolve("test_resnet", "in22k")
    with pytest.raises(ConfigError, match="a tag of densenet121, not of the backbone test_resnet"):
        resolve("test_resnet", "densenet121.tv_in1k")


def test_url_weights_are_downloaded_once_into_torch_home_and_a_wrong_checksum_is_refused(online, tmp_path):
    state = _state("test_resnet", 0)
    body = torch_file(state)
    digest = hashlib.sha256(body).hexdigest()
    url = online.serve(f"/w/test_resnet-{digest[:8]}.pth", body)  # torch.hub's check_hash: name-<sha256 prefix>
    for _ in range(2):
        model, _ = create_backbone("test_resnet", pretrained=url)
        assert _same(model, state)
    assert online.gets[f"/w/test_resnet-{digest[:8]}.pth"] == 1
    assert (tmp_path / "torch_home" / "hub" / "checkpoints" / f"test_resnet-{digest[:8]}.pth").is_file()
    assert started_from("test_resnet", url) == {"backbone": "test_resnet", "file": url, "tag": None,
                                                 "sha256": digest, "part": "the whole file"}

    bad = online.serve("/w/test_resnet-deadbeef.pth", body)
    with pytest.raises(WeightsError, match=r"test_resnet-deadbeef.pth: refused, its checksum does not match"):
        create_backbone("test_resnet", pretrained=bad)
    assert not (tmp_path / "torch_home" / "hub" / "checkpoints" / "test_resnet-deadbeef.pth").exists()
    with pytest.raises(WeightsError, match="nothing-here.pth: cannot download"):
        create_backbone("test_resnet", pretrained=online.url + "/w/nothing-here.pth")


def test_hub_weights_are_downloaded_once_through_hf_endpoint_into_hf_home(online, tmp_path):
    state = _state("test_resnet", 6)
    body = safetensors_file(state)
    online.serve_hub("timm/test_resnet.r160_in1k", "model.safetensors", body)
    for _ in range(2):
        assert _same(create_backbone("test_resnet", pretrained=True)[0], state)
    assert online.gets["/timm/test_resnet.r160_in1k/resolve/main/model.safetensors"] == 1
    snapshot = tmp_path / "hf_home" / "hub" / "models--timm--test_resnet.r160_in1k" / "snapshots" / COMMIT
    assert (snapshot / "model.safetensors").is_file()

    online.serve_hub("timm/test_convnext.r160_in1k", "model.safetensors", body, etag="ab" * 32)  # not its sha256
    with pytest.raises(WeightsError, match=r"hf-hub:timm/test_convnext.r160_in1k:model.safetensors: refused, its "
                                           rf"sha256 {hashlib.sha256(body).hexdigest()} is not the hub's abab"):
        create_backbone("test_convnext", pretrained=True)
    assert not list((tmp_path / "hf_home" / "hub").glob("models--timm--test_convnext*/blobs/*"))


def _fill_hub_cache(root, repo: str, filename: str, body: bytes) -> None:
    """A file in the hub's documented cache layout: models--org--name/{blobs,snapshots/<commit>,refs/main}."""
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(COMMIT)
    (folder / "snapshots" / COMMIT).mkdir(parents=True)
    (folder / "snapshots" / COMMIT / filename).write_bytes(body)


def test_hub_weights_load_from_a_filled_cache_offline_with_the_first_conv_adapted(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    state = _state("test_resnet", 1)
    body = safetensors_file(state)
    _fill_hub_cache(tmp_path / "hf" / "hub", "timm/test_resnet.r160_in1k", "model.safetensors", body)
    model, _ = create_backbone("test_resnet", pretrained=True, in_chans=1)
    assert _same(model, state)  # all but the first conv, which is summed over RGB for one channel
    first = next(k for k in state if k.endswith("weight") and state[k].ndim == 4)
    assert torch.allclose(model.state_dict()[first], state[first].sum(1, keepdim=True))
    entry = started_from("test_resnet", True)
    assert entry["file"] == "hf-hub:timm/test_resnet.r160_in1k" and entry["tag"] == "test_resnet.r160_in1k"
    assert entry["sha256"] == hashlib.sha256(body).hexdigest()

    space = tmp_path / "tiny.yaml"
    space.write_text(yaml.safe_dump({**SPACE, "base": {**SPACE["base"], "model": {"backbone": "test_convnext"}}}))
    assert main([str(space), "--set", "model.pretrained=true", "--check"]) == 1  # test_convnext's is not cached
    assert main([str(space), "--check"]) == 0  # from scratch: nothing to check


def test_offline_and_not_cached_is_one_error_before_ray_naming_the_file_and_its_fetch(tmp_path, monkeypatch,
                                                                                      capsys):
    import ray

    from tune_xray.search import main as search

    ray.shutdown()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty"))
    space = tmp_path / "tiny.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    assert search([str(space), "--set", "model.pretrained=true", "--storage", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "1 pretrained file(s) not in the cache and HF_HUB_OFFLINE is set" in err
    assert "hf-hub:timm/test_resnet.r160_in1k  (test_resnet): hf download timm/test_resnet.r160_in1k " \
           "model.safetensors" in err
    assert not ray.is_initialized() and not (tmp_path / "s").exists()


def _yacs_stand_in():
    """A class pickled as `yacs.config.CfgNode` (VMamba's trainer config), importable only while writing."""
    package, module = types.ModuleType("yacs"), types.ModuleType("yacs.config")

    class CfgNode(dict):
        def __init__(self, init=None):
            super().__init__(init or {})
            self.__dict__["__immutable__"] = False  # as yacs keeps its flags: pickled as the object's state

    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    module.CfgNode, package.config = CfgNode, module
    return package, module


class _Payload:
    def __reduce__(self):
        import os
        return os.system, ("echo this must never run",)


def test_a_vmamba_trainer_file_with_its_config_loads_and_any_other_global_is_refused(tmp_path, monkeypatch):
    package, module = _yacs_stand_in()
    state = _state("test_vmamba", 2)
    monkeypatch.setitem(sys.modules, "yacs", package)
    monkeypatch.setitem(sys.modules, "yacs.config", module)
    config = module.CfgNode({"MODEL": module.CfgNode({"TYPE": "vssm", "NAME": "vssm_small"})})
    path = tmp_path / "vssm_small_0229_ckpt_epoch_222.pth"
    torch.save({"model": state, "optimizer": {}, "lr_scheduler": {}, "max_accuracy": 83.5, "epoch": 222,
                "config": config}, path)
    monkeypatch.delitem(sys.modules, "yacs.config")  # reading it must not need (or run) yacs
    monkeypatch.delitem(sys.modules, "yacs")
    _, part = read_checkpoint(path)
    assert part == "its 'model'"
    model, _ = create_backbone("test_vmamba", pretrained=str(path))
    assert _same(model, state)

    evil = tmp_path / "evil.pth"
    torch.save({"model": state, "config": _Payload()}, evil)
    with pytest.raises(WeightsError, match=r"evil.pth: refused — it holds the pickled object (posix|os)\.system"):
        create_backbone("test_vmamba", pretrained=str(evil))


def test_a_mambavision_file_with_an_ema_copy_loads_the_evaluated_weights_unless_asked(tmp_path):
    network, ema = _state("test_mambavision", 3), _state("test_mambavision", 4)
    path = tmp_path / "mambavision_tiny_1k.pth.tar"
    torch.save({"state_dict": network, "state_dict_ema": ema, "epoch": 300}, path)
    assert _same(create_backbone("test_mambavision", pretrained=str(path))[0], network)
    assert _same(create_backbone("test_mambavision", pretrained=str(path), ema=True)[0], ema)
    assert started_from("test_mambavision", str(path))["part"] == "its 'state_dict'"  # the record says which
    assert started_from("test_mambavision", str(path), ema=True)["part"] == "its 'state_dict_ema'"
    plain = tmp_path / "plain.pth"
    torch.save({"state_dict": network}, plain)
    with pytest.raises(WeightsError, match="model.pretrained_ema is set but the file holds no EMA copy"):
        create_backbone("test_mambavision", pretrained=str(plain), ema=True)


def test_a_search_fetches_each_file_once_and_every_trial_records_it(online, tmp_path, capsys):
    import ray

    from tune_xray.pipeline import run_search
    from tune_xray.request import SearchRequest

    ray.shutdown()  # a fresh Ray: its workers see this test's caches
    body = torch_file(_state("test_resnet", 5))
    digest = hashlib.sha256(body).hexdigest()
    path = f"/w/test_resnet-{digest[:8]}.pth"
    url = online.serve(path, body)
    space = tmp_path / "tiny.yaml"
    space.write_text(yaml.safe_dump({**{k: v for k, v in SPACE.items() if k != "warm_start"},
                                     "params": {"supervised.optimizer.lr": {"loguniform": [1.0e-3, 1.0e-2]}}}))
    try:
        summary = run_search(SearchRequest(str(space), storage=str(tmp_path / "store"), local_dir="", name="w",
                                           trials=4, no_asha=True, gpus_per_trial=0.0, ensemble_size=2,
                                           overrides=["supervised.epochs=1", f"model.pretrained={url}"]))
    finally:
        ray.shutdown()
    assert "pretrained: 1 file, " in capsys.readouterr().out
    assert online.gets[path] == 1  # the driver's fetch; the trials read the cache
    assert summary["complete"] == 4
    exp = tmp_path / "store" / "w"
    client = MlflowClient(f"sqlite:///{exp / 'mlflow.db'}")
    for row in summary["rows"]:
        assert row["started_from"]["test_resnet"]["file"] == url
        assert row["started_from"]["test_resnet"]["sha256"] == digest
        params = client.get_run(row["mlflow_run_id"]).data.params
        assert params["pretrained.file"] == url and params["pretrained.sha256"] == digest
    on_disk = json.loads((exp / "summary.json").read_text())["rows"]
    assert {r["started_from"]["test_resnet"]["sha256"] for r in on_disk} == {digest}
    card = (exp / "ensemble" / "model_card.md").read_text()
    assert f"{url} (sha256 {digest[:12]}…)" in card


def test_the_weights_command_lists_what_a_study_draws_and_a_smoke_search_needs_nothing(capsys):
    assert main(["byol", "--list"]) == 0  # S0's weights: eight files, none fetched here
    listed = capsys.readouterr().out
    for name in ("hf-hub:nvidia/MambaVision-T2-1K:mambavision_tiny2_1k.pth.tar",
                 "hf-hub:nvidia/MambaVision-L-21K:mambavision_large_21k.pth.tar", "vssm_small_0229_ckpt_epoch_222.pth",
                 "hf-hub:timm/densenet121.tv_in1k", "hf-hub:timm/convnextv2_large.fcmae_ft_in22k_in1k",
                 "hf-hub:timm/swinv2_cr_small_ns_224.sw_in1k", "hf-hub:timm/coatnet_2_rw_224.sw_in12k_ft_in1k",
                 "hf-hub:timm/maxxvitv2_rmlp_base_rw_224.sw_in12k_ft_in1k"):
        assert name in listed
    assert "8 file(s); 0 cached; 8 to fetch" in listed and "resnet18" not in listed  # the base's default: not drawn
    assert main(["transfer", "--list"]) == 0  # its ImageNet axis: torchvision's ResNets, no hand-placed files
    assert "hf-hub:timm/resnet18.tv_in1k" in capsys.readouterr().out
    assert main(["byol", "--smoke", "--list"]) == 0
    assert "0 file(s)" in capsys.readouterr().out  # a fresh machine's smoke search fetches nothing
    assert main(["byol", "--smoke", "--set", "model.pretrained=true", "--list"]) == 0
    smoke = capsys.readouterr().out
    assert "hf-hub:timm/test_resnet.r160_in1k" in smoke and "hf-hub:timm/test_convnext.r160_in1k" in smoke
    for backbone in ("test_mambavision", "test_vmamba", "test_vit_relpos"):
        assert f"{backbone}: no pretrained weights in timm — trained from scratch" in smoke
    assert started_from("test_mambavision", True)["scratch"] == "timm knows no pretrained weights for it"
