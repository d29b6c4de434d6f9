"""Attention inside windows with a relative position bias as one step — torchvision's Swin
(ShiftedWindowAttention, V2) and MaxViT (RelativePositionalMultiHeadAttention): relevance
reaches the tokens through the values only (RLRP_SPEC.md, attention), the window layout (zero
padding, cyclic shift, partition) routes it by element. The fast path against the float64
reference (index arithmetic, explicit matrices), the plan's forward against torchvision's, and
torchvision's Swin V1/V2 and MaxViT models end to end."""
import os

import pytest
import torch
import torch.nn as nn

import rlrp_fast
from rlrp_fast.capture import capture
from rlrp_fast.plan import Pad, WindowAttention
from rlrp_fast.reference import reference_explain
from rlrp_fast.window_attention import window_attention_forward

swin = pytest.importorskip("torchvision.models.swin_transformer")


class Block(nn.Module):
    """(N, H, W, 3) → embedding → residual window attention → mean over the map → head."""

    def __init__(self, v2: bool, window, shift, bias: bool = True):
        super().__init__()
        self.embed = nn.Linear(3, 4, bias=bias)
        cls = swin.ShiftedWindowAttentionV2 if v2 else swin.ShiftedWindowAttention
        self.attn = cls(4, list(window), list(shift), num_heads=2)
        self.head = nn.Linear(4, 3)
        with torch.no_grad():  # torchvision's initial bias table is ~0; the key bias too
            for p in self.attn.parameters():
                p.normal_(0, 0.7)

    def forward(self, x):
        h = self.embed(x)
        return self.head((h + self.attn(h)).mean((1, 2)))


# (H, W, window, shift): shifted without padding; shifted with padding on both axes; a window
# that covers the padded height (no shift along it, shifted along the width); no shift
GEOMETRIES = [(6, 6, (3, 3), (1, 1)), (5, 7, (3, 3), (1, 2)), (3, 4, (3, 3), (1, 1)),
              (4, 4, (2, 2), (0, 0))]
CASES = [("rlrp", {"norm": "layer"}), ("rlrp", {"norm": "neuron"}),
         ("epsilon", {"epsilon": 0.1}), ("lrp0", {}), ("EpsilonPlus", {})]


def _block(v2: bool, geometry, batch: int = 3):
    height, width, window, shift = geometry
    torch.manual_seed(2)
    model = Block(v2, window, shift).double().eval()
    return model, torch.randn(batch, height, width, 3, dtype=torch.float64)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"{g[0]}x{g[1]}s{g[3]}")
@pytest.mark.parametrize("rule,options", CASES, ids=[f"{r}{o}" for r, o in CASES])
def test_window_attention_matches_the_reference(v2, geometry, rule, options):
    model, x = _block(v2, geometry)
    plan = capture(model)
    assert sum(isinstance(s, WindowAttention) for s in plan.steps) == 1
    fast = rlrp_fast.Explainer(model, rule=rule, backend="torch", **options).explain(x)
    ref, logits = reference_explain(plan, x, rule=rule, **options)
    torch.testing.assert_close(fast.logits, logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast.relevance, ref, rtol=1e-10, atol=1e-13)
    assert torch.isfinite(fast.relevance).all() and (fast.relevance != 0).any()
    if rule == "rlrp":
        mass = logits.gather(1, fast.targets[:, None]).abs().view(-1)
        torch.testing.assert_close(fast.relevance.abs().flatten(1).sum(1), mass, rtol=1e-10,
                                   atol=0)


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("geometry", GEOMETRIES + [(2, 9, (4, 3), (2, 1))],
                         ids=lambda g: f"{g[0]}x{g[1]}s{g[3]}")
def test_the_forward_is_torchvisions(v2, geometry):
    model, x = _block(v2, geometry, batch=2)
    (step,) = [s for s in capture(model).steps if isinstance(s, WindowAttention)]
    h = model.embed(x)
    with torch.no_grad():
        torch.testing.assert_close(window_attention_forward(step, h), model.attn(h),
                                   rtol=1e-12, atol=1e-12)


class Attend(nn.Module):
    """Window attention straight on the (N, H, W, 4) input, then a head."""

    def __init__(self):
        super().__init__()
        self.attn = swin.ShiftedWindowAttention(4, [3, 3], [1, 1], num_heads=2)
        self.head = nn.Linear(4, 3)
        with torch.no_grad():
            for p in self.attn.parameters():
                p.normal_(0, 0.7)
            self.attn.qkv.weight[:8, :2] = 0  # queries and keys read features 2, 3 only
            self.attn.qkv.weight[8:, 2:] = 0  # values read features 0, 1 only

    def forward(self, x):
        return self.head(self.attn(x).mean((1, 2)))


def test_query_and_key_get_nothing():
    """Features 2 and 3 reach the logits only through the queries and keys (P): they get no
    relevance, features 0 and 1 (the values) get it all."""
    torch.manual_seed(2)
    model = Attend().double().eval()
    x = torch.randn(2, 6, 6, 4, dtype=torch.float64)
    moved = x.clone()
    moved[..., 2:] += 1
    assert (model(x) - model(moved)).abs().max() > 1e-3  # they do change the logits
    for rule in ("rlrp", "epsilon"):
        e = rlrp_fast.Explainer(model, rule=rule, backend="torch").explain(x)
        assert (e.relevance[..., 2:] == 0).all()
        assert (e.relevance[..., :2] != 0).all()


def test_safe_rerun_keeps_the_window_attention_input():
    """A float32 input of 1e-30 (no embedding bias) leaves relevance below float32's safe
    range, so the pass reruns with each step's inputs scaled to a maximum of 1; the window
    attention's input is its query and key too, so it must keep its scale (P would change)."""
    torch.manual_seed(2)
    model = Block(False, (3, 3), (1, 1), bias=False).eval()
    x = torch.randn(2, 6, 6, 3) * 1e-30
    fast = rlrp_fast.Explainer(model, backend="torch").explain(x)
    ref, _ = reference_explain(capture(model), x.double())
    torch.testing.assert_close(fast.relevance.double(), ref, rtol=1e-4, atol=0)


def _tiny_swin(v2: bool) -> nn.Module:
    torch.manual_seed(5)
    extra = dict(block=swin.SwinTransformerBlockV2, downsample_layer=swin.PatchMergingV2) \
        if v2 else {}
    model = swin.SwinTransformer(patch_size=[2, 2], embed_dim=4, depths=[2, 1], num_heads=[2, 2],
                                 window_size=[3, 3], num_classes=3, **extra)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name or "relative_position" in name:
                p.normal_(0, 0.3)
    return model.double().eval()


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("norm", ["layer", "neuron"])
def test_a_tiny_swin_matches_the_reference(v2, norm):
    """Patch embedding (conv, permute, LayerNorm), shifted windows with padding, patch
    merging (zero padding to even sizes, strided slices, cat), the head's permute and pool."""
    model = _tiny_swin(v2)
    x = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    plan = capture(model)
    assert any(isinstance(s, Pad) for s in plan.steps)  # patch merging, traced through
    fast = rlrp_fast.Explainer(model, norm=norm, backend="torch").explain(x)
    ref, logits = reference_explain(plan, x, norm=norm)
    torch.testing.assert_close(fast.logits, logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast.relevance, ref, rtol=1e-10, atol=1e-13)
    mass = logits.gather(1, fast.targets[:, None]).abs().view(-1)
    torch.testing.assert_close(fast.relevance.abs().flatten(1).sum(1), mass, rtol=1e-10, atol=0)


def test_capture_leaves_torch_fx_as_it_was():
    """Patch merging is traced through by lifting torchvision's fx.wrap for the trace only:
    afterwards fx records it as one call again."""
    import torch.fx as fx
    capture(_tiny_swin(False))
    graph = fx.symbolic_trace(swin.PatchMerging(4)).graph
    assert any(n.op == "call_function" and n.target is swin._patch_merging_pad
               for n in graph.nodes)


def _tiny_maxvit() -> nn.Module:
    from torchvision.models.maxvit import MaxVit
    torch.manual_seed(0)
    model = MaxVit(input_size=(16, 16), stem_channels=4, partition_size=2, block_channels=[8],
                   block_layers=[1], head_dim=4, stochastic_depth_prob=0.0, num_classes=3)
    with torch.no_grad():  # torchvision's initialisation makes every logit ~1e-5
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.normal_(m.weight, std=0.5)
                if m.bias is not None:
                    nn.init.normal_(m.bias, std=0.2)
            elif isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
            elif hasattr(m, "relative_position_bias_table"):
                m.relative_position_bias_table.normal_(0, 0.5)
    return model.double().eval()


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("rule,options", CASES[:3], ids=[f"{r}{o}" for r, o in CASES[:3]])
def test_a_tiny_maxvit_matches_the_reference(rule, options):
    """MBConv with squeeze-excitation, window and grid partitions (reshape, permute,
    swapaxes), relative-position attention on windows already laid out."""
    model = _tiny_maxvit()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    plan = capture(model)
    assert sum(isinstance(s, WindowAttention) and s.window_size is None
               for s in plan.steps) == 2  # the window and the grid partition
    fast = rlrp_fast.Explainer(model, rule=rule, backend="torch", **options).explain(x)
    ref, logits = reference_explain(plan, x, rule=rule, **options)
    torch.testing.assert_close(fast.logits, logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast.relevance, ref, rtol=1e-10, atol=1e-13)
    if rule == "rlrp":
        mass = logits.gather(1, fast.targets[:, None]).abs().view(-1)
        torch.testing.assert_close(fast.relevance.abs().flatten(1).sum(1), mass, rtol=1e-10,
                                   atol=0)
    whole = rlrp_fast.Explainer(model, rule=rule, backend="torch", **options)
    torch.testing.assert_close(whole.explain(x[1:]).relevance, fast.relevance[1:],
                               rtol=1e-10, atol=1e-15)


def _torchvision(name: str) -> nn.Module:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None).eval()


SMALL = ["swin_t", "swin_v2_t"]
LARGE = ["swin_s", "swin_b", "swin_v2_s", "swin_v2_b", "maxvit_t"]
SLOW = pytest.mark.skipif(not os.environ.get("RLRP_SLOW_TESTS"),
                          reason="Swin-S/B, MaxViT-T: 30-200 s each in float64; set "
                          "RLRP_SLOW_TESTS=1")


def _batch_independent(name: str) -> None:
    model = _torchvision(name).double()
    size = 224 if name == "maxvit_t" else 64  # MaxViT's partitions are fixed at 224
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    explainer = rlrp_fast.Explainer(model)  # trace verification on the first call
    both, one = explainer.explain(x), explainer.explain(x[1:])
    assert torch.isfinite(both.relevance).all()
    mass = both.logits.gather(1, both.targets[:, None]).abs().view(-1)
    torch.testing.assert_close(both.relevance.abs().flatten(1).sum(1), mass, rtol=1e-10, atol=0)
    torch.testing.assert_close(one.relevance, both.relevance[1:], rtol=1e-10, atol=1e-15)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", SMALL)
def test_torchvision_swin_is_batch_independent_in_float64(name):
    _batch_independent(name)


@SLOW
@pytest.mark.parametrize("name", LARGE)
def test_torchvision_large_window_models_are_batch_independent_in_float64(name):
    _batch_independent(name)
