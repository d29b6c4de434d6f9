"""Attention's value mixing and its relevance without the attention matrix
(``rlrp_fast.kernels.attention_relevance``: ``attention_mix`` → ``P v``, ``P|v|``, row
log-sum-exp; ``attention_relevance`` → ``v ⊙ (Pᵀ g)`` and per-sample L1), against float64
torch with ``P`` materialised; the backend primitives of every backend; an explanation of a
MultiheadAttention model through the kernels equal to the torch backend's.

Here the kernels run under Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``, set
by conftest.py); on a CUDA machine run it with ``TRITON_INTERPRET=0 RLRP_TRITON_AUTOTUNE=0``.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from primitive_cases import assert_close, assert_norms

triton = pytest.importorskip("triton")

import rlrp_fast  # noqa: E402
from rlrp_fast.backends import TorchBackend, cpp_backend  # noqa: E402
from rlrp_fast.backends.triton_backend import TritonBackend  # noqa: E402
from rlrp_fast.kernels import _common  # noqa: E402
from rlrp_fast.kernels import attention_relevance as kernels  # noqa: E402

if _common.INTERPRET:
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    DEVICE = None
pytestmark = [pytest.mark.skipif(DEVICE is None, reason="Triton needs CUDA or TRITON_INTERPRET=1"),
              pytest.mark.usefixtures("no_tf32", "one_thread")]
DEVICE = DEVICE or "cpu"
# small tiles: several query and key blocks per head, so the online softmax rescales and the
# adjoint loops (the default interpreter blocks are 64)
SMALL = {"BLOCK_M": 16, "BLOCK_N": 16}


def _heads(n, length, h, d, dtype, gen):
    """``[N, H, L, d]`` as attention reads it: a transposed view of ``[N, L, H·d]``."""
    x = torch.randn(n, length, h * d, generator=gen).to(DEVICE, dtype)
    return x.unflatten(-1, (h, d)).transpose(1, 2)


def _operands(n=2, h=3, length=37, source=29, d=13, e=11, dtype=torch.float32, bias="none",
              seed=0):
    """``q, k, v, g, bias`` with ragged sizes; ``bias``: "none", "broadcast" (``(L, S)``
    expanded to ``(N, H, L, S)``, 0 strides, -inf entries, the first key block of one row
    fully blocked), "full" (a contiguous per-head mask) or "padding" (``(N, 1, 1, S)``)."""
    gen = torch.Generator().manual_seed(seed)
    q, k = _heads(n, length, h, d, dtype, gen), _heads(n, source, h, d, dtype, gen)
    v = _heads(n, source, h, e, dtype, gen)
    g = torch.randn(n, h, length, e, generator=gen).to(DEVICE)
    if bias == "none":
        return q, k, v, g, None
    if bias == "broadcast":
        m = torch.randn(length, source, generator=gen)
        m[torch.rand(length, source, generator=gen) < 0.3] = float("-inf")
        m[:, -1] = 0.0  # no row fully blocked
        m[5, :16] = float("-inf")  # a first key block with nothing: the online softmax's -inf
        m = m.expand(n, h, length, source)
    elif bias == "full":
        m = torch.randn(n, h, length, source, generator=gen)
    else:
        m = torch.zeros(n, 1, 1, source).masked_fill_(
            torch.rand(n, 1, 1, source, generator=gen) < 0.4, float("-inf"))
        m[..., 0] = 0.0
    return q, k, v, g, m.to(DEVICE, dtype)


def _expected(q, k, v, g, bias, scale):
    """``(P v, P|v|, lse, Pᵀ g)`` in float64 from the same (upcast) inputs."""
    q, k, v, g = (t.detach().double().cpu() for t in (q, k, v, g))
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
    if bias is not None:
        scores = scores + bias.double().cpu()
    p = torch.softmax(scores, dim=-1)
    return p @ v, p @ v.abs(), torch.logsumexp(scores, -1), p.transpose(-2, -1) @ g


CASES = {  # name: (operand options, scale, config)
    "plain": ({}, None, None),
    "L>S small tiles": ({"length": 41, "source": 23}, None, SMALL),
    "L<S broadcast -inf": ({"length": 19, "source": 45, "bias": "broadcast"}, 0.37, SMALL),
    "padding mask d=5": ({"d": 5, "e": 20, "bias": "padding"}, None, SMALL),
    "per-head bias d=32": ({"d": 32, "e": 17, "bias": "full", "length": 9, "source": 70},
                           0.1, None),
}
DTYPES = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}


@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_attention_mix_and_relevance_match_float64(case, dtype):
    options, scale, config = CASES[case]
    q, k, v, g, bias = _operands(dtype=dtype, **options)
    o64, o_abs64, lse64, pt_g64 = _expected(q, k, v, g, bias, scale)
    tol = DTYPES[dtype]
    for abs_v in (False, True):
        o, o_abs, lse = kernels.attention_mix(q, k, v, bias, scale, abs_v, config=config)
        assert o.dtype == lse.dtype == torch.float32
        assert_close(o, o64, tol, f"{case} P v")
        assert_close(lse, lse64, tol, f"{case} lse")
        if abs_v:
            assert_close(o_abs, o_abs64, tol, f"{case} P|v|")
        else:
            assert o_abs is None
    r_v64 = v.double().cpu() * pt_g64
    r, l1 = kernels.attention_relevance(q, k, v, g, lse, bias, scale, config=config)
    assert r.shape == v.shape and r.dtype == torch.float32
    assert_close(r, r_v64, tol, f"{case} v ⊙ Pᵀg")
    assert_norms(l1, r_v64, tol)
    r, l1 = kernels.attention_relevance(q, k, v, g, lse, bias, scale, multiply_v=False,
                                        compute_l1=False, config=config)
    assert l1 is None
    assert_close(r, pt_g64, tol, f"{case} Pᵀg")


def test_sdpa_layouts():
    """``scaled_dot_product_attention``'s layouts: no head dim (``[N, L, d]``) and two of them
    (``[N, A, B, L, d]``); the L1 norm is per sample over all of them."""
    gen = torch.Generator().manual_seed(1)
    for lead in [(3,), (2, 2, 3)]:
        q = torch.randn(*lead, 21, 7, generator=gen).to(DEVICE)
        k = torch.randn(*lead, 18, 7, generator=gen).to(DEVICE)
        v = torch.randn(*lead, 18, 9, generator=gen).to(DEVICE)
        g = torch.randn(*lead, 21, 9, generator=gen).to(DEVICE)
        bias = torch.randn(21, 18, generator=gen).to(DEVICE)
        o64, _, _, pt_g64 = _expected(q, k, v, g, bias, None)
        o, _, lse = kernels.attention_mix(q, k, v, bias)
        assert_close(o, o64, 1e-5, f"{lead} P v")
        r, l1 = kernels.attention_relevance(q, k, v, g, lse, bias)
        assert_close(r, v.double().cpu() * pt_g64, 1e-5, f"{lead} v ⊙ Pᵀg")
        assert_norms(l1, v.double().cpu() * pt_g64, 1e-5)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy: log 0
def test_a_fully_masked_row_attends_to_nothing():
    """A query that may attend to no key: torch's attention gives 0 there (its softmax alone
    would give NaN), so its ``P`` row is 0: ``o`` 0 and no relevance from it to any key; the
    other rows exact. Kernels and the torch backend alike."""
    q, k, v, g, _ = _operands(length=20, source=24)
    bias = torch.zeros(2, 3, 20, 24, device=DEVICE)
    bias[1, 2, 7] = float("-inf")
    torch_out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    assert not torch_out[1, 2, 7].any()
    p64 = torch.softmax(q.double() @ k.double().transpose(-2, -1) / math.sqrt(q.shape[-1])
                        + bias.double(), -1).nan_to_num(0.0)
    o64, r64 = p64 @ v.double(), v.double() * (p64.transpose(-2, -1) @ g.double())
    o, _, lse = kernels.attention_mix(q, k, v, bias, config=SMALL)
    r, l1 = kernels.attention_relevance(q, k, v, g, lse, bias, config=SMALL)
    torch_b = TorchBackend()
    o_t, _, p = torch_b.attention_mix(q, k, v, bias, None, False)
    r_t, l1_t = torch_b.attention_relevance(q, k, v, g, bias, None, p, True)
    for got_o, got_r, got_l1 in ((o, r, l1), (o_t, r_t, l1_t)):
        assert not got_o[1, 2, 7].any()
        assert_close(got_o, o64, 1e-5, "P v")
        assert_close(got_r, r64, 1e-5, "v ⊙ Pᵀg")
        assert_norms(got_l1, r64, 1e-5)


def test_empty_sequences():
    """No keys: ``P`` is empty and ``P v`` 0 (the materialised product); no queries: 0."""
    q, k, v, g, _ = _operands(source=0)
    o, o_abs, _ = kernels.attention_mix(q, k, v, abs_v=True)
    assert o.shape == (2, 3, 37, 11) and not o.any() and not o_abs.any()
    q, k, v, g, _ = _operands(length=0)
    r, l1 = kernels.attention_relevance(q, k, v, g, torch.empty(2, 3, 0, device=DEVICE))
    assert r.shape == v.shape and not r.any() and not l1.any()


def test_bad_input_is_refused():
    q, k, v, g, _ = _operands()
    _, _, lse = kernels.attention_mix(q, k, v)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        kernels.attention_mix(q.double(), k, v)
    with pytest.raises(ValueError, match="do not fit"):
        kernels.attention_mix(q, k[:, :, :5], v)
    with pytest.raises(ValueError, match="not torch.bool"):
        kernels.attention_mix(q, k, v, torch.ones(37, 29, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="does not broadcast"):
        kernels.attention_mix(q, k, v, torch.zeros(37, 28, device=DEVICE))
    with pytest.raises(ValueError, match="shape of P v"):
        kernels.attention_relevance(q, k, v, g[..., :4], lse)
    with pytest.raises(ValueError, match="relevance must be float32"):
        kernels.attention_relevance(q, k, v, g.double(), lse)
    with pytest.raises(ValueError, match="lse must be"):
        kernels.attention_relevance(q, k, v, g, lse[:, :, :3])


# -- the backend primitives ----------------------------------------------------------------
def _backends():
    found = [TorchBackend(), TritonBackend()]
    if DEVICE == "cpu" and cpp_backend.unavailable_reason() is None:
        found.append(cpp_backend.CppBackend())
    return found


@pytest.fixture
def attention_calls(monkeypatch):
    """Counts the kernels' launches (to tell the fused path from the fallback)."""
    calls = {"mix": 0, "relevance": 0}
    for name, key in (("attention_mix", "mix"), ("attention_relevance", "relevance")):
        fn = getattr(kernels, name)

        def wrapped(*args, _fn=fn, _key=key, **kwargs):
            calls[_key] += 1
            return _fn(*args, **kwargs)
        monkeypatch.setattr(kernels, name, wrapped)
    return calls


def test_backend_primitives_agree(attention_calls):
    """Every backend's ``attention_mix``/``attention_relevance`` against float64."""
    q, k, v, g, bias = _operands(bias="broadcast", length=23, source=31)
    o64, o_abs64, _, pt_g64 = _expected(q, k, v, g, bias, 0.3)
    r64 = v.double().cpu() * pt_g64
    for backend in _backends():
        o, o_abs, state = backend.attention_mix(q, k, v, bias, 0.3, True)
        assert_close(o, o64, 1e-5, f"{backend.name} P v")
        assert_close(o_abs, o_abs64, 1e-5, f"{backend.name} P|v|")
        r, l1 = backend.attention_relevance(q, k, v, g, bias, 0.3, state, True)
        assert_close(r, r64, 1e-5, f"{backend.name} v ⊙ Pᵀg")
        assert_norms(l1, r64, 1e-5)
        _, none, state = backend.attention_mix(q, k, v, None, None, False)
        assert none is None
        r, l1 = backend.attention_relevance(q, k, v, g, None, None, state, False)
        assert l1 is None
        assert_close(r, v.double().cpu() * _expected(q, k, v, g, None, None)[3], 1e-5,
                     f"{backend.name} no bias")
    assert attention_calls == {"mix": 2, "relevance": 2}


def test_triton_backend_falls_back_for_float64(attention_calls):
    """float64 goes to the torch backend (its ``P`` as the state), with its results."""
    q, k, v, g, bias = (t.double() if t is not None else None
                        for t in _operands(bias="padding"))
    torch_b, triton_b = TorchBackend(), TritonBackend()
    o, o_abs, state = triton_b.attention_mix(q, k, v, bias, None, True)
    o_ref, o_abs_ref, p = torch_b.attention_mix(q, k, v, bias, None, True)
    assert torch.equal(o, o_ref) and torch.equal(o_abs, o_abs_ref) and torch.equal(state, p)
    r, l1 = triton_b.attention_relevance(q, k, v, g, bias, None, state, True)
    r_ref, l1_ref = torch_b.attention_relevance(q, k, v, g, bias, None, p, True)
    assert r.dtype == torch.float64 and torch.equal(r, r_ref) and torch.equal(l1, l1_ref)
    assert attention_calls == {"mix": 0, "relevance": 0}


# -- whole explainer -----------------------------------------------------------------------
class _AttentionNet(nn.Module):
    """Tokens → embedding → self-attention with a boolean mask (packed projections),
    residual, LayerNorm, a second cross attention with separate key/value widths and odd head
    dims → head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 12)
        self.attn = nn.MultiheadAttention(12, 3, batch_first=True)
        self.norm = nn.LayerNorm(12)
        self.cross = nn.MultiheadAttention(10, 2, batch_first=True, kdim=7, vdim=6)
        self.down = nn.Linear(12, 10)
        self.head = nn.Linear(10, 4)

        blocked = torch.zeros(9, 9, dtype=torch.bool)
        blocked[:, -2:] = True  # the last two tokens are keys for nobody
        self.register_buffer("blocked", blocked)

    def forward(self, x):
        h = self.embed(x)
        a, _ = self.attn(h, h, h, attn_mask=self.blocked, need_weights=False)
        h = self.down(torch.relu(self.norm(h + a)))
        c, _ = self.cross(h, x[..., :7], x[..., 2:], need_weights=False)
        return self.head(torch.relu(h + c)[:, 0])


RULES = {"rlrp": {"rule": "rlrp", "norm": "layer"},
         "rlrp-neuron": {"rule": "rlrp", "norm": "neuron"},
         "epsilon": {"rule": "epsilon"}}


@pytest.mark.parametrize("rule", list(RULES))
def test_explainer_triton_equals_torch(rule, attention_calls):
    model = _AttentionNet().eval().to(DEVICE)
    x = torch.randn(3, 9, 8, device=DEVICE)
    reference = rlrp_fast.Explainer(model, backend="torch", **RULES[rule])(x)
    explainer = rlrp_fast.Explainer(model, backend="torch", **RULES[rule])
    if DEVICE == "cuda":
        explainer = rlrp_fast.Explainer(model, backend="triton", **RULES[rule])
    else:  # the registry serves triton on cuda only; the interpreter runs on CPU tensors
        explainer._backend = TritonBackend()
    fused = explainer(x)
    assert attention_calls == {"mix": 2, "relevance": 2}  # both attention layers, fused
    assert torch.equal(fused.targets, reference.targets)
    assert_close(fused.relevance, reference.relevance, 1e-5, rule)
