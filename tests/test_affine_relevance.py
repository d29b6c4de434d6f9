"""The classic rules' primitive ``affine_relevance``: ``a ⊙ Wᵀ(g / stab(z))`` with
``stab(z) = z + eps·(sign(z) + (z == 0))``, ``a`` optional (flat, w²: no factor), ``z``
optional (no division).

Every backend's own entry point (``TorchBackend.affine_relevance``, ``rlrp_fast.ops``, the
Triton entry point, interpreted on CPU) against float64 math written out with torch ops, on
Linear, Conv1d, Conv2d and Conv3d geometries (the Triton kernels take Linear, Conv1d and
Conv2d with float32 relevance; other cases are skipped for them), every dtype of ``a`` and
``z``, NCHW and channels-last, expanded and sliced inputs; outputs are poisoned (NaN) before
the op writes them. ``torch.library.opcheck`` checks the C++ op's schema and fake
implementation on each geometry.
"""
from __future__ import annotations

import pytest
import torch
from primitive_cases import (BACKENDS, CASE_IDS, CASES, CONV1D, CONV2D, CONV2D_POINTWISE_PADDED,
                             CONV3D, CPP_REASON, DEPTHWISE_1D, DEPTHWISE_2D, DEPTHWISE_3D,
                             LINEAR_2D, LINEAR_3D, NARROW_GROUPED, SMALL_BLOCKS, TOL,
                             assert_close, device_of, poisoned, poisoned_memory,  # noqa: F401
                             skip_unless_triton_takes, stab64, transpose64, triton_kernels)

from rlrp_fast.backends.torch_backend import TorchBackend

needs_cpp = pytest.mark.skipif(CPP_REASON is not None, reason=f"cpp backend: {CPP_REASON}")
pytestmark = pytest.mark.usefixtures("no_tf32", "poisoned_memory")


def affine_relevance(backend, step, weight, g, input_shape, a=None, z=None, eps=0.0,
                     memory_format=torch.contiguous_format):
    """The primitive through ``backend``'s own entry point (Triton: into a NaN-filled
    ``out`` of ``memory_format``)."""
    if backend == "torch":
        return TorchBackend().affine_relevance(step, weight, g, torch.Size(input_shape), a, z, eps)
    if backend == "cpp":
        from rlrp_fast import ops
        return ops.affine_relevance(g, weight, a=a, z=z, eps=eps, input_shape=input_shape,
                                    **step.geometry)
    out = poisoned(input_shape, g.device, memory_format)
    r = triton_kernels().affine_relevance(g, weight, a=a, z=z, eps=eps, input_shape=input_shape,
                                          out=out, **step.geometry)
    assert r.data_ptr() == out.data_ptr()
    return r


def expected64(step, g, input_shape, a=None, z=None, eps=0.0) -> torch.Tensor:
    q = g.double().cpu() if z is None else g.double().cpu() / stab64(z, eps)
    back = transpose64(step, q, input_shape)
    return back if a is None else back * a.double().cpu()


def tiny_z(shape, device, dtype=torch.float32, zeros=True) -> torch.Tensor:
    """Pre-activations with ±1e-30 (where LRP-0 explodes) and, unless ``zeros`` is False,
    exact zeros; the rest random."""
    z = torch.randn(shape)
    flat = z.view(-1)
    idx = torch.randperm(flat.numel())
    part = max(1, flat.numel() // 6)
    flat[idx[:part]] = 0.0 if zeros else 1e-30
    flat[idx[part:2 * part]] = 1e-30
    flat[idx[2 * part:3 * part]] = -1e-30
    return z.to(device=device, dtype=dtype)


def _setup(case, backend, rel_dtype=torch.float32):
    device = device_of(backend)
    step = case.step(rel_dtype)
    w = step.weight.to(device)
    g = torch.randn(case.output_shape(step), dtype=rel_dtype, device=device)
    a = torch.randn(case.input_shape, dtype=rel_dtype, device=device)
    return step, w, g, a


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rel_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_matches_float64_math(backend, case, rel_dtype):
    """The rules' uses: ε/z⁺/γ (a, z, eps > 0 with exact zeros in z), flat/w² (no a), zB's
    terms (no z), LRP-0 (eps 0, z down to ±1e-30)."""
    step, w, g, a = _setup(case, backend, rel_dtype)
    skip_unless_triton_takes(backend, step, g)
    device = g.device
    variants = [
        ("a, z, eps 0.25", a, tiny_z(g.shape, device), 0.25),
        ("a, bfloat16 z, eps 1e-6", a, tiny_z(g.shape, device, torch.bfloat16), 1e-6),
        ("no a, z, eps 0.5", None, tiny_z(g.shape, device), 0.5),
        ("a, no z", a, None, 0.0),
        ("a, z, eps 0 (LRP-0)", a, tiny_z(g.shape, device, zeros=False), 0.0),
    ]
    for what, a_arg, z, eps in variants:
        r = affine_relevance(backend, step, w, g, case.input_shape, a_arg, z, eps)
        assert r.dtype == rel_dtype and r.device == device, what
        assert_close(r, expected64(step, g, case.input_shape, a_arg, z, eps), TOL[rel_dtype],
                     what)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("a_dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", [LINEAR_3D, CONV1D, CONV2D, CONV3D, DEPTHWISE_1D,
                                  DEPTHWISE_2D, DEPTHWISE_3D], ids=str)
def test_input_dtypes(backend, case, a_dtype):
    """``a`` (and ``z``) in any float dtype are upcast exactly: the relevance dtype alone sets
    the error. float64 relevance with a float32 ``a`` too (not a Triton case)."""
    for rel_dtype in (torch.float32, torch.float64):
        step, w, g, a = _setup(case, backend, rel_dtype)
        a = a.to(a_dtype)
        # float16 cannot hold ±1e-30: its z is plain random
        z = (torch.randn(g.shape, device=g.device).half() if a_dtype == torch.float16
             else tiny_z(g.shape, g.device, a_dtype))
        if rel_dtype == torch.float64 and (a_dtype != torch.float32 or backend == "triton"):
            continue
        skip_unless_triton_takes(backend, step, g, a, z)
        r = affine_relevance(backend, step, w, g, case.input_shape, a, z, 0.1)
        assert r.dtype == rel_dtype
        assert_close(r, expected64(step, g, case.input_shape, a, z, 0.1), TOL[rel_dtype],
                     f"{rel_dtype} relevance")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy divides by 0
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [LINEAR_2D, CONV2D], ids=str)
def test_lrp0_exact_zero(backend, case):
    """LRP-0 with ``z == ±0`` exactly: non-finite exactly where float64 math is, the rest
    right (no silent ε)."""
    step, w, g, a = _setup(case, backend)
    skip_unless_triton_takes(backend, step, g)
    z = torch.randn(g.shape, device=g.device) + 3 * torch.sign(torch.randn(g.shape)).to(g.device)
    z[1 % len(z)].view(-1)[3] = 0.0
    z[-1].view(-1)[0] = -0.0
    r = affine_relevance(backend, step, w, g, case.input_shape, a, z, 0.0)
    e = expected64(step, g, case.input_shape, a, z, 0.0)
    assert (~torch.isfinite(e)).any()
    assert torch.equal(torch.isfinite(r).cpu(), torch.isfinite(e))
    finite = torch.isfinite(e).reshape(len(e), -1).all(1)
    assert finite.any()
    assert_close(r[finite.to(r.device)], e[finite], TOL[torch.float32], "finite samples")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [CONV2D, CONV2D_POINTWISE_PADDED, CONV3D, DEPTHWISE_2D,
                                  DEPTHWISE_3D], ids=str)
def test_channels_last(backend, case):
    """Channels-last ``a``, ``z`` and ``g`` are read in place; the fused backends lay the
    result out like ``a`` (like ``g`` without ``a``)."""
    step, w, g, a = _setup(case, backend)
    skip_unless_triton_takes(backend, step, g)
    fmt = torch.channels_last if case.conv_dims == 2 else torch.channels_last_3d
    a, g = a.contiguous(memory_format=fmt), g.contiguous(memory_format=fmt)
    z = tiny_z(g.shape, g.device).contiguous(memory_format=fmt)
    for a_arg in (a, None):
        r = affine_relevance(backend, step, w, g, case.input_shape, a_arg, z, 1e-3,
                             memory_format=fmt)
        if backend != "torch":
            assert r.is_contiguous(memory_format=fmt)
        assert_close(r, expected64(step, g, case.input_shape, a_arg, z, 1e-3),
                     TOL[torch.float32], "a" if a_arg is not None else "no a")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [LINEAR_2D, CONV1D, CONV2D, DEPTHWISE_1D, DEPTHWISE_2D],
                         ids=str)
def test_expanded_and_sliced_inputs(backend, case):
    """zB's bounds arrive as stride-0 expansions of a per-channel vector; slices have holes:
    both are read as what they are, never as flat memory."""
    step, w, g, a = _setup(case, backend)
    skip_unless_triton_takes(backend, step, g)
    channel_dim = -1 if case.conv_dims == 0 else 1
    per_channel = [1] * len(case.input_shape)
    per_channel[channel_dim] = case.input_shape[channel_dim]
    low = torch.randn(per_channel, device=g.device).expand(case.input_shape)
    wide = list(case.input_shape)
    wide[channel_dim] *= 2
    sliced = torch.randn(wide, device=g.device)[(slice(None),) * (channel_dim % len(wide))
                                                 + (slice(None, None, 2),)]
    g_wide = torch.randn(*g.shape[:-1], g.shape[-1] + 3, device=g.device)[..., 1:-2]
    z = tiny_z(g.shape, g.device)
    for what, a_arg, g_arg in (("expanded a", low, g), ("sliced a and g", sliced, g_wide)):
        r = affine_relevance(backend, step, w, g_arg, case.input_shape, a_arg, z, 1e-2)
        assert_close(r, expected64(step, g_arg, case.input_shape, a_arg, z, 1e-2),
                     TOL[torch.float32], what)


# -- the Triton kernels: many tiles, their own allocation, their errors --------------------
TRITON = BACKENDS[2]


@pytest.mark.parametrize("backend", [TRITON])
@pytest.mark.parametrize("case", [CASES[2], CASES[6], CASES[15], DEPTHWISE_2D,
                                  NARROW_GROUPED], ids=str)
def test_triton_many_tiles(backend, case):
    """16-wide blocks: several row/position tiles (some straddling samples) in ragged groups,
    channel tiles and reduction steps per tap, with the division in the prologue."""
    step, w, g, a = _setup(case, backend)
    g = torch.randn(case.output_shape(step), device=g.device)
    z = tiny_z(g.shape, g.device)
    config = SMALL_BLOCKS[1 if case.conv_dims == 0 else 2]
    out = poisoned(case.input_shape, g.device)
    r = triton_kernels().affine_relevance(g, w, a=a, z=z, eps=1e-3, input_shape=case.input_shape,
                                          out=out, config=config, **step.geometry)
    assert_close(r, expected64(step, g, case.input_shape, a, z, 1e-3), TOL[torch.float32])


@pytest.mark.parametrize("backend", [TRITON])
def test_triton_allocates_like_a(backend):
    step, w, g, a = _setup(CONV2D, backend)
    for a_arg in (a.contiguous(memory_format=torch.channels_last), a, None):
        r = triton_kernels().affine_relevance(g, w, a=a_arg, input_shape=a.shape,
                                              **step.geometry)
        channels_last = a_arg is not None and not a_arg.is_contiguous()
        assert r.is_contiguous(memory_format=torch.channels_last if channels_last
                               else torch.contiguous_format)
        assert_close(r, expected64(step, g, a.shape, a_arg), TOL[torch.float32])


@pytest.mark.parametrize("backend", [TRITON])
def test_triton_rejects_what_it_does_not_take(backend):
    step, w, g, a = _setup(CONV2D, backend)
    kernels = triton_kernels()
    geometry = step.geometry
    with pytest.raises(ValueError, match="float32"):
        kernels.affine_relevance(g.double(), w, a=a, input_shape=a.shape, **geometry)
    with pytest.raises(ValueError, match="z has shape"):
        kernels.affine_relevance(g, w, a=a, z=g[:1], input_shape=a.shape, **geometry)
    with pytest.raises(ValueError, match="a has shape"):
        kernels.affine_relevance(g, w, a=a[:, :1], input_shape=a.shape, **geometry)
    with pytest.raises(ValueError, match="cannot come from an input of shape"):
        kernels.affine_relevance(g, w, a=None, input_shape=(*a.shape[:2], 3, 3), **geometry)
    with pytest.raises(ValueError, match="stride values"):
        kernels.affine_relevance(g, w, a=a, input_shape=a.shape, **{**geometry, "stride": [2]})
    with pytest.raises(ValueError, match="groups"):
        kernels.affine_relevance(g, w, a=a, input_shape=a.shape, **{**geometry, "groups": 4})
    with pytest.raises(ValueError, match="out must be float32"):
        kernels.affine_relevance(g, w, a=a, input_shape=a.shape, out=torch.empty(3), **geometry)
    step3 = CONV3D.step()
    g3 = torch.randn(CONV3D.output_shape(step3), device=g.device)
    with pytest.raises(ValueError, match="not Conv3d"):
        kernels.affine_relevance(g3, step3.weight.to(g.device), input_shape=CONV3D.input_shape,
                                 **step3.geometry)
    lin = LINEAR_2D.step()
    with pytest.raises(ValueError, match="Linear weight"):
        kernels.affine_relevance(torch.randn(2, 5, device=g.device), lin.weight.to(g.device),
                                 input_shape=(2, LINEAR_2D.c_in), **lin.geometry)


# -- the C++ op: its errors and its fake implementation --------------------------------------
@needs_cpp
def test_cpp_rejects_mismatched_shapes():
    from rlrp_fast import ops
    step, w, g, a = _setup(CONV2D, "cpp")
    with pytest.raises(RuntimeError, match="z has shape"):
        ops.affine_relevance(g, w, z=g[:1], input_shape=a.shape, **step.geometry)
    with pytest.raises(RuntimeError, match="a has shape"):
        ops.affine_relevance(g, w, a=a[:1], input_shape=a.shape, **step.geometry)
    with pytest.raises(RuntimeError, match="cannot come from an input of shape"):
        ops.affine_relevance(g, w, input_shape=(*a.shape[:2], 3, 3), **step.geometry)
    with pytest.raises(RuntimeError, match="weight dtype"):
        ops.affine_relevance(g, w.double(), input_shape=a.shape, **step.geometry)


@needs_cpp
@pytest.mark.parametrize("case", [LINEAR_2D, LINEAR_3D, CONV1D, CONV2D, CONV2D_POINTWISE_PADDED,
                                  CONV3D, DEPTHWISE_1D, DEPTHWISE_2D, DEPTHWISE_3D], ids=str)
def test_cpp_opcheck(case):
    """Schema, fake (meta) implementation, and tracing of ``torch.ops.rlrp_fast.affine_relevance``
    on each geometry it claims: with and without ``a`` and ``z``, low-precision ``a``/``z``,
    channels-last."""
    step, w, g, a = _setup(case, "cpp")
    z = tiny_z(g.shape, "cpu")
    geo = [step.geometry[k] for k in ("stride", "padding", "dilation", "groups", "conv_dims")]
    op = torch.ops.rlrp_fast.affine_relevance.default
    shape = list(case.input_shape)
    arg_sets = [(g, w, a, z, 0.25, shape, *geo), (g, w, None, z.bfloat16(), 1e-6, shape, *geo),
                (g, w, a.half(), None, 0.0, shape, *geo)]
    if case.conv_dims >= 2:
        fmt = torch.channels_last if case.conv_dims == 2 else torch.channels_last_3d
        arg_sets.append((g, w, a.contiguous(memory_format=fmt), None, 0.0, shape, *geo))
        arg_sets.append((g.contiguous(memory_format=fmt), w, None, z, 0.5, shape, *geo))
    for args in arg_sets:
        torch.library.opcheck(op, args)
