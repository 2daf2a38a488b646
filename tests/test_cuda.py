"""The same results on a CUDA device as on the CPU (marked ``cuda``; skipped without one).

Each test first checks that the work really ran on the GPU, so that none can pass
by computing on the CPU. Tolerances: the MLPs' products are float32 matrix products
(no TF32 by default) and their statistics float64, so GPU and CPU agree to float32
rounding amplified by the solves; convolutions on the GPU may use TF32 (cuDNN's
default), hence the looser bounds for the ResNet. The refit's least-squares fits
amplify such rounding in their weakly determined directions: on the CPU, inputs
perturbed by 1e-6 (MLP) and 1e-3 (ResNet, like TF32) relative moved the refitted
weights by 2.4e-4 and 4.9e-3, and the merged outputs by 1.0e-5 and 6.4e-4; the
bounds below are about ten times those. A BatchNorm's running mean is compared on
the scale of its running standard deviation (the refit can leave means of about 1e-9
whose relative rounding says nothing).
"""

from __future__ import annotations

import pytest
import torch

from ccamerge.io.files import load_data
from ccamerge.maths.bn import reset_batchnorm
from ccamerge.maths.stats import collect_statistics
from ccamerge.pipeline import load_models
from ccamerge.runs.merge import merge

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


WEIGHT_TOLERANCE = {("mlp", False): 1e-4, ("mlp", True): 3e-3, ("resnet", False): 5e-2,
                    ("resnet", True): 5e-2}  # fmt: skip
OUTPUT_TOLERANCE = {"mlp": 1e-4, "resnet": 1e-2}


def relative_difference(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor | None = None):
    """``max|a - b| / max|scale|`` (``scale``: ``a`` when not given)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    scale = a if scale is None else scale.detach().double().cpu()
    return float((a - b).abs().max() / scale.abs().max().clamp_min(1e-300))


def largest_state_difference(cpu: dict, gpu: dict) -> float:
    """Over floating tensors; a running mean on the scale of its running std."""
    worst = 0.0
    for k, t in cpu.items():
        if not t.is_floating_point():
            continue
        var = k.removesuffix("running_mean") + "running_var"
        scale = cpu[var].double().sqrt() if k.endswith("running_mean") else None
        worst = max(worst, relative_difference(t, gpu[k], scale))
    return worst


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


@pytest.mark.parametrize("refit", [True, False])
@pytest.mark.parametrize("kind", ["mlp", "resnet"])
def test_merge_on_cuda_equals_cpu(kind, refit, digits_mlps, digits_convnets):
    """The library's default merge (the refit) and the paper's merge (``refit=False``):
    the same tensors and the same outputs on the calibration data."""
    if kind == "mlp":
        paths, data = digits_mlps.paths[:2], digits_mlps.calib_path
    else:
        paths, data = digits_convnets.nets["resnet_cifar"].paths, digits_convnets.calib_path
    results = {
        d: merge(
            [str(p) for p in paths],
            data=str(data),
            device=d,
            method_params={"gamma": 0.1},
            refit=refit,
        )
        for d in ("cpu", "cuda")
    }
    assert next(results["cuda"].model.parameters()).device.type == "cuda"
    for result in results.values():  # the refit ran (not skipped with a warning), or not
        assert (result.report.get("refit") is not None) == refit, result.report["warnings"]
    weights = largest_state_difference(results["cpu"].state_dict, results["cuda"].state_dict)
    x = load_data(data).x[:512]
    with torch.no_grad():
        outputs = [results[d].model.eval()(x.to(d)) for d in ("cpu", "cuda")]
    out = relative_difference(*outputs)
    print(f"{kind}, refit {refit}: cuda vs cpu, weights {weights:.2e}, outputs {out:.2e}")
    assert weights < WEIGHT_TOLERANCE[kind, refit]
    assert out < OUTPUT_TOLERANCE[kind]
