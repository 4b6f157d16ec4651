"""What a fine-tuned model looks at and how it groups images, and what it costs to run.

Grad-CAM (Selvaraju et al. 2017, through pytorch-grad-cam) reads the deepest stage of the backbone (timm's
`feature_info`) whose map is still at least 7 × 7 at the image size — the last stage of a 224-px CNN, an earlier
one of a tiny model at 64 px, whose last map is 2 × 2 and explains nothing — for CNNs and token models alike: ViT
tokens (B, N, C) drop their prefix tokens and fold into their square grid, NHWC maps (Swin, VMamba) are
transposed; a ViT that classifies its class token is read at its last block's input. A map that comes out
constant is returned as such, not drawn as an explanation (S4 showed Grad-CAM; S0 an inference-cost table).
"""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import torch
from torch import nn

MIN_CAM_SIDE = 7  # a Grad-CAM map coarser than this (in either direction) says little about where


class FeatureMapClassifier(nn.Module):
    """A `Classifier` with its backbone's last feature map passing through a module of its own (`features`),
    a layer Grad-CAM can hook; the output equals the classifier's."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier, self.features = classifier, nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backbone = self.classifier.backbone
        features = self.features(backbone.forward_features(x))
        return self.classifier.head(backbone.forward_head(features, pre_logits=True))


def _side(t, channels: int, prefix: int) -> int:
    """The smaller spatial side of a layer's output read as a feature map."""
    t = t[0] if isinstance(t, (tuple, list)) else t
    return min(as_feature_map(t, channels, prefix).shape[-2:]) if t.dim() in (3, 4) else 0


@torch.no_grad()
def cam_layer(model: FeatureMapClassifier, image: torch.Tensor) -> tuple[str, nn.Module, int]:
    """(name, module, channels) of the layer to explain: the deepest `feature_info` stage at least MIN_CAM_SIDE
    wide at this image size, else the widest; the last feature map where the backbone lists no stages."""
    backbone = model.classifier.backbone
    channels, prefix = backbone.num_features, getattr(backbone, "num_prefix_tokens", 0)
    stages = [(f["module"], f["num_chs"]) for f in getattr(backbone, "feature_info", []) or []
              if isinstance(f, dict) and f.get("module")]
    candidates = [(name, backbone.get_submodule(name), c) for name, c in stages]
    candidates.append(("forward_features", model.features, channels))
    sides, handles = {}, []

    def measure(name: str, c: int):
        def hook(module, inputs, out) -> None:  # returns None: the output passes on unchanged
            sides.setdefault(name, _side(out, c, prefix))
        return hook

    for name, module, c in candidates:
        handles.append(module.register_forward_hook(measure(name, c)))
    try:
        model(image[:1])
    finally:
        for handle in handles:
            handle.remove()
    wide = [cand for cand in candidates if sides.get(cand[0], 0) >= MIN_CAM_SIDE]
    if wide:  # the deepest: stages are listed shallow to deep, the last feature map last
        return wide[-1]
    return max(candidates, key=lambda cand: (sides.get(cand[0], 0), -candidates.index(cand)))


def as_feature_map(t: torch.Tensor, channels: int, prefix_tokens: int = 0) -> torch.Tensor:
    """Any backbone's last features as (B, C, H, W): tokens (B, N, C) without their prefix (class, register)
    tokens folded into √N × √N; NHWC maps transposed."""
    if t.dim() == 3:
        t = t[:, prefix_tokens:]
        side = math.isqrt(t.shape[1])
        t = t[:, t.shape[1] - side * side:]
        return t.reshape(t.shape[0], side, side, t.shape[2]).permute(0, 3, 1, 2)
    if t.shape[1] != channels and t.shape[-1] == channels:
        return t.permute(0, 3, 1, 2)
    return t


def gradcam(classifier: nn.Module, images: torch.Tensor, classes: list[int]) -> tuple[np.ndarray, np.ndarray, str]:
    """(maps, constant, layer): (B, H, W) Grad-CAM maps in [0, 1] of `classes[i]`'s logit for each normalised
    image, which of them are constant (no explanation: every weighted activation ≤ 0, or one cell), and the layer
    read."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = FeatureMapClassifier(classifier).eval()
    backbone = classifier.backbone
    prefix = getattr(backbone, "num_prefix_tokens", 0)
    if getattr(backbone, "global_pool", None) == "token" and hasattr(backbone, "blocks"):
        # a ViT that classifies its class token: the last features of the patches get no gradient; the input of
        # the last block, whose attention mixes them into the class token, does (pytorch-grad-cam's ViT recipe)
        name = f"blocks.{len(backbone.blocks) - 1}.norm1"
        target, channels = backbone.blocks[-1].norm1, backbone.num_features
    else:
        name, target, channels = cam_layer(model, images)
    with GradCAM(model=model, target_layers=[target],
                 reshape_transform=lambda t: as_feature_map(t[0] if isinstance(t, (tuple, list)) else t, channels,
                                                            prefix)) as cam:
        maps = cam(input_tensor=images, targets=[ClassifierOutputTarget(c) for c in classes])
    constant = np.ptp(maps.reshape(len(maps), -1), axis=1) < 1e-6
    return maps, constant, name


@torch.no_grad()
def embeddings(classifier: nn.Module, images: torch.Tensor, batch: int = 64) -> np.ndarray:
    """The backbone's pooled features (what the head sees) of normalised images."""
    classifier.eval()
    features = [classifier.backbone(images[i:i + batch]).float() for i in range(0, len(images), batch)]
    return torch.cat(features).cpu().numpy()


def tsne(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D t-SNE (scikit-learn; PCA init, seeded). t-SNE rather than UMAP: scikit-learn has it, no new dependency."""
    from sklearn.manifold import TSNE

    perplexity = float(min(30, max(2, (len(features) - 1) // 3)))
    return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(features)


@torch.no_grad()
def median_seconds(run: Callable[[], object], device: str, repeats: int, seconds: float) -> float:
    """Median wall time of `run()` after one warm-up: `repeats` times, or fewer once `seconds` have passed."""
    def timed() -> float:
        start = time.perf_counter()
        run()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    timed()
    times, spent = [], 0.0
    while len(times) < repeats and (not times or spent < seconds):
        times.append(timed())
        spent += times[-1]
    return float(np.median(times))


@torch.no_grad()
def eval_cost(model: nn.Module, predict: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
              device: str, batch: int = 32, seconds: float = 5.0) -> dict:
    """What a fine-tuned model costs to run as it is evaluated, on its own device: `predict(uint8 images)` → its
    probabilities (the eval view, every TTA view, their mean), on `images` (uint8, repeated up to `batch`).

    `params_m` (millions); `gflops` per image, every view (torch's FlopCounterMode: a multiply-add counts 2);
    `latency_ms`: one image alone (batch 1), what a reader waits for; `latency_ms_b32`: per image at batch `batch`
    (32), what a worklist costs. Each the median of repeats after a warm-up (S0 published such a table by hand)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = images[torch.arange(batch) % len(images)].to(device)
    with FlopCounterMode(display=False) as counter:
        predict(x[:1])
    one = median_seconds(lambda: predict(x[:1]), device, 10, seconds)
    many = median_seconds(lambda: predict(x), device, 3, seconds)
    return {"params_m": sum(p.numel() for p in model.parameters()) / 1e6, "gflops": counter.get_total_flops() / 1e9,
            "latency_ms": 1000 * one, "latency_ms_b32": 1000 * many / batch}
