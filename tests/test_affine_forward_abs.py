"""The ``affine_forward_abs`` Triton kernel (``z = W a + b`` and ``s = |W| |a|`` from the same
tiles) against float64 torch: Linear (2-d and 3-d input), Conv1d and Conv2d with every stride,
padding, dilation and groups case (depthwise with channel multipliers and narrow groups, which
take their own kernel, and 16-wide groups, which do not), ragged shapes, channels-last and
expanded inputs, each input dtype it accepts, each output skipped in turn.

Here (no GPU) it runs in Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest.py); on
a CUDA machine run this file with ``TRITON_INTERPRET=0`` to test the compiled kernel.
Tolerance: relative (per sample L1 and max) 1e-5 for ``s`` (float32 accumulation of exactly
upcast operands); ``z`` is rounded to the input's dtype, so 1e-5 for float32 and that dtype's
last place (2⁻⁷ bfloat16, 2⁻¹⁰ float16) otherwise.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from rlrp_fast.kernels import _common  # noqa: E402
from rlrp_fast.kernels.affine_forward_abs import affine_forward_abs  # noqa: E402

if _common.INTERPRET:
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    DEVICE = None
pytestmark = [pytest.mark.skipif(DEVICE is None, reason="Triton needs CUDA or TRITON_INTERPRET=1"),
              pytest.mark.usefixtures("no_tf32")]

# one unit in the last place of z's dtype: Triton's interpreter casts float32 down by
# truncation, the GPU rounds to nearest (half that)
Z_TOL = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
SMALL = {"BLOCK_P": 16, "BLOCK_O": 16, "BLOCK_K": 16, "GROUP_M": 2}


def _close(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values (an unwritten output?)"
    g, w = got.double().cpu(), want.double().cpu()
    n = w.shape[0] if w.dim() > 1 else 1
    diff = (g - w).abs().reshape(n, -1).sum(1)
    norm = w.abs().reshape(n, -1).sum(1).clamp_min(1e-300)
    l1 = (diff / norm).max().item()
    peak = ((g - w).abs().max() / w.abs().max().clamp_min(1e-300)).item()
    assert l1 <= tol and peak <= tol, f"{what}: relative L1 {l1:.2e}, max {peak:.2e}"


def _expected(a, weight, bias, conv, scale=None):
    """float64 ``(z, s)`` by torch itself (``scale`` folded into the weight's rows)."""
    a64, w64 = a.double().cpu(), weight.double().cpu()
    if scale is not None:
        w64 = w64 * scale.double().cpu().view(-1, *[1] * (w64.dim() - 1))
    b64 = None if bias is None else bias.double().cpu()
    if conv is None:
        return F.linear(a64, w64, b64), F.linear(a64.abs(), w64.abs())
    fn = F.conv1d if weight.dim() == 3 else F.conv2d
    return fn(a64, w64, b64, **conv), fn(a64.abs(), w64.abs(), None, **conv)


def _check(a, weight, bias=None, conv=None, config=None, scale=None):
    z, s = affine_forward_abs(a, weight, bias, scale=scale, **(conv or {}), config=config)
    z_want, s_want = _expected(a, weight, bias, conv, scale)
    assert z.dtype == a.dtype and s.dtype == torch.float32
    _close(s, s_want, 1e-5, "s")
    _close(z, z_want, Z_TOL[a.dtype], "z")
    assert (s >= 0).all()


CONV2D = [  # (C_in, C_out, kernel, stride, padding, dilation, groups, H, W)
    (3, 7, (3, 3), (1, 1), (1, 1), (1, 1), 1, 9, 11),
    (5, 6, (3, 2), (2, 1), (0, 1), (1, 1), 1, 10, 7),
    (4, 6, (3, 3), (2, 2), (2, 1), (2, 1), 2, 13, 12),
    (6, 6, (3, 3), (1, 2), (1, 1), (1, 1), 6, 8, 9),      # depthwise
    (6, 12, (5, 5), (3, 3), (2, 2), (1, 1), 3, 17, 15),
    (8, 5, (1, 1), (1, 1), (0, 0), (1, 1), 1, 6, 5),      # pointwise
    (2, 3, (7, 7), (2, 2), (3, 3), (1, 1), 1, 15, 13),    # a stem
    (4, 4, (3, 3), (1, 1), (4, 4), (3, 3), 1, 6, 7),      # padding past the kernel
    (5, 10, (5, 5), (2, 2), (2, 2), (1, 1), 5, 12, 11),   # depthwise, channel multiplier 2
    (20, 10, (3, 3), (1, 1), (1, 1), (1, 1), 10, 7, 6),   # 2 in, 1 out per group
    (32, 32, (3, 3), (1, 1), (1, 1), (1, 1), 2, 6, 5),    # 16-wide groups: the GEMM kernel
]


@pytest.mark.parametrize("case", CONV2D, ids=[f"conv2d-{i}" for i in range(len(CONV2D))])
@pytest.mark.parametrize("dtype", list(Z_TOL))
def test_conv2d(case, dtype):
    cin, cout, k, stride, padding, dilation, groups, h, w = case
    torch.manual_seed(0)
    a = torch.randn(3, cin, h, w, device=DEVICE).to(dtype)
    weight = torch.randn(cout, cin // groups, *k, device=DEVICE).to(dtype)
    bias = torch.randn(cout, device=DEVICE).to(dtype)
    _check(a, weight, bias, dict(stride=stride, padding=padding, dilation=dilation,
                                 groups=groups))


@pytest.mark.parametrize("case", CONV2D[:5], ids=[f"conv2d-{i}" for i in range(5)])
def test_conv2d_small_tiles(case):
    """16-wide tiles: several position, channel and reduction blocks per layer."""
    cin, cout, k, stride, padding, dilation, groups, h, w = case
    torch.manual_seed(1)
    a = torch.randn(2, cin * 4, h, w, device=DEVICE)
    weight = torch.randn(cout * 4, cin * 4 // groups, *k, device=DEVICE)
    _check(a, weight, None, dict(stride=stride, padding=padding, dilation=dilation,
                                 groups=groups), config=SMALL)


@pytest.mark.parametrize("layout", ["channels_last", "expanded", "sliced"])
def test_conv2d_reads_any_strides(layout):
    torch.manual_seed(2)
    a = torch.randn(2, 5, 9, 8, device=DEVICE)
    if layout == "channels_last":
        a = a.contiguous(memory_format=torch.channels_last)
    elif layout == "expanded":
        a = a[:1].expand(3, -1, -1, -1)
    else:
        a = torch.randn(2, 10, 9, 16, device=DEVICE)[:, ::2, :, ::2]
    weight = torch.randn(4, 5, 3, 3, device=DEVICE)
    conv = dict(stride=(2, 1), padding=(1, 1), dilation=(1, 1), groups=1)
    z, _ = affine_forward_abs(a, weight, **conv)
    if layout == "channels_last":
        assert z.is_contiguous(memory_format=torch.channels_last)
    _check(a, weight, None, conv)


@pytest.mark.parametrize("case, narrow", [(CONV2D[3], True), (CONV2D[8], True),
                                          (CONV2D[10], False), (CONV2D[0], False)],
                         ids=["depthwise", "multiplier", "wide-groups", "dense"])
def test_narrow_groups_take_their_kernel(case, narrow, monkeypatch):
    """Depthwise and narrow groups launch the elementwise kernel across groups (also
    channels-last), the rest the implicit GEMM."""
    from rlrp_fast.kernels import affine_forward_abs as module
    launched = []

    class Spy:
        def __init__(self, name):
            self.name, self.kernel = name, getattr(module, name)

        def __getitem__(self, grid):
            launched.append(self.name)
            return self.kernel[grid]

    for name in ("_launch", "_grouped_launch"):
        monkeypatch.setattr(module, name, Spy(name))
    cin, cout, k, stride, padding, dilation, groups, h, w = case
    torch.manual_seed(4)
    a = torch.randn(2, cin, h, w, device=DEVICE)
    weight = torch.randn(cout, cin // groups, *k, device=DEVICE)
    conv = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    for a_arg in (a, a.contiguous(memory_format=torch.channels_last)):
        _check(a_arg, weight, torch.randn(cout, device=DEVICE), conv,
               scale=torch.randn(cout, device=DEVICE))
    assert launched == ["_grouped_launch" if narrow else "_launch"] * 2


@pytest.mark.parametrize("dtype", list(Z_TOL))
@pytest.mark.parametrize("groups", [1, 2, 6])
def test_conv1d(dtype, groups):
    torch.manual_seed(3)
    a = torch.randn(3, 6, 23, device=DEVICE).to(dtype)
    weight = torch.randn(12, 6 // groups, 4, device=DEVICE).to(dtype)
    _check(a, weight, torch.randn(12, device=DEVICE).to(dtype),
           dict(stride=(3,), padding=(2,), dilation=(2,), groups=groups))


@pytest.mark.parametrize("dtype", list(Z_TOL))
@pytest.mark.parametrize("shape", [(5, 37), (2, 7, 37), (1, 37)])
def test_linear(dtype, shape):
    torch.manual_seed(4)
    a = torch.randn(*shape, device=DEVICE).to(dtype)
    weight = torch.randn(19, 37, device=DEVICE).to(dtype)
    _check(a, weight, torch.randn(19, device=DEVICE).to(dtype))
    _check(a, weight, None, config=SMALL)


@pytest.mark.parametrize("conv", [None, dict(stride=(2, 1), padding=(1, 1), groups=2)])
def test_folded_scale(conv):
    """A folded BatchNorm's per-channel σ (of either sign): z = σ⊙(W a) + b, s = |σ⊙W||a|."""
    torch.manual_seed(5)
    if conv is None:
        a, weight = torch.randn(4, 9, device=DEVICE), torch.randn(6, 9, device=DEVICE)
    else:
        a, weight = (torch.randn(2, 4, 7, 6, device=DEVICE),
                     torch.randn(6, 2, 3, 3, device=DEVICE))
    scale = torch.randn(6, device=DEVICE)
    _check(a, weight, torch.randn(6, device=DEVICE), conv, scale=scale)


def test_each_output_alone_and_signs():
    """``s`` is |W||a| even where W a cancels to 0; skipping one output leaves None."""
    a = torch.tensor([[1.0, -1.0, 2.0]], device=DEVICE)
    weight = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]], device=DEVICE)
    z, s = affine_forward_abs(a, weight)
    assert z.tolist() == [[0.0, 0.0]] and s.tolist() == [[2.0, 0.0]]
    z_only, none = affine_forward_abs(a, weight, store_s=False)
    none2, s_only = affine_forward_abs(a, weight, store_z=False)
    assert none is None and none2 is None
    assert torch.equal(z_only, z) and torch.equal(s_only, s)
    with pytest.raises(ValueError, match="nothing to compute"):
        affine_forward_abs(a, weight, store_z=False, store_s=False)


def test_empty_batch_and_bad_weight():
    z, s = affine_forward_abs(torch.randn(0, 3, 5, 5, device=DEVICE),
                              torch.randn(4, 3, 3, 3, device=DEVICE))
    assert z.shape == s.shape == (0, 4, 3, 3)
    with pytest.raises(NotImplementedError, match="Conv1d/Conv2d"):
        affine_forward_abs(torch.randn(1, 2, 3, 3, 3, device=DEVICE),
                           torch.randn(2, 2, 1, 1, 1, device=DEVICE))
