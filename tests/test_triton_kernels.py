"""The ``triton`` backend's kernels (``rlrp_fast.kernels``) against float64 values computed
directly with float64 torch ops, and against the ``torch`` backend.

Here (no GPU) the kernels run through Triton's interpreter on CPU tensors
(``TRITON_INTERPRET=1``, set by conftest.py); on a CUDA machine run the same file with
``TRITON_INTERPRET=0 RLRP_TRITON_AUTOTUNE=0`` to test the compiled kernels on ``cuda``
tensors (autotuning off: one compile per kernel variant; ``test_autotuned_launch`` still
checks the autotuned path with two configs each). The interpreter is
slow: shapes are tiny and ragged (never multiples of a block), and a few cases rerun with
16-wide blocks so that several tiles, groups of tiles and reduction steps are exercised.

Tolerances: per sample relative L1 error ``‖R − E‖₁ / ‖E‖₁`` and relative max error,
both 1e-5 for every dtype of ``a``: the kernels upcast ``a`` exactly, so its dtype adds no error;
what remains is fp32 accumulation (on a GPU, tf32x3 tensor-core products).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

triton = pytest.importorskip("triton")

import rlrp_fast  # noqa: E402
from rlrp_fast.backends import TorchBackend, get_backend  # noqa: E402
from rlrp_fast.backends import triton_backend  # noqa: E402
from rlrp_fast.backends.triton_backend import TritonBackend  # noqa: E402
from rlrp_fast.kernels import _common, conv_relevance, linear_relevance  # noqa: E402
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

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}
DTYPES = list(TOL)
SMALL_BLOCKS_LINEAR = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}
SMALL_BLOCKS_CONV = {"BLOCK_P": 16, "BLOCK_C": 16, "BLOCK_K": 16, "GROUP_M": 2}


# -- helpers -------------------------------------------------------------------------------
def _rel_errors(r: torch.Tensor, e: torch.Tensor) -> tuple[float, float]:
    """(max per-sample relative L1 error, max abs error / max |e|), in float64."""
    r, e = r.detach().double().cpu(), e.detach().double().cpu()
    diff = (r - e).abs().reshape(len(e), -1).sum(1)
    norm = e.abs().reshape(len(e), -1).sum(1).clamp_min(1e-300)
    return (diff / norm).max().item(), ((r - e).abs().max() / e.abs().max()).item()


def _assert_close(r, e, tol, what=""):
    assert torch.isfinite(r).all(), f"{what}: non-finite values (unwritten output?)"
    l1_err, max_err = _rel_errors(r, e)
    assert l1_err <= tol and max_err <= tol, f"{what}: rel L1 {l1_err:.2e}, max {max_err:.2e}"


def _assert_l1(l1, expected_r, tol):
    e = expected_r.double().cpu().abs().reshape(len(expected_r), -1).sum(1)
    err = ((l1.double().cpu() - e).abs() / e).max().item()
    assert err <= tol, f"L1 norms off by {err:.2e}"


def _poisoned(shape, device, channels_last=False):
    out = torch.full(shape, float("nan"), device=device)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def _stab64(z: torch.Tensor, eps: float) -> torch.Tensor:
    z = z.double().cpu()
    return z if eps == 0 else z + eps * ((z == 0).double() + z.sign())


def _tiny_z(shape, device) -> torch.Tensor:
    """Pre-activations with exact zeros and ±1e-30 (where LRP-0 explodes), rest random."""
    z = torch.randn(shape)
    flat = z.view(-1)
    idx = torch.randperm(flat.numel())
    third = max(1, flat.numel() // 6)
    flat[idx[:third]] = 0.0
    flat[idx[third:2 * third]] = 1e-30
    flat[idx[2 * third:3 * third]] = -1e-30
    return z.to(device)


def _affine(module: nn.Module) -> Affine:
    """A plan step for a bare Linear/Conv module (what capture would build)."""
    dims = {nn.Linear: 0, nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[type(module)]
    geometry = {} if dims == 0 else dict(stride=module.stride, padding=module.padding,
                                        dilation=module.dilation, groups=module.groups)
    return Affine(name="layer", target="layer", inputs=(0,), output=1,
                  weight=module.weight.detach(), bias=None, conv_dims=dims, **geometry)


def _conv64_adjoint(g, w, input_shape, stride, padding, dilation, groups):
    """``Wᵀ g`` in float64 on CPU, as the input gradient of the convolution (autograd)."""
    conv = {3: F.conv1d, 4: F.conv2d}[len(input_shape)]
    x = torch.zeros(input_shape, dtype=torch.float64, requires_grad=True)
    y = conv(x, w.double().cpu(), None, stride, padding, dilation, groups)
    (grad,) = torch.autograd.grad(y, x, g.double().cpu())
    return grad


# -- Linear --------------------------------------------------------------------------------
LINEAR_SHAPES = [  # (N, rows per sample L or None for 2-d, IN, OUT)
    (1, None, 7, 5),
    (3, None, 29, 37),
    (5, 3, 19, 23),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=str)
def test_linear_rlrp(device, dtype, shape):
    n, rows, d_in, d_out = shape
    lead = (n,) if rows is None else (n, rows)
    g = torch.randn(*lead, d_out, device=device)
    w = torch.randn(d_out, d_in, device=device)
    a = torch.randn(*lead, d_in, device=device).to(dtype)
    scale = torch.rand(n, device=device) + 0.5
    out = _poisoned((*lead, d_in), device)

    r, l1 = linear_relevance.linear_relevance(g, w, a, scale=scale, out=out)

    assert r.data_ptr() == out.data_ptr() and r.dtype == torch.float32
    s64 = scale.double().cpu().view(-1, *[1] * (len(lead)))
    expected = (g.double().cpu() @ w.double().cpu()) * a.double().cpu() * s64
    _assert_close(r, expected, TOL[dtype], "vs float64")
    _assert_l1(l1, expected, TOL[dtype])
    step = _affine(nn.Linear(d_in, d_out))
    r_torch, l1_torch = TorchBackend().affine_contract_l1(step, w, g, a, scale)
    _assert_close(r, r_torch, TOL[dtype], "vs torch backend")
    _assert_l1(l1, r_torch, TOL[dtype])
    assert torch.allclose(l1.double(), l1_torch.double(), rtol=TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_linear_many_tiles(device):
    """16-wide blocks: 3 row tiles in groups of 2 (one ragged group), 3 column tiles,
    3 reduction steps; a sample's rows straddle tiles (per-row L1 atomics)."""
    g = torch.randn(3, 11, 37, device=device)
    w = torch.randn(37, 40, device=device)
    a = torch.randn(3, 11, 40, device=device)
    out = _poisoned((3, 11, 40), device)
    r, l1 = linear_relevance.linear_relevance(g, w, a, out=out, config=SMALL_BLOCKS_LINEAR)
    expected = (g.double().cpu() @ w.double().cpu()) * a.double().cpu()
    _assert_close(r, expected, 1e-5)
    _assert_l1(l1, expected, 1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("eps", [1e-6, 0.25, 0.0])
@pytest.mark.parametrize("z_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_a", [True, False], ids=["a", "no-a"])
def test_linear_classic_prologue(device, eps, z_dtype, with_a):
    """``a ⊙ Wᵀ(g / stab(z))`` with z holding exact zeros and ±1e-30."""
    n, d_in, d_out = 3, 21, 26
    g = torch.randn(n, d_out, device=device)
    w = torch.randn(d_out, d_in, device=device)
    a = torch.randn(n, d_in, device=device) if with_a else None
    z = _tiny_z((n, d_out), device)
    if eps == 0:  # LRP-0: only ±1e-30, no exact zero (that case is test_linear_lrp0_zero)
        z[z == 0] = 1e-30
    z = z.to(z_dtype)
    out = _poisoned((n, d_in), device)

    r, l1 = linear_relevance.linear_relevance(g, w, a, z=z, eps=eps, compute_l1=False,
                                              in_features=d_in, out=out)

    assert l1 is None
    expected = (g.double().cpu() / _stab64(z, eps)) @ w.double().cpu()
    if with_a:
        expected = expected * a.double().cpu()
    _assert_close(r, expected, 1e-5, "vs float64")
    step = _affine(nn.Linear(d_in, d_out))
    r_torch = TorchBackend().affine_contract(step, w, g, (n, d_in), a, z=z, eps=eps)
    _assert_close(r, r_torch, 1e-5, "vs torch backend")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy divides by 0
@pytest.mark.parametrize("device", DEVICES)
def test_linear_lrp0_zero(device):
    """LRP-0 with ``z == 0`` exactly: non-finite exactly where torch is non-finite."""
    g = torch.randn(4, 9, device=device)
    w = torch.randn(9, 6, device=device)
    a = torch.randn(4, 6, device=device)
    z = torch.randn(4, 9, device=device)
    z[1, 3] = 0.0
    z[2, 0] = -0.0
    r, _ = linear_relevance.linear_relevance(g, w, a, z=z, eps=0.0, compute_l1=False)
    step = _affine(nn.Linear(6, 9))
    r_torch = TorchBackend().affine_contract(step, w, g, a.shape, a, z=z, eps=0.0)
    assert torch.equal(torch.isfinite(r), torch.isfinite(r_torch))
    assert not torch.isfinite(r[1:3]).any() and torch.isfinite(r[[0, 3]]).all()
    _assert_close(r[[0, 3]], r_torch[[0, 3]], 1e-5)


# -- Conv ----------------------------------------------------------------------------------
# (spatial dims, kernel, stride, padding, dilation, groups, input size); ragged sizes, and
# strided cases whose output does not reach the last input rows (they get exactly 0).
CONV_CASES = [
    (2, 1, 1, 0, 1, 1, (9, 7)),
    (2, 1, 2, 0, 1, 1, (10, 7)),
    (2, 3, 1, 1, 1, 1, (9, 10)),
    (2, 3, 2, 1, 1, 1, (11, 10)),
    (2, 3, 2, 0, 1, 1, (10, 9)),
    (2, 7, 2, 3, 1, 1, (13, 11)),
    (2, 3, 1, 2, 2, 1, (9, 8)),
    (2, 3, 2, 1, 1, 3, (9, 9)),
    (2, 3, 1, 1, 1, 6, (7, 9)),         # depthwise
    (2, 5, 3, 2, 2, 2, (13, 12)),       # stride 3 with dilation 2
    (2, (3, 5), (2, 1), (1, 2), (1, 2), 1, (9, 11)),  # per-dim geometry
    (1, 3, 1, 1, 1, 1, (17,)),
    (1, 5, 2, 2, 2, 2, (19,)),
    (1, 7, 2, 3, 1, 1, (18,)),
]


def _conv_setup(device, case, n=3, c_in=6, c_out=9, a_dtype=torch.float32):
    dims, k, s, p, d, groups, size = case
    conv_cls = {1: nn.Conv1d, 2: nn.Conv2d}[dims]
    c_out = c_out if c_out % groups == 0 else 3 * groups
    conv = conv_cls(c_in, c_out, k, s, p, d, groups, bias=False)
    step = _affine(conv)
    w = step.weight.to(device)
    a = torch.randn(n, c_in, *size, device=device)
    z = F.conv2d(a, w, None, step.stride, step.padding, step.dilation, groups) if dims == 2 \
        else F.conv1d(a, w, None, step.stride, step.padding, step.dilation, groups)
    g = torch.randn_like(z)
    return step, w, a.to(a_dtype), z, g


def _case_id(case):
    dims, k, s, p, d, groups, size = case
    return f"{dims}d-k{k}-s{s}-p{p}-d{d}-g{groups}-{'x'.join(map(str, size))}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CONV_CASES, ids=_case_id)
def test_conv_rlrp(device, case):
    step, w, a, z, g = _conv_setup(device, case)
    scale = torch.rand(len(a), device=device) + 0.5
    out = _poisoned(a.shape, device)

    r, l1 = conv_relevance.conv_relevance(g, w, a.shape, step.stride, step.padding,
                                          step.dilation, step.groups, a, scale=scale, out=out)

    assert r.data_ptr() == out.data_ptr()
    s64 = scale.double().cpu().view(-1, *[1] * (a.dim() - 1))
    expected = (_conv64_adjoint(g, w, a.shape, step.stride, step.padding, step.dilation,
                                step.groups) * a.double().cpu() * s64)
    _assert_close(r, expected, 1e-5, "vs float64")
    _assert_l1(l1, expected, 1e-5)
    r_torch, l1_torch = TorchBackend().affine_contract_l1(step, w, g, a, scale)
    _assert_close(r, r_torch, 1e-5, "vs torch backend")
    assert torch.allclose(l1.double(), l1_torch.double(), rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [CONV_CASES[3], CONV_CASES[9], CONV_CASES[12]], ids=_case_id)
def test_conv_many_tiles(device, case):
    """16-wide blocks: many position tiles (some straddling samples: per-row L1 atomics),
    two channel tiles, several reduction steps per tap."""
    step, w, a, z, g = _conv_setup(device, case, n=2, c_in=18, c_out=34)
    out = _poisoned(a.shape, device)
    r, l1 = conv_relevance.conv_relevance(g, w, a.shape, step.stride, step.padding,
                                          step.dilation, step.groups, a, out=out,
                                          config=SMALL_BLOCKS_CONV)
    expected = _conv64_adjoint(g, w, a.shape, step.stride, step.padding, step.dilation,
                               step.groups) * a.double().cpu()
    _assert_close(r, expected, 1e-5)
    _assert_l1(l1, expected, 1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_conv_dtypes_layouts(device, dtype, n, channels_last):
    """Activations in each dtype; NCHW or channels-last ``a`` and ``g`` read in place."""
    step, w, a, z, g = _conv_setup(device, CONV_CASES[3], n=n, a_dtype=dtype)
    if channels_last:
        a = a.contiguous(memory_format=torch.channels_last)
        g = g.contiguous(memory_format=torch.channels_last)
    out = _poisoned(a.shape, device, channels_last)
    r, l1 = conv_relevance.conv_relevance(g, w, a.shape, step.stride, step.padding,
                                          step.dilation, step.groups, a, out=out)
    expected = _conv64_adjoint(g, w, a.shape, step.stride, step.padding, step.dilation,
                               step.groups) * a.double().cpu()
    _assert_close(r, expected, TOL[dtype], "vs float64")
    _assert_l1(l1, expected, TOL[dtype])
    r_torch, _ = TorchBackend().affine_contract_l1(step, w, g, a)
    _assert_close(r, r_torch, TOL[dtype], "vs torch backend")


@pytest.mark.parametrize("device", DEVICES)
def test_expanded_inputs(device):
    """zB's bounds arrive as stride-0 expansions of a per-channel vector (read in place)."""
    step, w, a, z, g = _conv_setup(device, CONV_CASES[3])
    low = torch.randn(a.shape[1], device=device).view(1, -1, 1, 1).expand_as(a)
    r, _ = conv_relevance.conv_relevance(g, w, a.shape, step.stride, step.padding,
                                         step.dilation, step.groups, low, z=z, eps=1e-6,
                                         compute_l1=False)
    r_torch = TorchBackend().affine_contract(step, w, g, a.shape, low, z=z, eps=1e-6)
    _assert_close(r, r_torch, 1e-5, "conv")
    lin = _affine(nn.Linear(11, 7))
    w = lin.weight.to(device)
    low = torch.randn(11, device=device).expand(4, 11)
    g = torch.randn(4, 7, device=device)
    r, _ = linear_relevance.linear_relevance(g, w, low, compute_l1=False)
    _assert_close(r, TorchBackend().affine_contract(lin, w, g, low.shape, low), 1e-5, "linear")


@pytest.mark.parametrize("device", DEVICES)
def test_conv_allocates_channels_last(device):
    step, w, a, z, g = _conv_setup(device, CONV_CASES[2])
    a = a.contiguous(memory_format=torch.channels_last)
    r, _ = conv_relevance.conv_relevance(g, w, a.shape, step.stride, step.padding,
                                         step.dilation, step.groups, a)
    assert r.is_contiguous(memory_format=torch.channels_last)
    r_torch, _ = TorchBackend().affine_contract_l1(step, w, g, a)
    _assert_close(r, r_torch, 1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("eps", [1e-6, 0.25, 0.0])
@pytest.mark.parametrize("case", [CONV_CASES[3], CONV_CASES[7], CONV_CASES[12]], ids=_case_id)
@pytest.mark.parametrize("with_a", [True, False], ids=["a", "no-a"])
def test_conv_classic_prologue(device, eps, case, with_a):
    """``a ⊙ Wᵀ(g / stab(z))`` with z holding exact zeros and ±1e-30."""
    step, w, a, _, g = _conv_setup(device, case)
    z = _tiny_z(g.shape, device)
    if eps == 0:
        z[z == 0] = -1e-30
    a_arg = a if with_a else None
    out = _poisoned(a.shape, device)
    r, l1 = conv_relevance.conv_relevance(g, w, a.shape, step.stride, step.padding,
                                          step.dilation, step.groups, a_arg, z=z, eps=eps,
                                          compute_l1=False, out=out)
    assert l1 is None
    expected = _conv64_adjoint(g.double().cpu() / _stab64(z, eps), w, a.shape, step.stride,
                               step.padding, step.dilation, step.groups)
    if with_a:
        expected = expected * a.double().cpu()
    _assert_close(r, expected, 1e-5, "vs float64")
    r_torch = TorchBackend().affine_contract(step, w, g, a.shape, a_arg, z=z, eps=eps)
    _assert_close(r, r_torch, 1e-5, "vs torch backend")


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
    """Counts the kernels' entry-point calls (to tell fused calls from fallbacks)."""
    calls = {"linear": 0, "conv": 0}

    def spy(module, fn_name, key):
        fn = getattr(module, fn_name)

        def wrapped(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)
        monkeypatch.setattr(module, fn_name, wrapped)

    spy(linear_relevance, "linear_relevance", "linear")
    spy(conv_relevance, "conv_relevance", "conv")
    return calls


@pytest.mark.parametrize("device", DEVICES)
def test_backend_methods(device, kernel_calls):
    """TritonBackend's two contractions equal TorchBackend's, through the kernels."""
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
        r, l1 = triton_b.affine_contract_l1(step, w, g, a, scale)
        r_ref, l1_ref = torch_b.affine_contract_l1(step, w, g, a, scale)
        assert r.shape == r_ref.shape
        _assert_close(r, r_ref, 1e-5, f"{module} l1 path")
        assert torch.allclose(l1, l1_ref, rtol=1e-5)
        for a_arg in (a, None):
            r = triton_b.affine_contract(step, w, g, a.shape, a_arg, z=z, eps=1e-6)
            r_ref = torch_b.affine_contract(step, w, g, a.shape, a_arg, z=z, eps=1e-6)
            _assert_close(r, r_ref, 1e-5, f"{module} classic path")
    assert kernel_calls == {"linear": 3, "conv": 6}


@pytest.mark.parametrize("device", DEVICES)
def test_backend_falls_back(device, kernel_calls):
    """Conv3d and float64 relevance go to the torch backend, with its results."""
    torch_b, triton_b = TorchBackend(), TritonBackend()
    step = _affine(nn.Conv3d(2, 3, 3, 1, 1))
    a = torch.randn(2, 2, 4, 5, 3, device=device)
    w = step.weight.to(device)
    g = torch.randn(2, 3, 4, 5, 3, device=device)
    r, l1 = triton_b.affine_contract_l1(step, w, g, a)
    assert torch.equal(r, torch_b.affine_contract_l1(step, w, g, a)[0])
    step = _affine(nn.Linear(5, 4).double())
    a = torch.randn(2, 5, dtype=torch.float64, device=device)
    g = torch.randn(2, 4, dtype=torch.float64, device=device)
    w = step.weight.to(device)
    r, l1 = triton_b.affine_contract_l1(step, w, g, a)
    assert r.dtype == torch.float64
    assert torch.equal(r, torch_b.affine_contract_l1(step, w, g, a)[0])
    assert kernel_calls == {"linear": 0, "conv": 0}


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
    assert kernel_calls["conv"] >= 3 and kernel_calls["linear"] >= 1
    assert torch.equal(fused.targets, reference.targets)
    _assert_close(fused.relevance, reference.relevance, 1e-5, f"{model_name}/{rule}")


@pytest.mark.skipif(_common.INTERPRET or not torch.cuda.is_available(), reason="needs CUDA")
def test_autotuned_launch(monkeypatch):
    """Autotuning benchmarks each config by running it: the L1 buffer must be re-zeroed
    (``reset_to_zero``), and the inputs left untouched."""
    for module, key in [(linear_relevance, ["M", "IN", "OUT"]),
                        (conv_relevance, ["MQ", "CIN_G", "COUT_G"])]:
        kernel = (module._linear_relevance_kernel if module is linear_relevance
                  else module._conv_relevance_kernel)
        tuned = triton.autotune(configs=module._configs()[:2], key=key,
                                reset_to_zero=["l1_ptr"])(kernel)
        monkeypatch.setattr(module, "_launch", tuned)
        monkeypatch.setattr(module, "_launch_meta", {})
    g = torch.randn(5, 37, device="cuda")
    w = torch.randn(37, 29, device="cuda")
    a = torch.randn(5, 29, device="cuda")
    g_copy = g.clone()
    r, l1 = linear_relevance.linear_relevance(g, w, a)
    expected = (g.double() @ w.double()) * a.double()
    assert torch.equal(g, g_copy)
    _assert_close(r, expected, 1e-5)
    _assert_l1(l1, expected, 1e-5)
    step, w, a, z, g = _conv_setup("cuda", CONV_CASES[3])
    for z_arg in (None, z):  # with z: no L1, the dummy L1 buffer is zeroed, not g
        g_copy = g.clone()
        r, l1 = conv_relevance.conv_relevance(g, w, a.shape, step.stride, step.padding,
                                              step.dilation, step.groups, a, z=z_arg,
                                              eps=1e-6, compute_l1=z_arg is None)
        assert torch.equal(g, g_copy)
        g64 = g.double().cpu() if z_arg is None else g.double().cpu() / _stab64(z, 1e-6)
        expected = _conv64_adjoint(g64, w, a.shape, step.stride, step.padding,
                                   step.dilation, step.groups) * a.double().cpu()
        _assert_close(r, expected, 1e-5)
        if z_arg is None:
            _assert_l1(l1, expected, 1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_registry_serves_triton_on_cuda():
    assert get_backend("triton", torch.device("cuda")).name == "triton"
