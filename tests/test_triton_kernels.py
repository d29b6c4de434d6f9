"""The ``triton`` backend around its kernels: which calls reach them and which fall back to
``torch``, autotuned launches, and whole explanations equal to the ``torch`` backend's. The
kernels themselves are tested per primitive (test_affine_relevance.py,
test_affine_relevance_l1.py).

Here (no GPU) the kernels run through Triton's interpreter on CPU tensors
(``TRITON_INTERPRET=1``, set by conftest.py); on a CUDA machine run the same file with
``TRITON_INTERPRET=0 RLRP_TRITON_AUTOTUNE=0`` to test the compiled kernels on ``cuda``
tensors (autotuning off: one compile per kernel variant; ``test_autotuned_launch`` still
checks the autotuned path with two configs each).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from primitive_cases import (CONV2D, WIDE_GROUPED, assert_close, assert_norms, stab64,
                             transpose64)

triton = pytest.importorskip("triton")

import rlrp_fast  # noqa: E402
from rlrp_fast.backends import TorchBackend, get_backend  # noqa: E402
from rlrp_fast.backends import triton_backend  # noqa: E402
from rlrp_fast.backends.triton_backend import TritonBackend  # noqa: E402
from rlrp_fast.kernels import _common, affine_forward_abs, affine_relevance_conv, affine_relevance_dense  # noqa: E402,E501
from rlrp_fast.kernels import affine_relevance as kernels  # noqa: E402
from rlrp_fast.plan import Affine  # noqa: E402

if _common.INTERPRET:
    DEVICES = ["cpu"]
elif torch.cuda.is_available():
    DEVICES = ["cuda"]
else:
    DEVICES = []
pytestmark = [pytest.mark.skipif(not DEVICES, reason="Triton needs CUDA or TRITON_INTERPRET=1"),
              pytest.mark.usefixtures("no_tf32")]
DEVICES = DEVICES or ["cpu"]


def _affine(module: nn.Module) -> Affine:
    """A plan step for a bare Linear/Conv module (what capture would build)."""
    dims = {nn.Linear: 0, nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[type(module)]
    geometry = {} if dims == 0 else dict(stride=module.stride, padding=module.padding,
                                        dilation=module.dilation, groups=module.groups)
    return Affine(name="layer", target="layer", inputs=(0,), output=1,
                  weight=module.weight.detach(), bias=None, conv_dims=dims, **geometry)


# -- the backend ---------------------------------------------------------------------------
def test_unavailable_reason():
    if _common.INTERPRET or torch.cuda.is_available():
        assert triton_backend.unavailable_reason() is None
    else:
        assert "CUDA" in triton_backend.unavailable_reason()


def test_import_does_not_import_triton():
    code = "import sys, rlrp_fast; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ))


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the launches of each kernel (to tell fused calls from fallbacks)."""
    calls = {"dense": 0, "conv": 0, "abs": 0}

    def spy(module, name, key):
        fn = getattr(module, name)

        def wrapped(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)
        monkeypatch.setattr(module, name, wrapped)

    spy(affine_relevance_dense, "launch", "dense")
    spy(affine_relevance_conv, "launch", "conv")
    spy(affine_forward_abs, "affine_forward_abs", "abs")
    return calls


@pytest.mark.parametrize("device", DEVICES)
def test_backend_methods(device, kernel_calls):
    """TritonBackend's contractions (and ``affine_abs``) equal TorchBackend's, through the
    kernels."""
    torch_b, triton_b = TorchBackend(), TritonBackend()
    assert triton_b.name == "triton"
    for module, x_shape in [(nn.Linear(13, 10), (3, 13)),
                            (nn.Conv2d(4, 7, 3, 2, 1), (3, 4, 9, 8)),
                            (nn.Conv1d(4, 6, 3, 1, 1, groups=2), (3, 4, 11))]:
        step = _affine(module)
        w = step.weight.to(device)
        a = torch.randn(x_shape, device=device)
        z = torch_b.affine_forward(step, w, None, a)
        g = torch.randn_like(z)
        scale = torch.rand(3, device=device) + 0.5
        r, l1 = triton_b.affine_relevance_l1(step, w, g, a, scale)
        r_ref, l1_ref = torch_b.affine_relevance_l1(step, w, g, a, scale)
        assert r.shape == r_ref.shape
        assert_close(r, r_ref, 1e-5, f"{module} l1 path")
        assert torch.allclose(l1, l1_ref, rtol=1e-5)
        for a_arg in (a, None):
            r = triton_b.affine_relevance(step, w, g, a.shape, a_arg, z=z, eps=1e-6)
            r_ref = torch_b.affine_relevance(step, w, g, a.shape, a_arg, z=z, eps=1e-6)
            assert_close(r, r_ref, 1e-5, f"{module} classic path")
        # norm="neuron"'s |σ⊙W||a|, the folded scale of either sign
        sigma = torch.randn(w.shape[0], device=device)
        abs_weight = (w * sigma.view(-1, *[1] * (w.dim() - 1))).abs()
        s = triton_b.affine_abs(step, a, w, sigma, lambda: abs_weight)
        assert_close(s, torch_b.affine_abs(step, a, w, sigma, lambda: abs_weight), 1e-5,
                     f"{module} affine_abs")
    assert kernel_calls == {"dense": 3, "conv": 6, "abs": 3}


@pytest.mark.parametrize("device", DEVICES)
def test_backend_falls_back(device, kernel_calls):
    """Conv3d and float64 relevance (and ``affine_abs``) go to the torch backend, with its
    results."""
    torch_b, triton_b = TorchBackend(), TritonBackend()
    step = _affine(nn.Conv3d(2, 3, 3, 1, 1))
    a = torch.randn(2, 2, 4, 5, 3, device=device)
    w = step.weight.to(device)
    g = torch.randn(2, 3, 4, 5, 3, device=device)
    r, l1 = triton_b.affine_relevance_l1(step, w, g, a)
    assert torch.equal(r, torch_b.affine_relevance_l1(step, w, g, a)[0])
    step = _affine(nn.Linear(5, 4).double())
    a = torch.randn(2, 5, dtype=torch.float64, device=device)
    g = torch.randn(2, 4, dtype=torch.float64, device=device)
    w = step.weight.to(device)
    r, l1 = triton_b.affine_relevance_l1(step, w, g, a)
    assert r.dtype == torch.float64
    assert torch.equal(r, torch_b.affine_relevance_l1(step, w, g, a)[0])
    s = triton_b.affine_abs(step, a, w, None, w.abs)
    assert torch.equal(s, torch_b.affine_abs(step, a, w, None, w.abs))
    assert kernel_calls == {"dense": 0, "conv": 0, "abs": 0}


# -- whole explainer -----------------------------------------------------------------------
class _Block(nn.Module):
    """A ResNet basic block with a strided projection shortcut."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, 2, bias=False),
                                  nn.BatchNorm2d(c_out))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.down(x))


def _randomise(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
        elif getattr(m, "bias", None) is not None:
            m.bias.data.uniform_(-0.1, 0.1)
    return model.eval()


def _models():
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Conv2d(8, 12, 3, 2, 1), nn.ReLU(),
                        nn.Conv2d(12, 12, 3, 1, 2, dilation=2, groups=3), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(48, 20), nn.ReLU(),
                        nn.Linear(20, 5))
    resnet = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.ReLU(), _Block(8, 16),
                           nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))
    return {"cnn": (cnn, (3, 3, 13, 11)), "resnet": (resnet, (3, 3, 11, 12))}


RULE_OPTIONS = {"rlrp": {"rule": "rlrp", "norm": "layer"},
                "rlrp-neuron": {"rule": "rlrp", "norm": "neuron"},
                "epsilon": {"rule": "epsilon"}}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rule", list(RULE_OPTIONS))
@pytest.mark.parametrize("model_name", ["cnn", "resnet"])
def test_explainer_triton_equals_torch(device, rule, model_name, kernel_calls):
    model, x_shape = _models()[model_name]
    model = _randomise(model).to(device)
    x = torch.randn(x_shape, device=device)
    options = RULE_OPTIONS[rule]
    reference = rlrp_fast.Explainer(model, backend="torch", **options)(x)
    explainer = rlrp_fast.Explainer(model, backend="torch", **options)
    if device == "cuda":
        explainer = rlrp_fast.Explainer(model, backend="triton", **options)
    else:  # the registry serves triton on cuda only; the interpreter runs on CPU tensors
        explainer._backend = TritonBackend()
    assert explainer.backend == "triton"
    fused = explainer(x)
    assert kernel_calls["conv"] >= 3 and kernel_calls["dense"] >= 1
    # norm="neuron": every Linear/Conv's |W||a| from the affine_forward_abs kernel
    assert kernel_calls["abs"] == (sum(isinstance(m, (nn.Conv2d, nn.Linear))
                                       for m in model.modules()) if rule == "rlrp-neuron" else 0)
    assert torch.equal(fused.targets, reference.targets)
    assert_close(fused.relevance, reference.relevance, 1e-5, f"{model_name}/{rule}")


@pytest.mark.skipif(_common.INTERPRET or not torch.cuda.is_available(), reason="needs CUDA")
def test_autotuned_launch(monkeypatch):
    """Autotuning benchmarks each config by running it: the L1 buffer must be re-zeroed
    (``reset_to_zero``), and the inputs left untouched."""
    for module, kernel, key in [
            (affine_relevance_dense, affine_relevance_dense._affine_relevance_dense_kernel,
             ["M", "IN", "OUT"]),
            (affine_relevance_conv, affine_relevance_conv._affine_relevance_conv_kernel,
             ["MQ", "CIN_G", "COUT_G"])]:
        tuned = triton.autotune(configs=module._configs()[:2], key=key,
                                reset_to_zero=["l1_ptr"])(kernel)
        monkeypatch.setattr(module, "_launcher", tuned)
        monkeypatch.setattr(module, "_launcher_meta", {})
    # and the narrow-group (depthwise) kernel
    grouped = triton.autotune(configs=affine_relevance_conv._grouped_configs()[:2],
                              key=["MQ", "CIN_G", "COUT_G"], reset_to_zero=["l1_ptr"])(
        affine_relevance_conv._affine_relevance_grouped_kernel)
    monkeypatch.setattr(affine_relevance_conv, "_grouped_launcher", grouped)
    monkeypatch.setattr(affine_relevance_conv, "_grouped_launcher_meta", {})
    g = torch.randn(5, 37, device="cuda")
    w = torch.randn(37, 29, device="cuda")
    a = torch.randn(5, 29, device="cuda")
    g_copy = g.clone()
    r, l1 = kernels.affine_relevance_l1(g, w, a, stride=[], padding=[], dilation=[], groups=1,
                                        conv_dims=0)
    expected = (g.double() @ w.double()).cpu() * a.double().cpu()
    assert torch.equal(g, g_copy)
    assert_close(r, expected, 1e-5)
    assert_norms(l1, expected, 1e-5)
    for case in (WIDE_GROUPED, CONV2D):  # the GEMM kernel; the narrow-group kernel
        step = case.step()
        w = step.weight.cuda()
        a = torch.randn(case.input_shape, device="cuda")
        g = torch.randn(case.output_shape(step), device="cuda")
        z = torch.randn_like(g)
        g_copy = g.clone()
        r, l1 = kernels.affine_relevance_l1(g, w, a, **step.geometry)
        expected = transpose64(step, g, a.shape) * a.double().cpu()
        assert torch.equal(g, g_copy)
        assert_close(r, expected, 1e-5)
        assert_norms(l1, expected, 1e-5)
        # with z: no L1, the dummy L1 buffer is zeroed, not g
        r = kernels.affine_relevance(g, w, a=a, z=z, eps=1e-6, input_shape=a.shape,
                                     **step.geometry)
        assert torch.equal(g, g_copy)
        expected = transpose64(step, g.double().cpu() / stab64(z, 1e-6), a.shape) \
            * a.double().cpu()
        assert_close(r, expected, 1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_registry_serves_triton_on_cuda():
    assert get_backend("triton", torch.device("cuda")).name == "triton"
