"""CASS: the two-arm loss learns, both arms train, gradients are fresh every step, SWA really averages."""

import copy

import torch

from tune_xray.data.loader import prepare
from tune_xray.models import create_backbone
from tune_xray.phases import run_phases
from tune_xray.phases.base import PhaseContext
from tune_xray.phases.cass import Cass, CassArm, CassPhase, build_cass, cass_loss
from tune_xray.phases.common import run_epoch

ARMS = {"cass": {"enabled": True, "cnn": "test_resnet", "transformer": "test_vit", "out_dim": 32, "epochs": 1,
                 "batch_size": 32},
        "augment": {"image_size": 64}}  # a multiple of the ViT's patch


def tiny_cass(seed=0):
    torch.manual_seed(seed)
    arms = [CassArm(*create_backbone(name, image_size=32), 16) for name in ("test_resnet", "test_vit")]
    return Cass(*arms)


def test_loss_is_two_minus_two_cosine():
    a, b = torch.randn(5, 8), torch.randn(5, 8)
    expected = (2 - 2 * (a / a.norm(dim=1, keepdim=True) * b / b.norm(dim=1, keepdim=True)).sum(1)).mean()
    assert torch.allclose(cass_loss(a, b), expected) and float(cass_loss(a, 3 * a)) < 1e-6


def test_steps_lower_the_loss_and_train_both_arms():
    model = tiny_cass()
    x = torch.randn(8, 3, 32, 32)
    before = copy.deepcopy(model.state_dict())
    optimizers = [torch.optim.Adam(arm.parameters(), lr=1e-3) for arm in (model.cnn, model.transformer)]
    with torch.no_grad():
        first = float(model(x))
    for _ in range(5):
        run_epoch([x], lambda batch: model(batch), optimizers, list(model.parameters()))
    with torch.no_grad():
        assert float(model(x)) < first
    for arm in ("cnn", "transformer"):
        changed = [k for k, v in model.state_dict().items() if k.startswith(arm) and not torch.equal(v, before[k])]
        assert any(".backbone." in k for k in changed), arm


def test_gradients_do_not_carry_across_steps():
    batches = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)]
    model, reference = tiny_cass(), tiny_cass()
    sgd = lambda m: [torch.optim.SGD(arm.parameters(), lr=0.1) for arm in (m.cnn, m.transformer)]  # noqa: E731
    run_epoch(batches, lambda b: model(b), sgd(model), list(model.parameters()))
    opts = sgd(reference)
    for b in batches:  # by hand: each step sees only its own batch's gradient
        for o in opts:
            o.zero_grad()
        reference(b).backward()
        for o in opts:
            o.step()
    for (k, v), r in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.allclose(v, r, atol=1e-6), k


def test_swa_really_averages(make_config, tmp_path):
    cfg = make_config(**{**ARMS, "cass": {**ARMS["cass"], "epochs": 3, "swa": True, "swa_start": 0.5}})
    model = build_cass(cfg)
    snapshots = []  # each epoch's trained weights of a layer BN does not touch
    context = PhaseContext(torch.device("cpu"), tmp_path,
                           report=lambda m, checkpoint=None: snapshots.append(model.cnn.proj.weight.detach().clone()))
    summary = CassPhase(cfg, prepare(cfg.data), context, model).run()
    assert summary["swa_updates"] == 2  # averaging from epoch ⌊0.5·3⌋ + 1 = 2: epochs 2 and 3
    assert torch.allclose(model.cnn.proj.weight, (snapshots[1] + snapshots[2]) / 2, atol=1e-6)
    bn = model.cnn.backbone.bn1
    assert bn.num_batches_tracked > 0 and torch.isfinite(bn.running_var).all()


def test_cass_then_fine_tune_one_arm(make_config, tmp_path):
    cfg = make_config(**ARMS, supervised={"epochs": 1})
    seen = []
    summary = run_phases(cfg, tmp_path / "run", report=lambda m, checkpoint_dir=None: seen.append(m))
    assert [m["phase"] for m in seen] == ["cass", "supervised"]
    assert summary["backbone"] == "test_resnet" and summary["cass"]["finetuned_arm"] == "cnn"
    assert 0 <= summary["val"]["mean_auroc"] <= 1


def test_both_arms_fine_tuned_as_a_two_member_ensemble(make_config, tmp_path):
    cfg = make_config(**{**ARMS, "cass": {**ARMS["cass"], "finetune": "both"}},
                      supervised={"epochs": 1, "freeze": 0.5, "head_warmup_epochs": 1})  # per member
    summary = run_phases(cfg, tmp_path / "run")
    assert summary["backbone"] == "test_resnet+test_vit"
    state = torch.load(tmp_path / "run" / "best.pt", weights_only=False)["model"]
    assert any(k.startswith("members.0.backbone.") for k in state) and any(k.startswith("members.1.") for k in state)
    assert 0 <= summary["val"]["mean_auroc"] <= 1


def test_member_ensemble_outputs_the_mean_probability():
    from tune_xray.models.heads import Classifier, MemberEnsemble
    members = [Classifier(*create_backbone("test_resnet"), 3) for _ in range(2)]
    x = torch.randn(4, 3, 32, 32)
    for multilabel, prob in ((True, torch.sigmoid), (False, lambda t: t.softmax(1))):
        ensemble = MemberEnsemble(members, multilabel).eval()
        with torch.no_grad():
            expected = (prob(members[0](x)) + prob(members[1](x))) / 2
            assert torch.allclose(prob(ensemble(x)), expected, atol=1e-5)
        assert ensemble.train()(x).shape == (8, 3)  # training: both members' logits, each to its own loss


def test_cass_resumes_from_an_epoch_checkpoint(make_config, tmp_path):
    from tune_xray.phases.common import load_state
    cfg = make_config(**{**ARMS, "cass": {**ARMS["cass"], "epochs": 2, "swa": True, "swa_start": 0.0}})
    data, saved = prepare(cfg.data), []
    cpu = torch.device("cpu")
    CassPhase(cfg, data, PhaseContext(cpu, tmp_path, checkpoints=True,
                                      report=lambda m, checkpoint=None: saved.append(load_state(checkpoint))),
              build_cass(cfg)).run()
    resumed = CassPhase(cfg, data, PhaseContext(cpu, tmp_path, resume=saved[0]), build_cass(cfg)).run()
    assert [m["epoch"] for m in resumed["history"]] == [1, 2] and resumed["swa_updates"] == 2
