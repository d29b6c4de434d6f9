"""Attention written out in ``forward`` (timm's ``Attention`` with ``fused_attn=False``, DINO,
MAE): ``softmax(q kᵀ · scale) @ v`` is a matmul with a softmax gate (docs/RLRP_SPEC.md,
"Gates: the signal takes all"): ``v`` takes all, ``P`` held constant. Against the float64
reference, and equal to the same network written with ``F.scaled_dot_product_attention``
(one attention step) under every rule."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import rlrp_fast
from rlrp_fast import UnsupportedModelError
from rlrp_fast.capture import capture
from rlrp_fast.plan import Attention, Gate
from rlrp_fast.reference import reference_explain

CASES = [("rlrp", {"norm": "layer"}), ("rlrp", {"norm": "neuron"}), ("lrp0", {}),
         ("epsilon", {"epsilon": 0.1}), ("EpsilonPlus", {})]


class TinyViT(nn.Module):
    """Patches, a position embedding, one pre-norm attention block (packed qkv Linear split
    by reshape/permute/unbind, as timm) with a residual, mean pooling, a head."""

    def __init__(self, written: bool, gate_left: bool = True, dim: int = 8, heads: int = 2):
        super().__init__()
        self.written, self.gate_left, self.heads = written, gate_left, heads
        self.patch = nn.Conv2d(3, dim, 2, stride=2)
        self.pos = nn.Parameter(0.1 * torch.randn(1, 9, dim))
        self.norm = nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.scale = (dim // heads) ** -0.5
        self.head = nn.Linear(dim, 4)

    def attend(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if not self.written:
            o = F.scaled_dot_product_attention(q, k, v)
        elif self.gate_left:
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            o = attn @ v
        else:  # the transposed form: vᵀ Pᵀ
            attn_t = (k @ q.transpose(-2, -1) * self.scale).softmax(dim=-2)
            o = (v.transpose(-2, -1) @ attn_t).transpose(-2, -1)
        return self.proj(o.transpose(1, 2).reshape(b, n, c))

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        tokens = tokens + self.attend(self.norm(tokens))
        return self.head(F.relu(tokens).mean(1))


def _models(**kwargs) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    written = TinyViT(True, **kwargs).double().eval()
    fused = TinyViT(False).double().eval()
    fused.load_state_dict(written.state_dict())
    return written, fused


@pytest.mark.parametrize("gate_left", [True, False], ids=["P@v", "vT@PT"])
@pytest.mark.parametrize("rule,options", CASES, ids=[f"{r}{o}" for r, o in CASES])
def test_written_attention_matches_the_reference(gate_left, rule, options):
    written, _ = _models(gate_left=gate_left)
    plan = capture(written)
    gates = [s for s in plan.steps if isinstance(s, Gate) and s.kind == "matmul"]
    assert len(gates) == 1 and gates[0].gate_left == gate_left
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64)
    fast = rlrp_fast.Explainer(written, rule=rule, backend="torch", **options).explain(x)
    ref, logits = reference_explain(plan, x, rule=rule, **options)
    torch.testing.assert_close(fast.logits, written(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast.relevance, ref, rtol=1e-10, atol=1e-12)
    if rule == "rlrp":
        mass = logits.gather(1, fast.targets[:, None]).abs().view(-1)
        torch.testing.assert_close(fast.relevance.abs().flatten(1).sum(1), mass, rtol=1e-10,
                                   atol=0)
    one = rlrp_fast.Explainer(written, rule=rule, backend="torch", **options).explain(x[2:])
    torch.testing.assert_close(one.relevance, fast.relevance[2:], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("rule,options", CASES, ids=[f"{r}{o}" for r, o in CASES])
def test_written_attention_equals_the_attention_step(rule, options):
    """The same function written two ways is explained the same way: the gate's value path
    is the attention step's (P held constant, query and key get nothing)."""
    written, fused = _models()
    assert any(isinstance(s, Attention) for s in capture(fused).steps)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    a = rlrp_fast.Explainer(written, rule=rule, backend="torch", **options).explain(x)
    b = rlrp_fast.Explainer(fused, rule=rule, backend="torch", **options).explain(x)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.relevance, b.relevance, rtol=1e-9, atol=1e-12)


def test_float32_and_the_default_backend():
    written, _ = _models()
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    want = rlrp_fast.Explainer(written, backend="torch").explain(x).relevance
    got = rlrp_fast.Explainer(written.float()).explain(x.float()).relevance
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


def test_timm_vit_written_out_equals_fused():
    """timm's ViT with ``fused_attn=False`` (its written-out attention) explains as with
    ``F.scaled_dot_product_attention``."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    fused = rlrp_fast.Explainer(model).explain(x)
    for block in model.blocks:
        block.attn.fused_attn = False
    written = rlrp_fast.Explainer(model).explain(x)
    torch.testing.assert_close(written.logits, fused.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(written.relevance, fused.relevance, rtol=1e-3, atol=1e-6)


class TwoGatesMatmul(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(4, 9), nn.Linear(9, 2)

    def forward(self, x):
        h = self.fc(x).view(-1, 3, 3)
        return self.out((h.softmax(-1) @ torch.sigmoid(h)).flatten(1))


def test_a_matmul_of_two_gates_is_refused():
    with pytest.raises(UnsupportedModelError, match="both operands are gates"):
        rlrp_fast.Explainer(TwoGatesMatmul().eval())

