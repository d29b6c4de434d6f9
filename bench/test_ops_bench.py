"""Per-op timings of each available backend's R-LRP hot path, ``affine_contract_l1``
(``R̃ = a ⊙ Wᵀg`` and ``‖R̃‖₁`` per sample), batch 8.

Run with ``pytest bench/ --benchmark-only`` (add ``--benchmark-group-by=param:shape`` to
compare backends shape by shape). Not collected by the normal test run
(``testpaths = ["tests"]``): benchmarks are not tests. Each case first checks the backend
against the ``torch`` backend, so a fast wrong kernel cannot post a time.
"""
from __future__ import annotations

import pytest
import torch

from rlrp_fast.backends import get_backend, unavailable_reason
from rlrp_fast.plan import Affine

BATCH = 8

# name: (in, out, kernel, stride, padding, spatial in) — kernel 0 means Linear
SHAPES = {
    "dense 4096->1000": (4096, 1000, 0, 1, 0, 0),
    "conv 64->64 3x3 @56": (64, 64, 3, 1, 1, 56),
    "conv 256->512 1x1 s2 @56": (256, 512, 1, 2, 0, 56),
    "conv 3->64 7x7 s2 @224": (3, 64, 7, 2, 3, 224),
}


def _devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _backends() -> list:
    params = []
    for device in _devices():
        for name in ("torch", "cpp", "triton"):
            wanted = {"cpp": "cpu", "triton": "cuda"}.get(name, device)
            if wanted != device:
                continue
            reason = None if name == "torch" else unavailable_reason(name)
            marks = [pytest.mark.skip(reason=f"{name}: {reason}")] if reason else []
            params.append(pytest.param((name, device), id=f"{name}-{device}", marks=marks))
    return params


def _case(shape: str, device: str):
    c_in, c_out, k, stride, pad, size = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    if k == 0:
        w = torch.randn(c_out, c_in, generator=g) / c_in ** 0.5
        step = Affine(name="fc", target="fc", inputs=(0,), output=1, weight=w, bias=None)
        a = torch.randn(BATCH, c_in, generator=g).relu_()
        out_shape = (BATCH, c_out)
    else:
        w = torch.randn(c_out, c_in, k, k, generator=g) / (c_in * k * k) ** 0.5
        step = Affine(name="conv", target="conv", inputs=(0,), output=1, weight=w, bias=None,
                      conv_dims=2, stride=(stride, stride), padding=(pad, pad),
                      dilation=(1, 1), groups=1)
        a = torch.randn(BATCH, c_in, size, size, generator=g).relu_()
        out = (size + 2 * pad - k) // stride + 1
        out_shape = (BATCH, c_out, out, out)
    grad = torch.randn(*out_shape, generator=g)
    scale = torch.rand(BATCH, generator=g) + 0.5
    return step, w.to(device), grad.to(device), a.to(device), scale.to(device)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("backend", _backends())
def test_affine_contract_l1(benchmark, backend, shape):
    name, device = backend
    step, w, grad, a, scale = _case(shape, device)
    impl = get_backend(name, torch.device(device))
    ref_r, ref_l1 = get_backend("torch", torch.device(device)).affine_contract_l1(
        step, w, grad, a, scale)
    r, l1 = impl.affine_contract_l1(step, w, grad, a, scale)
    torch.testing.assert_close(r, ref_r, rtol=1e-4, atol=1e-4 * ref_r.abs().max().item())
    torch.testing.assert_close(l1, ref_l1, rtol=1e-4, atol=0)

    def call():
        out = impl.affine_contract_l1(step, w, grad, a, scale)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark.extra_info.update(backend=name, device=device, shape=shape, batch=BATCH)
    benchmark(call)
