import math

import kornia.augmentation as K
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

from tune_xray.augment import (
    EvalViews,
    RandomBrightness,
    RandomContrast,
    RandomGeometry,
    TrainAugment,
    normalization,
    preprocess,
    random_erasing_,
)
from tune_xray.config import AugmentConfig
from tune_xray.models.heads import mean_probability_logits

S0_ALL = AugmentConfig(image_size=56, crop="random", hflip=0.5, rotation=10, brightness=(0.8, 1.2),
                       contrast=(0.8, 1.2), erasing=3, erasing_p=0.5, erasing_scale=(0.02, 0.1), blur_p=0.5,
                       blur_kernel=5, blur_sigma=(0.1, 1.0))


def _batch(n=8, size=64, channels=1):
    g = torch.Generator().manual_seed(0)
    one = torch.randint(0, 256, (1, channels, size, size), generator=g, dtype=torch.uint8)
    return one.expand(n, -1, -1, -1).contiguous()  # n identical images


def _train(cfg, in_chans=3):
    return TrainAugment(cfg, 64, in_chans, *normalization(cfg, in_chans))


def test_shapes_and_channel_replication():
    out = _train(S0_ALL)(_batch())
    assert out.shape == (8, 3, 56, 56) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    gray = _train(S0_ALL, in_chans=1)(_batch())
    assert gray.shape == (8, 1, 56, 56)


def test_every_s0_augmentation_is_present():
    aug = _train(S0_ALL)
    geo = aug.geometry
    assert (geo.crop, geo.size, geo.hflip, geo.degrees) == ("random", 56, 0.5, 10)
    kinds = [type(op) for op in aug.ops]
    assert kinds == [RandomBrightness, RandomContrast, K.RandomGaussianBlur]
    assert (aug.cfg.erasing, aug.cfg.erasing_p, aug.cfg.erasing_scale) == (3, 0.5, (0.02, 0.1))
    extra = AugmentConfig(image_size=56, crop="random_resized", vflip=0.5, perspective_p=0.5, affine_p=0.5,
                          sharpness_p=0.5, autocontrast_p=0.5)
    aug = _train(extra)
    assert aug.geometry.crop == "random_resized" and aug.geometry.vflip == 0.5
    expected = {K.RandomPerspective, K.RandomAffine, K.RandomSharpness, K.RandomAutoContrast}
    assert expected <= {type(op) for op in aug.ops}


@pytest.mark.parametrize("degrees,flip", [(7.0, 1.0), (-9.5, -1.0), (0.0, -1.0)])
def test_fused_geometry_equals_torchvision_crop_flip_rotate(degrees, flip):
    x = torch.rand(2, 1, 64, 64)
    params = {"w": torch.full((2,), 48.0), "h": torch.full((2,), 48.0), "x0": torch.tensor([3.0, 16.0]),
              "y0": torch.tensor([5.0, 0.0]), "theta": torch.full((2,), math.radians(degrees)),
              "fx": torch.full((2,), flip), "fy": torch.ones(2)}
    out = RandomGeometry(48, "random", hflip=0.5, degrees=10).apply(x, params)
    for i, (top, left) in enumerate([(5, 3), (0, 16)]):
        crop = x[i:i + 1, :, top:top + 48, left:left + 48]
        crop = crop.flip(-1) if flip < 0 else crop
        assert torch.equal(out[i:i + 1], TF.rotate(crop, degrees, interpolation=InterpolationMode.NEAREST))


def test_a_plain_random_crop_is_the_exact_pixels_at_its_offsets():
    x = torch.rand(3, 2, 64, 64)
    geometry = RandomGeometry(40, "random")
    params = geometry.sample(3, 64, x.device)
    out = geometry.apply(x, params)
    for i, (top, left) in enumerate(zip(params["y0"].long(), params["x0"].long())):
        assert torch.equal(out[i], x[i, :, top:top + 40, left:left + 40])


def test_random_resized_crop_scale():
    torch.manual_seed(0)
    geo = RandomGeometry(32, "random_resized", scale=(0.25, 0.25))
    params = geo.sample(500, 128, "cpu")
    area = params["w"] * params["h"] / 128**2
    assert area.mean().item() == pytest.approx(0.25, abs=0.01)
    ratio = params["w"] / params["h"]
    assert ratio.min() > 0.7 and ratio.max() < 1.4
    assert geo(torch.rand(4, 1, 128, 128)).shape == (4, 1, 32, 32)


def test_erasing_follows_torchvision():
    torch.manual_seed(0)
    x = torch.ones(400, 3, 50, 50)
    random_erasing_(x, 1, 0.5, (0.02, 0.1))
    erased = (x == 0).all(1).flatten(1)
    hit = erased.any(1)
    assert 0.4 < hit.float().mean() < 0.6  # p = 0.5, per image
    frac = erased[hit].float().mean(1)
    assert frac.min() >= 0.015 and frac.max() <= 0.11  # scale 0.02–0.1 of the area (rounded boxes)


def test_parameters_are_drawn_per_image():
    torch.manual_seed(0)
    out = _train(S0_ALL)(_batch(16))
    flat = out.flatten(1)
    distinct = {tuple(row[:64].tolist()) for row in flat}
    assert len(distinct) == 16  # identical inputs, all different views


def test_blur_is_decided_per_image():
    cfg = AugmentConfig(image_size=64, crop="none", hflip=0, rotation=0, blur_p=0.5, blur_sigma=(1.0, 1.0),
                        normalize="none")
    torch.manual_seed(0)
    x = _batch(64)
    out = TrainAugment(cfg, 64, 1, *normalization(cfg, 1))(x)
    blurred = (out - x.float() / 255).flatten(1).abs().amax(1) > 1e-4
    assert 10 < int(blurred.sum()) < 54


def test_brightness_and_contrast_follow_torchvision():
    x = torch.rand(4, 1, 16, 16)
    b = RandomBrightness((1.2, 1.2), p=1.0)(x)
    c = RandomContrast((0.8, 0.8), p=1.0)(x)
    assert torch.allclose(b, TF.adjust_brightness(x, 1.2))
    assert torch.allclose(c, TF.adjust_contrast(x, 0.8), atol=1e-6)


@pytest.mark.parametrize("tta,n", [("none", 1), ("hflip", 2), ("tencrop", 10)])
def test_eval_views(tta, n):
    cfg = AugmentConfig(image_size=56, tta=tta)
    views = EvalViews(cfg, 64, 3, *normalization(cfg, 3))(_batch(2))
    assert len(views) == n and all(v.shape == (2, 3, 56, 56) for v in views)
    assert torch.equal(views[0], EvalViews(cfg, 64, 3, *normalization(cfg, 3))(_batch(2))[0])  # deterministic


def test_tta_averages_probabilities_not_logits():
    logits = [torch.tensor([[0.0, 2.0]]), torch.tensor([[4.0, -2.0]])]
    multi = torch.sigmoid(mean_probability_logits(logits, multilabel=True))
    assert torch.allclose(multi, (torch.sigmoid(logits[0]) + torch.sigmoid(logits[1])) / 2)
    assert not torch.allclose(multi, torch.sigmoid((logits[0] + logits[1]) / 2))  # what S0 did
    single = torch.softmax(mean_probability_logits(logits, multilabel=False), 1)
    assert torch.allclose(single, (torch.softmax(logits[0], 1) + torch.softmax(logits[1], 1)) / 2)


@pytest.mark.parametrize("change, key", [({"augment": {"eval_view": "resize"}}, "eval_view=center_crop"),
                                         ({"augment": {"image_size": 64}}, "cache_size > image_size")])
def test_tencrop_that_cannot_crop_is_a_config_error(change, key):
    from tune_xray.config import ConfigError, build_config, merge
    tree = merge({"data": {"cache_size": 64}, "augment": {"image_size": 56, "tta": "tencrop"}}, change)
    with pytest.raises(ConfigError, match=key):
        build_config(tree)


def test_crop_larger_than_cache_is_an_error():
    with pytest.raises(ValueError, match="image_size 96 exceeds data.cache_size 64"):
        _train(AugmentConfig(image_size=96))


def test_dataset_statistics_normalisation():
    cfg = AugmentConfig(image_size=56, normalize="dataset")
    assert normalization(cfg, 1, ([0.3], [0.2])) == ([0.3], [0.2])
    assert normalization(cfg, 3, ([0.3], [0.2])) == ([0.3] * 3, [0.2] * 3)  # gray stats, replicated input
    with pytest.raises(ValueError, match="pixel statistics"):
        normalization(cfg, 1)
    x = torch.full((2, 1, 64, 64), 0.3 * 255, dtype=torch.uint8)
    out = EvalViews(cfg, 64, 1, *normalization(cfg, 1, ([0.3], [0.2])))(x)[0]
    assert out.abs().max() < 0.02  # (x − mean) / std ≈ 0


def _low_contrast_batch():
    g = torch.Generator().manual_seed(0)
    return 0.3 + 0.2 * torch.rand(2, 1, 64, 64, generator=g)  # values in [0.3, 0.5]


def test_equalisation_spreads_the_histogram_over_the_full_range():
    x = _low_contrast_batch()
    y = preprocess(x, ["equalize"])
    assert y.min() < 0.05 and y.max() > 0.95
    # monotone: a brighter pixel stays at least as bright
    order = x[0, 0].flatten().argsort()
    assert (y[0, 0].flatten()[order].diff() >= -1e-6).all()


def test_clahe_raises_local_contrast_and_blur_lowers_it():
    x = _low_contrast_batch()
    clahe, blur = preprocess(x, ["clahe"], clahe_clip=2.0, clahe_grid=4), preprocess(x, ["blur"])
    assert clahe.std() > 1.5 * x.std()
    assert blur.std() < 0.5 * x.std()
    assert torch.allclose(blur.mean(), x.mean(), atol=1e-3)  # a blur keeps the mean


def test_preprocessing_applies_to_train_and_eval_alike():
    cfg = AugmentConfig(image_size=64, crop="none", hflip=0, rotation=0, preprocess=["equalize"], normalize="none")
    x = (255 * _low_contrast_batch()).to(torch.uint8)
    train = TrainAugment(cfg, 64, 1, [0.0], [1.0])(x)
    (view,) = EvalViews(cfg, 64, 1, [0.0], [1.0])(x)
    assert torch.allclose(train, view) and train.max() > 0.95
