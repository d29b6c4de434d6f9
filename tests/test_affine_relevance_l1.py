"""The R-LRP primitive ``affine_relevance_l1``: ``(R̃, ‖R̃‖₁ per sample)`` with
``R̃ = g_scale[n] · a ⊙ Wᵀg``.

Every backend's own entry point (``TorchBackend.affine_relevance_l1``, ``rlrp_fast.ops``, the
Triton entry point, interpreted on CPU) against float64 math written out with torch ops, on
Linear, Conv1d, Conv2d and Conv3d geometries (the Triton kernels take Linear, Conv1d and
Conv2d with float32 relevance; other cases are skipped for them), with and without
``g_scale``, every dtype of ``a``, NCHW and channels-last, expanded and sliced inputs; outputs
are poisoned (NaN) before the op writes them. ``torch.library.opcheck`` checks the C++ op's
schema and fake implementation on each geometry.
"""
from __future__ import annotations

import pytest
import torch
from primitive_cases import (BACKENDS, CASE_IDS, CASES, CONV1D, CONV2D, CONV2D_POINTWISE_PADDED,
                             CONV3D, CPP_REASON, DEPTHWISE_1D, DEPTHWISE_2D, DEPTHWISE_3D,
                             LINEAR_2D, LINEAR_3D, NARROW_GROUPED, SMALL_BLOCKS, TOL, WIDE_GROUPED,
                             Case, assert_close, assert_norms, device_of, per_sample, poisoned,
                             poisoned_memory,  # noqa: F401
                             skip_unless_triton_takes, transpose64, triton_kernels)

from rlrp_fast.backends.torch_backend import TorchBackend

needs_cpp = pytest.mark.skipif(CPP_REASON is not None, reason=f"cpp backend: {CPP_REASON}")
pytestmark = pytest.mark.usefixtures("no_tf32", "poisoned_memory")
TRITON = BACKENDS[2]


def affine_relevance_l1(backend, step, weight, g, a, g_scale=None,
                        memory_format=torch.contiguous_format):
    """The primitive through ``backend``'s own entry point (Triton: into a NaN-filled ``out``
    of ``memory_format``)."""
    if backend == "torch":
        return TorchBackend().affine_relevance_l1(step, weight, g, a, g_scale)
    if backend == "cpp":
        from rlrp_fast import ops
        return ops.affine_relevance_l1(g, weight, a, g_scale=g_scale, **step.geometry)
    out = poisoned(a.shape, g.device, memory_format)
    r, l1 = triton_kernels().affine_relevance_l1(g, weight, a, g_scale=g_scale, out=out,
                                                 **step.geometry)
    assert r.data_ptr() == out.data_ptr()
    return r, l1


def expected64(step, g, a, g_scale=None) -> torch.Tensor:
    r = transpose64(step, g, a.shape) * a.double().cpu()
    return r if g_scale is None else r * per_sample(g_scale, r)


def _setup(case, backend, rel_dtype=torch.float32):
    device = device_of(backend)
    step = case.step(rel_dtype)
    w = step.weight.to(device)
    g = torch.randn(case.output_shape(step), dtype=rel_dtype, device=device)
    a = torch.randn(case.input_shape, dtype=rel_dtype, device=device)
    scale = torch.rand(case.batch, dtype=rel_dtype, device=device) + 0.5
    return step, w, g, a, scale


def _check(r, l1, expected, rel_dtype, what=""):
    assert r.dtype == rel_dtype and l1.dtype == rel_dtype, what
    assert_close(r, expected, TOL[rel_dtype], what)
    assert_norms(l1, expected, TOL[rel_dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rel_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_matches_float64_math(backend, case, rel_dtype):
    step, w, g, a, scale = _setup(case, backend, rel_dtype)
    skip_unless_triton_takes(backend, step, g, a, scale)
    for g_scale in (None, scale):
        r, l1 = affine_relevance_l1(backend, step, w, g, a, g_scale)
        assert r.device == g.device and l1.device == g.device
        _check(r, l1, expected64(step, g, a, g_scale), rel_dtype,
               "no g_scale" if g_scale is None else "g_scale")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("a_dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", [LINEAR_3D, CONV1D, CONV2D, CONV3D, DEPTHWISE_1D,
                                  DEPTHWISE_2D, DEPTHWISE_3D], ids=str)
def test_input_dtypes(backend, case, a_dtype):
    """``a`` in any float dtype is upcast exactly: the relevance dtype alone sets the error.
    float64 relevance with a float32 ``a`` too (not a Triton case)."""
    for rel_dtype in (torch.float32, torch.float64):
        if rel_dtype == torch.float64 and (a_dtype != torch.float32 or backend == "triton"):
            continue
        step, w, g, a, scale = _setup(case, backend, rel_dtype)
        a = a.to(a_dtype)
        skip_unless_triton_takes(backend, step, g, a, scale)
        r, l1 = affine_relevance_l1(backend, step, w, g, a, scale)
        _check(r, l1, expected64(step, g, a, scale), rel_dtype, f"{rel_dtype} relevance")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [CONV2D, CONV2D_POINTWISE_PADDED, CONV3D, DEPTHWISE_2D,
                                  DEPTHWISE_3D], ids=str)
def test_channels_last(backend, case):
    """Channels-last ``a`` (with ``g`` in either layout) is read in place; the fused backends
    lay ``R̃`` out like ``a``."""
    step, w, g, a, scale = _setup(case, backend)
    skip_unless_triton_takes(backend, step, g)
    fmt = torch.channels_last if case.conv_dims == 2 else torch.channels_last_3d
    a = a.to(torch.bfloat16).contiguous(memory_format=fmt)
    for g_arg in (g, g.contiguous(memory_format=fmt)):
        r, l1 = affine_relevance_l1(backend, step, w, g_arg, a, scale, memory_format=fmt)
        if backend != "torch":
            assert r.is_contiguous(memory_format=fmt)
        _check(r, l1, expected64(step, g_arg, a, scale), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [LINEAR_2D, CONV1D, CONV2D, DEPTHWISE_1D, DEPTHWISE_2D],
                         ids=str)
def test_expanded_and_sliced_inputs(backend, case):
    """Stride-0 expansions and slices with holes are read as what they are, never as flat
    memory; a ``g_scale`` of another float dtype is converted."""
    step, w, g, a, scale = _setup(case, backend)
    skip_unless_triton_takes(backend, step, g)
    channel_dim = -1 if case.conv_dims == 0 else 1
    per_channel = [1] * len(case.input_shape)
    per_channel[channel_dim] = case.input_shape[channel_dim]
    expanded = torch.randn(per_channel, device=g.device).expand(case.input_shape)
    wide = list(case.input_shape)
    wide[channel_dim] *= 2
    sliced = torch.randn(wide, device=g.device)[(slice(None),) * (channel_dim % len(wide))
                                                 + (slice(None, None, 2),)]
    g_sliced = torch.randn(*g.shape[:-1], g.shape[-1] + 3, device=g.device)[..., 1:-2]
    for what, a_arg, g_arg, s in (("expanded a", expanded, g, scale),
                                  ("sliced a and g", sliced, g_sliced, scale.half())):
        r, l1 = affine_relevance_l1(backend, step, w, g_arg, a_arg, s)
        _check(r, l1, expected64(step, g_arg, a_arg, s), torch.float32, what)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_relevance_gives_zero_norm(backend):
    step, w, g, a, scale = _setup(CONV2D, backend)
    r, l1 = affine_relevance_l1(backend, step, w, torch.zeros_like(g), a, scale)
    assert (r == 0).all() and (l1 == 0).all()


# -- the C++ op: determinism, errors, fake implementation -------------------------------------
@needs_cpp
def test_cpp_norms_are_deterministic_across_thread_counts():
    """The per-sample norms are summed in fixed blocks: bit-identical for any thread count."""
    from rlrp_fast import ops
    step, w, g, a, _ = _setup(Case(2, 3, 16, 16, (97, 89), 3, 1, 1, 1, 1), "cpp")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.affine_relevance_l1(g, w, a, **step.geometry)
        torch.set_num_threads(max(2, threads))
        many = ops.affine_relevance_l1(g, w, a, **step.geometry)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


@needs_cpp
def test_cpp_rejects_mismatched_inputs():
    from rlrp_fast import ops
    step, w, g, a, scale = _setup(CONV2D, "cpp")
    with pytest.raises(RuntimeError, match="disagree on the batch size"):
        ops.affine_relevance_l1(g, w, a[:1], **step.geometry)
    with pytest.raises(RuntimeError, match="one value per sample"):
        ops.affine_relevance_l1(g, w, a, g_scale=scale[:1], **step.geometry)
    with pytest.raises(RuntimeError, match="stride, padding and dilation"):
        ops.affine_relevance_l1(g, w, a, **{**step.geometry, "stride": [1]})


@needs_cpp
@pytest.mark.parametrize("case", [LINEAR_2D, LINEAR_3D, CONV1D, CONV2D, CONV2D_POINTWISE_PADDED,
                                  CONV3D, DEPTHWISE_1D, DEPTHWISE_2D, DEPTHWISE_3D], ids=str)
def test_cpp_opcheck(case):
    """Schema, fake (meta) implementation, and tracing of
    ``torch.ops.rlrp_fast.affine_relevance_l1`` on each geometry it claims: with and without
    ``g_scale``, low-precision ``a``, channels-last."""
    step, w, g, a, scale = _setup(case, "cpp")
    geo = [step.geometry[k] for k in ("stride", "padding", "dilation", "groups", "conv_dims")]
    op = torch.ops.rlrp_fast.affine_relevance_l1.default
    arg_sets = [(g, w, a, None, *geo), (g, w, a.bfloat16(), scale, *geo),
                (g, w, a.half(), scale.double(), *geo)]
    if case.conv_dims >= 2:
        fmt = torch.channels_last if case.conv_dims == 2 else torch.channels_last_3d
        arg_sets.append((g, w, a.contiguous(memory_format=fmt), scale, *geo))
    for args in arg_sets:
        torch.library.opcheck(op, args)


# -- the Triton kernels: many tiles, their own allocation, their errors --------------------
@pytest.mark.parametrize("backend", [TRITON])
@pytest.mark.parametrize("case", [CASES[2], CASES[6], CASES[15], DEPTHWISE_2D,
                                  NARROW_GROUPED], ids=str)
def test_triton_many_tiles(backend, case):
    """16-wide blocks: several row/position tiles, some straddling two samples (per-row L1
    atomics), in ragged groups; channel tiles and reduction steps per tap."""
    step, w, g, a, scale = _setup(case, backend)
    config = SMALL_BLOCKS[1 if case.conv_dims == 0 else 2]
    out = poisoned(case.input_shape, g.device)
    r, l1 = triton_kernels().affine_relevance_l1(g, w, a, g_scale=scale, out=out, config=config,
                                                 **step.geometry)
    _check(r, l1, expected64(step, g, a, scale), torch.float32)


@pytest.mark.parametrize("backend", [TRITON])
@pytest.mark.parametrize("case, narrow", [(DEPTHWISE_1D, True), (DEPTHWISE_2D, True),
                                          (NARROW_GROUPED, True), (WIDE_GROUPED, False),
                                          (CONV1D, False)], ids=str)
def test_triton_narrow_groups_take_their_kernel(backend, case, narrow, monkeypatch):
    """Depthwise and narrow groups launch the elementwise kernel across groups, the rest the
    implicit GEMM."""
    from rlrp_fast.kernels import affine_relevance_conv as conv
    launched = []

    class Spy:
        def __init__(self, name):
            self.name, self.kernel = name, getattr(conv, name)

        def __getitem__(self, grid):
            launched.append(self.name)
            return self.kernel[grid]

    for name in ("_launcher", "_grouped_launcher"):
        monkeypatch.setattr(conv, name, Spy(name))
    step, w, g, a, scale = _setup(case, backend)
    r, l1 = triton_kernels().affine_relevance_l1(g, w, a, g_scale=scale, **step.geometry)
    assert launched == ["_grouped_launcher" if narrow else "_launcher"]
    _check(r, l1, expected64(step, g, a, scale), torch.float32)


@pytest.mark.parametrize("backend", [TRITON])
def test_triton_allocates_like_a(backend):
    step, w, g, a, scale = _setup(CONV2D, backend)
    for a_arg in (a.contiguous(memory_format=torch.channels_last), a):
        r, l1 = triton_kernels().affine_relevance_l1(g, w, a_arg, **step.geometry)
        fmt = torch.channels_last if not a_arg.is_contiguous() else torch.contiguous_format
        assert r.is_contiguous(memory_format=fmt)
        _check(r, l1, expected64(step, g, a_arg), torch.float32)


@pytest.mark.parametrize("backend", [TRITON])
def test_triton_rejects_what_it_does_not_take(backend):
    step, w, g, a, scale = _setup(CONV2D, backend)
    kernels = triton_kernels()
    with pytest.raises(ValueError, match="g_scale must have shape"):
        kernels.affine_relevance_l1(g, w, a, g_scale=scale[:1], **step.geometry)
    with pytest.raises(ValueError, match="g_scale must be float32"):
        kernels.affine_relevance_l1(g, w, a, g_scale=scale.double(), **step.geometry)
    with pytest.raises(ValueError, match="cannot come from an input of shape"):
        kernels.affine_relevance_l1(g, w, a[..., :-3, :], **step.geometry)
    with pytest.raises(ValueError, match="a must be float32"):
        kernels.affine_relevance_l1(g, w, a.double(), **step.geometry)
