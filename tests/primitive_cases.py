"""Layer geometries, the backends' implementations and the float64 expectations shared by the
per-primitive tests (test_affine_relevance.py, test_affine_relevance_l1.py).

Each primitive is called through its own entry point per backend — ``TorchBackend``'s method,
the typed C++ wrapper in ``rlrp_fast.ops``, the Triton entry point in
``rlrp_fast.kernels.affine_relevance`` (interpreted on CPU here, ``TRITON_INTERPRET=1``; on a
CUDA machine with ``TRITON_INTERPRET=0`` the compiled kernels on ``cuda`` tensors) — so that no
silent fallback can stand in for the kernel under test. Expectations are float64, computed
directly: ``g @ W`` for a Linear, the input gradient of ``F.convNd`` (autograd) for a
convolution.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from rlrp_fast.backends import unavailable_reason
from rlrp_fast.plan import Affine

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
TRITON_REASON = unavailable_reason("triton")
CPP_REASON = unavailable_reason("cpp")
# where the Triton kernels run: CPU tensors under the interpreter, else CUDA
TRITON_DEVICE = "cpu" if INTERPRET else "cuda"
BACKENDS = [
    pytest.param("torch", id="torch"),
    pytest.param("cpp", id="cpp", marks=pytest.mark.skipif(
        CPP_REASON is not None, reason=f"cpp backend: {CPP_REASON}")),
    pytest.param("triton", id="triton", marks=pytest.mark.skipif(
        TRITON_REASON is not None, reason=f"triton backend: {TRITON_REASON}")),
]
# Relevance dtype → tolerance on the per-sample relative L1 error and the relative max error
# against float64 math. A low-precision ``a`` or ``z`` is upcast exactly: only the relevance
# dtype (float32: GEMM rounding, ~1e-7 per output, or tf32x3 on a GPU) sets the error.
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
SMALL_BLOCKS = {1: {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2},
                2: {"BLOCK_P": 16, "BLOCK_C": 16, "BLOCK_K": 16, "GROUP_M": 2}}


def device_of(backend: str) -> str:
    return TRITON_DEVICE if backend == "triton" else "cpu"


@dataclass(frozen=True)
class Case:
    """A layer: ``conv_dims`` 0 (Linear: ``spatial`` holds the extra leading dims, ``kernel``
    and the rest unused) or 1-3; ragged sizes throughout."""

    conv_dims: int
    batch: int
    c_in: int
    c_out: int
    spatial: tuple[int, ...]
    kernel: int | tuple[int, ...] = 1
    stride: int | tuple[int, ...] = 1
    padding: int | tuple[int, ...] = 0
    dilation: int | tuple[int, ...] = 1
    groups: int = 1

    def __str__(self) -> str:
        if self.conv_dims == 0:
            lead = "x".join(map(str, self.spatial))
            return f"linear-n{self.batch}-{self.c_in}to{self.c_out}{'-L' + lead if lead else ''}"
        size = "x".join(map(str, self.spatial))
        return (f"conv{self.conv_dims}d-n{self.batch}-{self.c_in}to{self.c_out}-{size}-"
                f"k{self.kernel}s{self.stride}p{self.padding}d{self.dilation}g{self.groups}")

    def _per_dim(self, v) -> tuple[int, ...]:
        return tuple(v) if isinstance(v, tuple) else (v,) * self.conv_dims

    def step(self, dtype=torch.float32) -> Affine:
        """The plan step of this layer, with random weights."""
        if self.conv_dims == 0:
            weight = torch.randn(self.c_out, self.c_in, dtype=dtype)
            return Affine(name="fc", target="fc", inputs=(0,), output=1, weight=weight,
                          bias=None)
        weight = torch.randn(self.c_out, self.c_in // self.groups,
                             *self._per_dim(self.kernel), dtype=dtype)
        return Affine(name="conv", target="conv", inputs=(0,), output=1, weight=weight,
                      bias=None, conv_dims=self.conv_dims, stride=self._per_dim(self.stride),
                      padding=self._per_dim(self.padding), dilation=self._per_dim(self.dilation),
                      groups=self.groups)

    @property
    def input_shape(self) -> tuple[int, ...]:
        if self.conv_dims == 0:
            return (self.batch, *self.spatial, self.c_in)
        return (self.batch, self.c_in, *self.spatial)

    def output_shape(self, step: Affine) -> tuple[int, ...]:
        return tuple(forward(step, torch.zeros(self.input_shape, dtype=step.weight.dtype)).shape)


def forward(step: Affine, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``W x`` with the step's geometry (and weight, unless given), in x's dtype."""
    w = (step.weight if weight is None else weight).to(x.dtype)
    if not step.is_conv:
        return x @ w.T
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[step.conv_dims]
    return conv(x, w, None, step.stride, step.padding, step.dilation, step.groups)


def transpose64(step: Affine, g: torch.Tensor, input_shape) -> torch.Tensor:
    """``Wᵀ g`` in float64 on CPU: ``g @ W``, or the input gradient of the convolution."""
    g = g.detach().double().cpu()
    if not step.is_conv:
        return g @ step.weight.double().cpu()
    x = torch.zeros(tuple(input_shape), dtype=torch.float64, requires_grad=True)
    y = forward(step, x, step.weight.double().cpu())
    (grad,) = torch.autograd.grad(y, x, g)
    return grad


def stab64(z: torch.Tensor, eps: float) -> torch.Tensor:
    """zennit's stabiliser in float64, written out: ``z + eps·(sign(z) + (z == 0))``."""
    z = z.detach().double().cpu()
    return z + eps * (torch.sign(z) + (z == 0).double())


def per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A ``[N]`` vector shaped to broadcast over ``like``'s samples, float64 on CPU."""
    return v.detach().double().cpu().view(-1, *[1] * (like.dim() - 1))


def rel_errors(r: torch.Tensor, e: torch.Tensor) -> tuple[float, float]:
    """(max per-sample relative L1 error, max abs error / max |e|), in float64."""
    r, e = r.detach().double().cpu(), e.detach().double().cpu()
    diff = (r - e).abs().reshape(len(e), -1).sum(1)
    norm = e.abs().reshape(len(e), -1).sum(1).clamp_min(1e-300)
    return (diff / norm).max().item(), ((r - e).abs().max() / e.abs().max().clamp_min(1e-300)).item()


def assert_close(r: torch.Tensor, e: torch.Tensor, tol: float, what: str = "") -> None:
    assert r.shape == e.shape, f"{what}: shape {tuple(r.shape)}, expected {tuple(e.shape)}"
    assert torch.isfinite(r).all(), f"{what}: non-finite values (unwritten output?)"
    l1_err, max_err = rel_errors(r, e)
    assert l1_err <= tol and max_err <= tol, f"{what}: rel L1 {l1_err:.2e}, max {max_err:.2e}"


def assert_norms(l1: torch.Tensor, expected_r: torch.Tensor, tol: float) -> None:
    """``l1`` holds each sample's ``‖expected_r‖₁`` to ``tol``, relative."""
    e = expected_r.detach().double().cpu().abs().reshape(len(expected_r), -1).sum(1)
    assert l1.shape == e.shape, f"L1 norms of shape {tuple(l1.shape)}, expected {tuple(e.shape)}"
    err = ((l1.double().cpu() - e).abs() / e.clamp_min(1e-300)).max().item()
    assert err <= tol, f"L1 norms off by {err:.2e}"


def poisoned(shape, device, memory_format=torch.contiguous_format) -> torch.Tensor:
    """A float32 output buffer full of NaN: a value the kernel fails to write shows."""
    return torch.full(shape, float("nan"), device=device).contiguous(memory_format=memory_format)


@pytest.fixture
def poisoned_memory(request):
    """Every uninitialised tensor ATen allocates on CPU (the C++ ops' outputs and scratch)
    starts as NaN: a value an op forgets to write, or scratch it reads by mistake, shows up as
    NaN. Not for compiled Triton runs: on CUDA, deterministic mode refuses cuBLAS without a
    workspace configuration (their outputs are poisoned buffers anyway)."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("backend") == "triton" and not INTERPRET:
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(before[0])
    torch.utils.deterministic.fill_uninitialized_memory = before[1]


def triton_kernels():
    from rlrp_fast.kernels import affine_relevance
    return affine_relevance


def skip_unless_triton_takes(backend: str, step: Affine, g, *others) -> None:
    """The Triton kernels take float32 relevance and Linear/Conv1d/Conv2d only (the backend
    sends the rest to torch): skip other cases for them, with the kernels' own reason."""
    if backend != "triton":
        return
    reason = triton_kernels().unsupported(g, step.weight.to(g.device), *others,
                                          conv_dims=step.conv_dims)
    if reason is not None:
        pytest.skip(f"not a Triton kernel case: {reason}")


# Ragged sizes everywhere; batch 1 and odd batches; 1x1, 3x3, 5x5, 7x7; stride 1/2/3;
# padding 0-3; dilation 1/2; groups 1, 2, 3, 16-wide and depthwise (multipliers 1-3);
# per-dim geometry; strided cases
# whose output does not reach the last input rows (they get exactly 0). 1x1 convolutions
# take their own path in C++ (a GEMM, scattered back onto the input grid when strided).
CASES = [
    Case(0, 1, 37, 19, ()),
    Case(0, 7, 13, 29, ()),
    Case(0, 3, 19, 23, (4,)),                          # tokens: [N, L, features]
    Case(1, 2, 6, 3, (20,), 1, 3, 2, 1, 1),
    Case(1, 3, 5, 7, (29,), 3, 2, 1, 2, 1),
    Case(1, 1, 4, 4, (31,), 7, 1, 3, 1, 4),
    Case(1, 3, 6, 9, (19,), 5, 2, 2, 2, 3),
    Case(2, 1, 3, 5, (13, 11), 3, 1, 1, 1, 1),
    Case(2, 3, 6, 4, (17, 9), 3, 2, 0, 1, 2),
    Case(2, 2, 8, 8, (15, 15), 3, 1, 3, 2, 8),         # depthwise, dilated, padding 3
    Case(2, 5, 7, 9, (10, 13), 1, 2, 0, 1, 1),         # 1x1 stride 2 (ResNet downsample)
    Case(2, 3, 5, 4, (11, 8), 1, 2, 1, 1, 1),          # 1x1 with padding: border reads zeros
    Case(2, 2, 6, 4, (7, 9), 1, 1, 0, 1, 2),           # 1x1 grouped
    Case(2, 3, 3, 6, (23, 19), 7, 2, 3, 1, 1),         # ResNet stem
    Case(2, 2, 6, 9, (11, 10), 3, 2, 1, 1, 3),
    Case(2, 2, 4, 6, (13, 12), 5, 3, 2, 2, 2),         # stride 3 with dilation 2
    Case(2, 3, 6, 9, (9, 11), (3, 5), (2, 1), (1, 2), (1, 2), 1),  # per-dim geometry
    Case(3, 1, 4, 6, (7, 6, 5), 3, 2, 1, 1, 2),
    Case(3, 3, 3, 5, (5, 8, 6), 1, 1, 0, 1, 1),
    # Depthwise and narrow groups (the Triton kernel across groups), 16-wide groups.
    Case(2, 3, 6, 12, (13, 11), 3, 2, 1, 1, 6),        # depthwise, channel multiplier 2, s2
    Case(2, 2, 5, 5, (12, 9), 5, 2, 2, 1, 5),          # EfficientNet's 5×5 s2 depthwise
    Case(2, 2, 7, 7, (6, 5), 7, 1, 3, 1, 7),           # ConvNeXt's 7×7 depthwise, small map
    Case(2, 3, 5, 5, (9, 10), (3, 1), (1, 2), (2, 0), (2, 1), 5),  # per-dim, dilated
    Case(1, 3, 4, 12, (26,), 3, 3, 2, 2, 4),           # multiplier 3, stride 3, dilation 2
    Case(2, 2, 20, 10, (7, 6), 3, 1, 1, 1, 10),        # 2 in, 1 out per group
    Case(2, 1, 32, 32, (6, 5), 3, 1, 1, 1, 2),         # 16-wide groups: the GEMM kernel
    Case(3, 2, 4, 8, (5, 6, 7), 3, 2, 1, 1, 4),        # depthwise Conv3d, multiplier 2
    Case(2, 2, 3, 6, (37, 33), 3, 2, 1, 1, 3),         # depthwise, many position tiles
    Case(1, 2, 3, 3, (1100,), 5, 3, 2, 2, 3),          # depthwise Conv1d, long, dilated
]
CASE_IDS = [str(c) for c in CASES]
# one of each kind, for the dtype, layout and opcheck tests
LINEAR_2D, LINEAR_3D, CONV1D, CONV2D, CONV2D_POINTWISE_PADDED, CONV3D = (
    CASES[1], CASES[2], CASES[4], CASES[8], CASES[11], CASES[17])
DEPTHWISE_1D, DEPTHWISE_2D, DEPTHWISE_3D = CASES[23], CASES[19], CASES[26]
NARROW_GROUPED, WIDE_GROUPED = CASES[24], CASES[25]
