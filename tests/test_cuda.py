"""The same results on a CUDA device as on the CPU (marked ``cuda``; skipped without one).

Each test first checks that the work really ran on the GPU, so that none can pass
by computing on the CPU. Tolerances: the MLPs' products are float32 matrix products
(no TF32 by default) and their statistics float64, so GPU and CPU agree to float32
rounding amplified by the solves; convolutions on the GPU may use TF32 (cuDNN's
default), hence the looser bounds for the ResNet.
"""

from __future__ import annotations

import pytest
import torch

from ccamerge.bn import reset_batchnorm
from ccamerge.files import load_data
from ccamerge.merge import merge
from ccamerge.pipeline import load_models
from ccamerge.stats import collect_statistics

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-300))


def test_statistics_on_cuda_equal_cpu(digits_mlps):
    loaded = load_models([str(p) for p in digits_mlps.paths[:2]])
    data = load_data(digits_mlps.calib_path)
    seen = set()
    by_device = {}
    for device in ("cpu", "cuda"):
        models = [loaded.build(sd, device) for sd in loaded.state_dicts]
        models[0].register_forward_hook(lambda _m, args, _o: seen.add(args[0].device.type))
        by_device[device] = collect_statistics(models, loaded.spec, data.batches(256), device)
    assert seen == {"cpu", "cuda"}
    for name, jc in by_device["cuda"].groups.items():
        assert jc.Q.device.type == "cuda"
        assert relative_difference(by_device["cpu"].groups[name].cov, jc.cov) < 1e-5


def test_batchnorm_reset_on_cuda_equals_cpu(digits_convnets):
    nets = digits_convnets.nets["resnet_cifar"]
    loaded = load_models([str(p) for p in nets.paths])
    data = load_data(digits_convnets.calib_path)
    models = {d: loaded.build(loaded.state_dicts[0], d) for d in ("cpu", "cuda")}
    for device, model in models.items():
        assert reset_batchnorm(model, data.batches(128), device) == len(data)
    cpu, gpu = models["cpu"].state_dict(), models["cuda"].state_dict()
    assert all(t.device.type == "cuda" for t in gpu.values())
    for k in cpu:
        if "running_" in k:
            assert relative_difference(cpu[k], gpu[k]) < 1e-2, k


@pytest.mark.parametrize("kind", ["mlp", "resnet"])
def test_merge_on_cuda_equals_cpu(kind, digits_mlps, digits_convnets):
    if kind == "mlp":
        paths, data, tolerance = digits_mlps.paths[:2], digits_mlps.calib_path, 1e-4
    else:
        nets = digits_convnets.nets["resnet_cifar"]
        paths, data, tolerance = nets.paths, digits_convnets.calib_path, 5e-2
    results = {
        d: merge([str(p) for p in paths], data=str(data), device=d, method_params={"gamma": 0.1})
        for d in ("cpu", "cuda")
    }
    assert next(results["cuda"].model.parameters()).device.type == "cuda"
    cpu, gpu = results["cpu"].state_dict, results["cuda"].state_dict
    worst = max(relative_difference(cpu[k], gpu[k]) for k in cpu if cpu[k].is_floating_point())
    print(f"{kind}: merge on cuda vs cpu, largest relative difference {worst:.2e}")
    assert worst < tolerance
