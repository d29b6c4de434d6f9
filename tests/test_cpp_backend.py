"""The ``cpp`` backend (``torch.ops.rlrp_fast.*`` from ``csrc/``) against float64 math written
out here with plain torch ops, against the ``torch`` backend, and end to end on torchvision
VGG16 / ResNet50.

Skipped when the extension is not built, except under CI (``CI`` set), where the package is
installed with ``pip install --no-build-isolation -e ".[test]"`` and a missing extension is a
failure.

Tolerances (relative L1 over the whole tensor, against float64 math on the same inputs — a
low-precision ``a`` is upcast exactly, so only the relevance dtype sets the error):

- relevance float32: 1e-5 (GEMM rounding, ~1e-7 per output; the sums are ≤ a few hundred terms)
- relevance float64: 1e-12
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import rlrp_fast
from rlrp_fast.backends import get_backend, unavailable_reason
from rlrp_fast.backends.torch_backend import TorchBackend
from rlrp_fast.plan import Affine

REASON = unavailable_reason("cpp")
needs_cpp = pytest.mark.skipif(REASON is not None, reason=f"cpp backend: {REASON}")

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def test_extension_is_built_in_ci():
    """CI builds the extension; its absence there is a broken build, not a skip."""
    if REASON is not None and os.environ.get("CI"):
        pytest.fail(f"CI is set but the cpp backend is unavailable: {REASON}")


def test_import_works_without_extension():
    """Without rlrp_fast._C: the package imports, the backend says how to build it, 'auto'
    falls back to torch and asking for 'cpp' is an error that says the same."""
    code = (
        "import sys, warnings, torch\n"
        "sys.modules['rlrp_fast._C'] = None\n"  # makes `import rlrp_fast._C` fail
        "import rlrp_fast\n"
        "from rlrp_fast.backends import get_backend, unavailable_reason\n"
        "reason = unavailable_reason('cpp')\n"
        "assert reason and '--no-build-isolation' in reason, reason\n"
        "with warnings.catch_warnings(record=True):\n"
        "    warnings.simplefilter('always')\n"
        "    assert get_backend('auto', torch.device('cpu')).name == 'torch'\n"
        "try:\n"
        "    get_backend('cpp', torch.device('cpu'))\n"
        "except ValueError as exc:\n"
        "    assert '--no-build-isolation' in str(exc)\n"
        "else:\n"
        "    raise AssertionError('no error')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "RLRP_FAST_NO_JIT": "1"})
    assert done.returncode == 0, done.stderr


# -- cases ----------------------------------------------------------------------------------
# (conv_dims, batch, c_in, c_out, spatial, kernel, stride, padding, dilation, groups):
# ragged sizes everywhere; batch 1 and odd batches; 1x1, 3x3, 7x7; stride 1/2; padding 0/1/3;
# dilation 1/2; groups 1, 2 and depthwise. 1x1 convolutions take their own path in C++.
CONV_CASES = [
    (2, 1, 3, 5, (13, 11), 3, 1, 1, 1, 1),
    (2, 3, 6, 4, (17, 9), 3, 2, 0, 1, 2),
    (2, 2, 8, 8, (15, 15), 3, 1, 3, 2, 8),      # depthwise, dilated, padding 3
    (2, 5, 7, 9, (10, 13), 1, 2, 0, 1, 1),      # 1x1 stride 2 (ResNet downsample)
    (2, 3, 5, 4, (11, 8), 1, 2, 1, 1, 1),       # 1x1 with padding: border outputs read zeros
    (2, 2, 6, 4, (7, 9), 1, 1, 0, 1, 2),        # 1x1 grouped
    (1, 2, 6, 3, (20,), 1, 3, 2, 1, 1),
    (2, 3, 3, 6, (23, 19), 7, 2, 3, 1, 1),      # ResNet stem
    (2, 1, 10, 6, (9, 7), 3, 2, 1, 2, 2),
    (1, 3, 5, 7, (29,), 3, 2, 1, 2, 1),
    (1, 1, 4, 4, (31,), 7, 1, 3, 1, 4),
    (3, 1, 4, 6, (7, 6, 5), 3, 2, 1, 1, 2),
    (3, 3, 3, 5, (5, 8, 6), 1, 1, 0, 1, 1),
]
CONV_IDS = [f"conv{c[0]}d-n{c[1]}-{c[2]}to{c[3]}-k{c[5]}s{c[6]}p{c[7]}d{c[8]}g{c[9]}"
            for c in CONV_CASES]
# (batch, leading dims, in, out) for Linear
LINEAR_CASES = [(1, (), 37, 19), (7, (), 13, 29), (3, (4,), 11, 5)]


def _affine(case) -> tuple[Affine, torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    """A conv step with random weights, plus the input and output shapes."""
    dims, n, c_in, c_out, spatial, k, s, p, d, groups = case
    weight = torch.randn(c_out, c_in // groups, *([k] * dims))
    step = Affine(name="conv", target="conv", inputs=(0,), output=1, weight=weight, bias=None,
                  conv_dims=dims, stride=(s,) * dims, padding=(p,) * dims,
                  dilation=(d,) * dims, groups=groups)
    out = _CONV[dims](torch.zeros(n, c_in, *spatial), weight, None, s, p, d, groups)
    return step, weight, (n, c_in, *spatial), tuple(out.shape)


def _linear(case) -> tuple[Affine, torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    n, lead, f_in, f_out = case
    weight = torch.randn(f_out, f_in)
    step = Affine(name="fc", target="fc", inputs=(0,), output=1, weight=weight, bias=None)
    return step, weight, (n, *lead, f_in), (n, *lead, f_out)


def _expected_transpose(step: Affine, weight: torch.Tensor, g: torch.Tensor,
                        in_shape: tuple[int, ...]) -> torch.Tensor:
    """``Wᵀ g`` in float64, written independently of the backends."""
    g, w = g.double(), weight.double()
    if not step.is_conv:
        return g @ w
    dims = step.conv_dims
    # the transposed convolution's output size, minus what output_padding must add
    base = [(g.shape[2 + i] - 1) * step.stride[i] - 2 * step.padding[i]
            + step.dilation[i] * (w.shape[2 + i] - 1) + 1 for i in range(dims)]
    extra = [in_shape[2 + i] - base[i] for i in range(dims)]
    return _CONV_T[dims](g, w, None, step.stride, step.padding, extra, step.groups,
                         step.dilation)


def _rel_l1(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).abs().sum() / ref.abs().sum()).item()


def _memory_format(shape) -> torch.memory_format:
    return {4: torch.channels_last, 5: torch.channels_last_3d}[len(shape)]


@pytest.fixture
def poisoned_memory():
    """Every uninitialised tensor ATen allocates (our outputs, scratch and the shape-only
    input handed to convolution_backward) starts as NaN: a value we forget to write, or
    scratch we read by mistake, shows up as NaN."""
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(before[0])
    torch.utils.deterministic.fill_uninitialized_memory = before[1]


# -- the R-LRP op ---------------------------------------------------------------------------
ALL_CASES = [("conv", c) for c in CONV_CASES] + [("linear", c) for c in LINEAR_CASES]
ALL_IDS = CONV_IDS + [f"linear-n{c[0]}-{c[2]}to{c[3]}{'-3d' if c[1] else ''}"
                      for c in LINEAR_CASES]


@needs_cpp
@pytest.mark.parametrize("kind,case", ALL_CASES, ids=ALL_IDS)
@pytest.mark.parametrize("rel_dtype,a_dtype", [
    (torch.float32, torch.float32), (torch.float32, torch.bfloat16),
    (torch.float32, torch.float16), (torch.float64, torch.float64),
    (torch.float64, torch.float32)])
def test_contract_l1_matches_float64_math(kind, case, rel_dtype, a_dtype, poisoned_memory):
    step, weight, in_shape, out_shape = (_affine if kind == "conv" else _linear)(case)
    g = torch.randn(out_shape, dtype=rel_dtype)
    a = torch.randn(in_shape).to(a_dtype)
    scale = torch.rand(in_shape[0], dtype=rel_dtype) + 0.5
    cpp = get_backend("cpp", torch.device("cpu"))
    w = weight.to(rel_dtype)
    for g_scale in (None, scale):
        r, l1 = cpp.affine_contract_l1(step, w, g, a, g_scale)
        s = torch.ones(in_shape[0], dtype=torch.float64) if g_scale is None else g_scale.double()
        expected = (_expected_transpose(step, w, g, in_shape) * a.double()
                    * s.view(-1, *([1] * (len(in_shape) - 1))))
        assert r.shape == expected.shape and r.dtype == rel_dtype and l1.dtype == rel_dtype
        assert torch.isfinite(r).all() and torch.isfinite(l1).all()
        assert _rel_l1(r, expected) <= TOL[rel_dtype]
        norms = expected.abs().flatten(1).sum(1)
        assert ((l1.double() - norms).abs() / norms).max() <= TOL[rel_dtype]
        # and what the torch backend computes (it needs a in the relevance dtype)
        r_t, l1_t = TorchBackend().affine_contract_l1(step, w, g, a.to(rel_dtype), g_scale)
        assert _rel_l1(r, r_t.double()) <= TOL[rel_dtype]
        assert torch.allclose(l1, l1_t, rtol=10 * TOL[rel_dtype], atol=0)


@needs_cpp
@pytest.mark.parametrize("case", [c for c in CONV_CASES if c[0] > 1],
                         ids=[i for c, i in zip(CONV_CASES, CONV_IDS) if c[0] > 1])
@pytest.mark.parametrize("a_dtype", [torch.float32, torch.bfloat16])
def test_contract_l1_channels_last(case, a_dtype, poisoned_memory):
    """Channels-last activations (and relevance) give the same values, laid out like ``a``."""
    step, weight, in_shape, out_shape = _affine(case)
    fmt = _memory_format(in_shape)
    a = torch.randn(in_shape).to(a_dtype).contiguous(memory_format=fmt)
    scale = torch.rand(in_shape[0]) + 0.5
    cpp = get_backend("cpp", torch.device("cpu"))
    for g in (torch.randn(out_shape), torch.randn(out_shape).contiguous(memory_format=fmt)):
        r, l1 = cpp.affine_contract_l1(step, weight, g, a, scale)
        expected = (_expected_transpose(step, weight, g, in_shape) * a.double()
                    * scale.double().view(-1, *([1] * (len(in_shape) - 1))))
        assert r.is_contiguous(memory_format=fmt)
        assert _rel_l1(r, expected) <= TOL[torch.float32]
        norms = expected.abs().flatten(1).sum(1)
        assert ((l1.double() - norms).abs() / norms).max() <= TOL[torch.float32]


@needs_cpp
def test_contract_l1_strided_views():
    """Inputs with holes (slices) and a ``g_scale`` of another dtype are handled, not
    misread as flat memory."""
    step, weight, in_shape, out_shape = _affine(CONV_CASES[1])
    big = torch.randn(in_shape[0], in_shape[1] * 2, *in_shape[2:])
    a = big[:, ::2]  # every other channel: not contiguous in any format
    g = torch.randn(out_shape[0], out_shape[1], out_shape[2] + 3, out_shape[3])[:, :, 1:-2]
    scale = (torch.rand(in_shape[0]) + 0.5).double()
    r, l1 = torch.ops.rlrp_fast.affine_relevance_l1(
        g, weight, a, scale, list(step.stride), list(step.padding), list(step.dilation),
        step.groups, step.conv_dims)
    expected = (_expected_transpose(step, weight, g, in_shape) * a.double()
                * scale.view(-1, 1, 1, 1))
    assert _rel_l1(r, expected) <= TOL[torch.float32]


@needs_cpp
def test_contract_l1_is_deterministic_across_thread_counts():
    """The per-sample norms are summed in fixed blocks: bit-identical for any thread count."""
    step, weight, in_shape, out_shape = _affine((2, 3, 16, 16, (97, 89), 3, 1, 1, 1, 1))
    g, a = torch.randn(out_shape), torch.randn(in_shape)
    cpp = get_backend("cpp", torch.device("cpu"))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpp.affine_contract_l1(step, weight, g, a)
        torch.set_num_threads(max(2, threads))
        many = cpp.affine_contract_l1(step, weight, g, a)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


@needs_cpp
def test_zero_relevance_gives_zero_norm():
    step, weight, in_shape, out_shape = _affine(CONV_CASES[0])
    cpp = get_backend("cpp", torch.device("cpu"))
    r, l1 = cpp.affine_contract_l1(step, weight, torch.zeros(out_shape), torch.randn(in_shape))
    assert (r == 0).all() and (l1 == 0).all()


# -- the classic rules' op ------------------------------------------------------------------
def _stab(z: torch.Tensor, eps: float) -> torch.Tensor:
    """zennit's stabiliser, written out: z + eps·(sign(z) + (z == 0))."""
    return z + eps * (torch.sign(z) + (z == 0).double())


@needs_cpp
@pytest.mark.parametrize("kind,case", ALL_CASES, ids=ALL_IDS)
@pytest.mark.parametrize("rel_dtype,z_dtype", [
    (torch.float32, torch.float32), (torch.float32, torch.bfloat16),
    (torch.float64, torch.float64)])
def test_contract_matches_float64_math(kind, case, rel_dtype, z_dtype, poisoned_memory):
    step, weight, in_shape, out_shape = (_affine if kind == "conv" else _linear)(case)
    g = torch.randn(out_shape, dtype=rel_dtype)
    # |z| ≥ 0.5 keeps g/z well conditioned; a few exact zeros exercise the (z == 0) term
    z = (torch.rand(out_shape) + 0.5) * torch.randn(out_shape).sign()
    z.view(-1)[::7] = 0.0
    z = z.to(z_dtype)
    a = torch.randn(in_shape, dtype=rel_dtype)
    w = weight.to(rel_dtype)
    cpp = get_backend("cpp", torch.device("cpu"))
    for a_arg, z_arg, eps in ((a, z, 0.25), (a, z, 1e-6), (None, z, 0.5), (a, None, 0.0)):
        if z_arg is not None and eps < 1e-3:
            z_arg = torch.where(z_arg == 0, torch.ones_like(z_arg), z_arg)  # LRP-0: no 0/0
        out = cpp.affine_contract(step, w, g, torch.Size(in_shape), a_arg, z=z_arg, eps=eps)
        q = g.double() if z_arg is None else g.double() / _stab(z_arg.double(), eps)
        expected = _expected_transpose(step, w, q, in_shape)
        if a_arg is not None:
            expected = expected * a_arg.double()
        assert out.shape == expected.shape and out.dtype == rel_dtype
        assert torch.isfinite(out).all()
        assert _rel_l1(out, expected) <= TOL[rel_dtype]
        ref = TorchBackend().affine_contract(step, w, g, torch.Size(in_shape), a_arg,
                                             z=z_arg, eps=eps)
        assert _rel_l1(out, ref.double()) <= TOL[rel_dtype]


# -- opcheck: schema, fake (meta) implementation, torch.compile tracing ----------------------
def _opcheck_cases():
    step, weight, in_shape, out_shape = _affine(CONV_CASES[4])
    g, a, z = torch.randn(out_shape), torch.randn(in_shape), torch.randn(out_shape)
    geo = [list(step.stride), list(step.padding), list(step.dilation), step.groups, 2]
    a_cl = a.contiguous(memory_format=torch.channels_last)
    lin_step, lin_w, lin_in, lin_out = _linear(LINEAR_CASES[1])
    lin_geo = [[], [], [], 1, 0]
    l1_op = torch.ops.rlrp_fast.affine_relevance_l1.default
    op = torch.ops.rlrp_fast.affine_relevance.default
    return [
        (l1_op, (g, weight, a, None, *geo)),
        (l1_op, (g, weight, a_cl.bfloat16(), torch.rand(out_shape[0]), *geo)),
        (l1_op, (torch.randn(lin_out), lin_w, torch.randn(lin_in), None, *lin_geo)),
        (op, (g, weight, a, z, 0.25, list(in_shape), *geo)),
        (op, (g, weight, a_cl, None, 0.0, list(in_shape), *geo)),
        (op, (g, weight, None, z.bfloat16(), 1e-6, list(in_shape), *geo)),
        (op, (torch.randn(lin_out), lin_w, None, None, 0.0, list(lin_in), *lin_geo)),
    ]


@needs_cpp
def test_opcheck():
    for op, args in _opcheck_cases():
        torch.library.opcheck(op, args)


# -- end to end -----------------------------------------------------------------------------
# float64: the backends differ only in summation order, so any difference beyond rounding is
# a wiring bug. float32: both backends' per-sample norms are accurate to ~1e-7 (pairwise or
# float64-blocked sums), so the maps agree to float32 accuracy. float32 LRP-ε: both backends
# run the same ATen transposes on the same g / stab(z).
FP64_MODEL_TOL = 1e-10
FP32_MODEL_TOL = 1e-5
FP32_EPSILON_TOL = 1e-5


@pytest.fixture(scope="module", params=["vgg16", "resnet50"])
def tv_model(request):
    pytest.importorskip("torchvision")
    from tv_models import fold_batchnorm, randomized

    return fold_batchnorm(randomized(request.param, seed=2))


RULE_OPTIONS = {"rlrp": {"rule": "rlrp", "norm": "layer"},
                "rlrp-neuron": {"rule": "rlrp", "norm": "neuron"},
                "epsilon": {"rule": "epsilon"}}


@needs_cpp
@pytest.mark.parametrize("rule", list(RULE_OPTIONS))
def test_explainer_matches_torch_backend(tv_model, rule):
    x = torch.randn(2, 3, 64, 64)
    options = RULE_OPTIONS[rule]
    cpp = rlrp_fast.Explainer(tv_model, backend="cpp", **options)(x).relevance
    ref = rlrp_fast.Explainer(tv_model, backend="torch", **options)(x).relevance.double()
    assert torch.isfinite(cpp).all()
    if rule == "epsilon":
        assert _rel_l1(cpp, ref) <= FP32_EPSILON_TOL
        return
    assert _rel_l1(cpp, ref) <= FP32_MODEL_TOL
    model64 = copy.deepcopy(tv_model).double()
    cpp64 = rlrp_fast.Explainer(model64, backend="cpp", **options)(x.double()).relevance
    ref64 = rlrp_fast.Explainer(model64, backend="torch", **options)(x.double()).relevance
    assert _rel_l1(cpp64, ref64) <= FP64_MODEL_TOL
    assert _rel_l1(cpp, ref64) <= FP32_MODEL_TOL
