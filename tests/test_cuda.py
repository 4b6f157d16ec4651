"""What only a GPU can show (marked `cuda`: skipped without one; scripts/gpu_check.sh runs them on a GPU machine):
the report's explain path on CUDA tensors, AMP bf16 and fp16 (GradScaler), channels_last, the device cache and its
share of a packed GPU, fused optimizers, no host sync in a training step, every scan backend against the
definition, and one NCCL DDP step across two GPUs where there are two."""

import os
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from tune_xray.models.scan import available_backends, selective_scan

from .models.scan_reference import sequential_scan
from .models.test_scan import SHAPES, assert_bf16_is_rounded_fp32, assert_matches, make_inputs, values_and_grads

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")


def test_explain_runs_on_cuda_tensors():
    from tune_xray.explain import embeddings, eval_cost, gradcam
    from tune_xray.models import create_backbone
    from tune_xray.models.heads import Classifier

    for name in ("test_resnet", "test_mambavision"):
        backbone, width = create_backbone(name, image_size=64)
        model = Classifier(backbone, width, 2).to(CUDA)
        x = torch.randn(4, 3, 64, 64, device=CUDA)
        features = embeddings(model, x, batch=2)
        assert isinstance(features, np.ndarray) and features.shape == (4, width)
        assert gradcam(model, x, [0, 1, 0, 1])[0].shape == (4, 64, 64)
        cost = eval_cost(model, model, torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8).float(), "cuda",
                         batch=4, seconds=0.1)
        assert cost["latency_ms"] > 0 and cost["latency_ms_b32"] > 0 and cost["gflops"] > 0


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_trains_on_the_device_cache(make_config, tmp_path, amp):
    """bf16 autocast, or fp16 with a GradScaler; channels_last images and weights; the uint8 cache on the GPU."""
    from tune_xray.phases import run_phases

    cfg = make_config(device="cuda", amp=amp, model={"backbone": "test_mambavision"},
                      data={"device_cache": True}, supervised={"epochs": 1})
    summary = run_phases(cfg, tmp_path / "run")
    assert summary["device"] == "cuda" and 0 <= summary["val"]["mean_auroc"] <= 1
    assert summary["scan_backend"] == available_backends("cuda")[0]


def test_channels_last_and_fused_optimizers(make_config):
    from tune_xray.config import OptimizerConfig
    from tune_xray.phases.common import Precision, build_optimizer

    precision = Precision(make_config(device="cuda"), CUDA)
    model = precision.module(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.LazyLinear(2)))
    assert precision.images(torch.randn(2, 3, 8, 8, device=CUDA)).is_contiguous(memory_format=torch.channels_last)
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    model(torch.randn(2, 3, 8, 8, device=CUDA))
    for name in ("adamw", "sgd"):
        assert build_optimizer(model, OptimizerConfig(name=name)).defaults["fused"] is True


def test_the_device_cache_serves_batches_and_counts_the_trials_share(make_config):
    from tune_xray.data import loader as loading

    cfg = make_config(data={"device_cache": True})
    data = loading.prepare(cfg.data)
    loader = loading.make_loader(data.dataset("train"), 16, shuffle=True, device=CUDA, data=cfg.data)
    assert isinstance(loader, loading.DeviceBatches)
    x, y = next(iter(loader))
    assert x.is_cuda and x.dtype == torch.uint8 and y.is_cuda
    loading._DEVICE_IMAGES.clear()  # none resident: auto decides from the share
    size, total = int(np.prod(data.cache.shape)), torch.cuda.get_device_properties(CUDA).total_memory
    assert loading.use_device_cache(data.cache, CUDA, "auto", share=1.0)
    assert not loading.use_device_cache(data.cache, CUDA, "auto", share=size / total)  # half its share < the cache


def test_a_training_epoch_reads_the_device_once():
    """No host read per step: the loss is summed on the GPU and read at the end (and every 32 steps)."""
    from tune_xray.augment import TrainAugment, normalization
    from tune_xray.config import AugmentConfig
    from tune_xray.phases.common import run_epoch

    cfg = AugmentConfig(image_size=48, hflip=0.5, rotation=10, erasing=3)
    augment = TrainAugment(cfg, 64, 3, *normalization(cfg, 3)).to(CUDA)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 1)).to(CUDA)
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)
    batches = [torch.randint(0, 255, (8, 1, 64, 64), dtype=torch.uint8, device=CUDA) for _ in range(10)]
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run_epoch(batches, lambda x: model(augment(x)).square().mean(), [optimizer], list(model.parameters()))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchronizing" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]  # the epoch's one read of its summed loss


@pytest.mark.parametrize("backend", ["kernel", "triton", "torch"])
@pytest.mark.parametrize("shape", [SHAPES[k] for k in ("VMamba's grouped B/C", "MambaVision window 14²",
                                                        "very steep, N 1, groups", "prime L")],
                         ids=["vmamba", "mambavision", "steep", "prime"])
def test_scan_backends_equal_the_definition_on_cuda(shape, backend):
    if backend not in available_backends("cuda"):
        pytest.skip(f"{backend} is not available here")
    inputs = {k: v.to(CUDA) for k, v in make_inputs(**shape).items()}
    ours = values_and_grads(lambda **kw: selective_scan(**kw, backend=backend), inputs)
    reference = values_and_grads(sequential_scan, inputs)
    rtol = 1e-3 if backend == "kernel" else 1e-4  # mamba-ssm's kernel uses its own exp and fp32 sums
    assert_matches(ours, reference, ["y", *inputs], rtol)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_scan_backends_take_bf16(backend):
    if backend not in available_backends("cuda"):
        pytest.skip(f"{backend} is not available here")
    assert_bf16_is_rounded_fp32(backend, {k: v.to(CUDA, torch.bfloat16)
                                          for k, v in make_inputs(batch=2, dim=8, length=300, n=4).items()})


def _ddp_step(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from tune_xray.phases.common import distributed, run_epoch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl", rank=rank, world_size=world)
    torch.cuda.set_device(rank)
    torch.manual_seed(0)
    model = nn.Linear(4, 1).cuda()
    trained = distributed(model, world, torch.device("cuda", rank))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.full((2, 4), float(rank + 1), device="cuda")  # each rank its own batch
    run_epoch([x], lambda b: trained(b).sum(), [optimizer], list(model.parameters()), model=trained)
    torch.save(model.state_dict(), f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_a_ddp_step_across_two_gpus_keeps_the_ranks_equal(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_step, args=(2, port, str(tmp_path)), nprocs=2)
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)  # one all-reduced gradient, one step, on both ranks
