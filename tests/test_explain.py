"""Grad-CAM on CNNs and token models alike; embeddings, t-SNE and what a classifier costs to run."""

import numpy as np
import pytest
import torch

from tune_xray.explain import (
    FeatureMapClassifier,
    as_feature_map,
    cam_layer,
    embeddings,
    eval_cost,
    gradcam,
    tsne,
)
from tune_xray.models import create_backbone
from tune_xray.models.heads import Classifier


@pytest.mark.parametrize("name", ["test_resnet", "test_vit", "test_mambavision", "test_vmamba"])
def test_gradcam_maps_for_cnns_and_token_models(name):
    torch.manual_seed(0)
    backbone, width = create_backbone(name, image_size=64)
    model = Classifier(backbone, width, 2).eval()
    with torch.no_grad():  # class 1's evidence is class 0's, negated: ReLU keeps one or the other everywhere
        model.head[1].weight[1] = -model.head[1].weight[0]
        model.head[1].bias.zero_()
    x = torch.randn(1, 3, 64, 64).repeat(2, 1, 1, 1)
    with torch.no_grad():  # the hooked model computes exactly the classifier
        assert torch.allclose(FeatureMapClassifier(model)(x), model(x), atol=1e-5)
    maps, constant, layer = gradcam(model, x, [0, 1])
    assert maps.shape == (2, 64, 64) and np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    assert max(maps[0].std(), maps[1].std()) > 0.05 and not constant.all()  # a map, not a constant
    if name != "test_vit":  # at 64 px the last map of these is 2 × 2: an earlier stage, at least 7 × 7, is read
        assert layer != "forward_features" and cam_layer(FeatureMapClassifier(model), x)[0] == layer
        outputs = []
        handle = backbone.get_submodule(layer).register_forward_hook(lambda m, i, out: outputs.append(out) and None)
        with torch.no_grad():
            model(x)
        handle.remove()
        assert sorted(outputs[0].shape[1:])[:2] == [8, 8]  # 64 px at reduction 8: (C, 8, 8) or (8, 8, C)


def test_a_constant_map_is_reported_not_drawn():
    backbone, width = create_backbone("test_resnet", image_size=64)
    model = Classifier(backbone, width, 2).eval()
    with torch.no_grad():
        model.head[1].weight.zero_()  # no evidence for either class anywhere: Grad-CAM has nothing to show
    _, constant, _ = gradcam(model, torch.randn(2, 3, 64, 64), [0, 1])
    assert constant.all()


def test_feature_maps_of_every_layout():
    nchw = torch.randn(2, 8, 4, 4)
    assert as_feature_map(nchw, 8) is nchw
    assert torch.equal(as_feature_map(nchw.permute(0, 2, 3, 1), 8), nchw)  # Swin-style NHWC
    tokens = torch.randn(2, 1 + 16, 8)  # class token + 4×4 patches
    grid = as_feature_map(tokens, 8, prefix_tokens=1)
    assert grid.shape == (2, 8, 4, 4) and torch.equal(grid[:, :, 0, 1], tokens[:, 2])


def test_embeddings_and_tsne():
    backbone, width = create_backbone("test_resnet")
    model = Classifier(backbone, width, 2)
    x = torch.randn(20, 3, 32, 32)
    features = embeddings(model, x, batch=8)
    assert features.shape == (20, width)
    points = tsne(features)
    assert points.shape == (20, 2) and np.isfinite(points).all()


def test_eval_cost_counts_every_view_and_each_image():
    """Parameters; FLOPs per image of the whole evaluation (two TTA views: twice one view's); latency at batch 1
    and per image at batch 32, on uint8 images fewer than the batch (repeated up to it)."""
    backbone, width = create_backbone("test_resnet")
    model = Classifier(backbone, width, 2).eval()
    images = torch.randint(0, 255, (5, 3, 32, 32), dtype=torch.uint8)
    one = eval_cost(model, lambda x: model(x.float() / 255), images, "cpu", seconds=0.05)
    two = eval_cost(model, lambda x: model(x.float() / 255) + model(x.float().flip(-1) / 255), images, "cpu",
                    seconds=0.05)
    assert one["params_m"] == pytest.approx(sum(p.numel() for p in model.parameters()) / 1e6)
    assert two["gflops"] == pytest.approx(2 * one["gflops"]) and one["gflops"] > 0
    assert one["latency_ms"] > 0 and one["latency_ms_b32"] > 0
