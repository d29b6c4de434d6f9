"""Bad input gets a clear error that names the problem, before any work is done."""
import pytest
import torch
import torch.nn as nn

import rlrp_fast
from rlrp_fast import UnsupportedModelError


def small_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 5)).eval()


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))  # not collection-order dependent


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        if x.sum() > 0:  # fx cannot trace control flow on values
            return self.fc(x)
        return -self.fc(x)


def test_untraceable_model():
    with pytest.raises(UnsupportedModelError, match="torch.fx could not trace DataDependent"):
        rlrp_fast.Explainer(DataDependent().eval())


def test_unsupported_layer_names_node_op_and_list():
    model = nn.Sequential(nn.Linear(4, 4), nn.Softplus(), nn.Linear(4, 2)).eval()
    with pytest.raises(UnsupportedModelError) as info:
        rlrp_fast.Explainer(model)
    msg = str(info.value)
    assert "module '1' (Softplus)" in msg and "Supported:" in msg and "Conv1d/2d/3d" in msg


def test_unsupported_function():
    class Softmaxed(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return torch.softmax(self.fc(x), dim=1)

    with pytest.raises(UnsupportedModelError, match="softmax"):
        rlrp_fast.Explainer(Softmaxed().eval())


def test_a_shape_value_added_is_refused():
    class Shift(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x) + x.shape[1]

    with pytest.raises(UnsupportedModelError, match="a sum with a shape value"):
        rlrp_fast.Explainer(Shift().eval())


def test_two_inputs_and_tuple_output_refused():
    class TwoInputs(nn.Module):
        def forward(self, x, y):
            return x + y

    class TupleOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x), x

    with pytest.raises(UnsupportedModelError, match="more than one input"):
        rlrp_fast.Explainer(TwoInputs().eval())
    with pytest.raises(UnsupportedModelError, match="one tensor of logits"):
        rlrp_fast.Explainer(TupleOut().eval())


def test_not_a_module():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        rlrp_fast.Explainer(lambda x: x)


def test_training_mode_at_construction_and_at_call():
    model = small_cnn().train()
    with pytest.raises(ValueError, match="training mode"):
        rlrp_fast.Explainer(model)
    model.eval()
    explainer = rlrp_fast.Explainer(model)
    model[0].train()
    with pytest.raises(ValueError, match=r"training mode \(0\)"):
        explainer.explain(X)


def test_weights_changed_after_construction():
    model = small_cnn()
    explainer = rlrp_fast.Explainer(model)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    with pytest.raises(ValueError, match="changed since this Explainer was built"):
        explainer.explain(X)


@pytest.mark.parametrize("x, error, match", [
    (torch.randn(3, 8, 8), ValueError, r"expects \(N, 3, \.\.\., \.\.\.\)"),
    (torch.randn(2, 1, 8, 8), ValueError, "first layer '0'"),
    (torch.randn(0, 3, 8, 8), ValueError, "non-empty batch"),
    (torch.randint(0, 5, (2, 3, 8, 8)), TypeError, "dtype torch.int64"),
    (torch.randn(2, 3, 8, 8, dtype=torch.complex64), TypeError, "complex64"),
    ([[1.0]], TypeError, "torch.Tensor"),
])
def test_bad_input_tensor(x, error, match):
    with pytest.raises(error, match=match):
        rlrp_fast.Explainer(small_cnn()).explain(x)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input(value):
    x = X.clone()
    x[1, 2, 3, 4] = value
    with pytest.raises(ValueError, match="NaN or Inf"):
        rlrp_fast.Explainer(small_cnn()).explain(x)


def test_wrong_spatial_size_names_the_step():
    with pytest.raises(ValueError, match=r"'3' \(node '_3'\) failed on input shape\(s\) \[\(2, 196\)\]"):
        rlrp_fast.Explainer(small_cnn()).explain(torch.randn(2, 3, 9, 9))


@pytest.mark.parametrize("target, error, match", [
    (5, ValueError, "target 5 is out of range for 5 classes"),
    (-1, ValueError, "target -1 is out of range"),
    (torch.tensor([0, 7]), ValueError, "target 7 is out of range"),
    (torch.tensor([0.0, 1.0]), TypeError, "integer class indices"),
    (torch.tensor([0, 1, 2]), ValueError, r"shape \(2,\)"),
    ("cat", TypeError, "target must be None, an int or a tensor"),
])
def test_bad_target(target, error, match):
    with pytest.raises(error, match=match):
        rlrp_fast.Explainer(small_cnn()).explain(X, target=target)


def test_bad_output_relevance():
    explainer = rlrp_fast.Explainer(small_cnn())
    with pytest.raises(ValueError, match=r"output_relevance has shape \(2, 4\)"):
        explainer.explain(X, output_relevance=torch.ones(2, 4))
    with pytest.raises(ValueError, match="NaN or Inf"):
        explainer.explain(X, output_relevance=torch.full((2, 5), float("nan")))
    with pytest.raises(ValueError, match="at most one of target, output_relevance"):
        explainer.explain(X, target=1, output_relevance=torch.ones(2, 5))
    with pytest.raises(TypeError, match="output_relevance must be a tensor"):
        explainer.explain(X, output_relevance=[[1.0] * 5] * 2)


def test_bad_rule_and_options():
    model = small_cnn()
    with pytest.raises(ValueError, match="unknown rule 'lrp'"):
        rlrp_fast.Explainer(model, rule="lrp")
    with pytest.raises(TypeError, match=r"rule 'rlrp' takes no option\(s\) \['epsilon'\]"):
        rlrp_fast.Explainer(model, rule="rlrp", epsilon=0.1)
    with pytest.raises(ValueError, match="skip must be 'linear' or 'ratio'"):
        rlrp_fast.Explainer(model, skip="sum")
    with pytest.raises(ValueError, match="needs the input's bounds"):
        rlrp_fast.Explainer(model, rule="EpsilonGammaBox")
    with pytest.raises(ValueError, match="epsilon must be a non-negative finite number"):
        rlrp_fast.Explainer(model, rule="epsilon", epsilon=-1)
    with pytest.raises(ValueError, match="alpha - beta == 1"):
        rlrp_fast.Explainer(model, rule="alphabeta", alpha=3, beta=1)
    with pytest.raises(TypeError, match="takes no options"):
        rlrp_fast.Explainer(model, rule="gradient_x_input", epsilon=1.0)


def test_bad_backend():
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        rlrp_fast.Explainer(small_cnn(), backend="fast")


def test_zbox_bounds_that_do_not_broadcast():
    explainer = rlrp_fast.Explainer(small_cnn(), rule="EpsilonGammaBox", low=torch.zeros(4),
                                    high=torch.ones(4))
    with pytest.raises(ValueError, match=r"low of shape \(4,\) does not broadcast"):
        explainer.explain(X)
    model = small_cnn()
    per_channel = rlrp_fast.Explainer(model, rule="EpsilonGammaBox", low=-torch.ones(3),
                                      high=torch.ones(3)).explain(X).relevance
    scalar = rlrp_fast.Explainer(model, rule="EpsilonGammaBox", low=-1.0,
                                 high=1.0).explain(X).relevance
    torch.testing.assert_close(per_channel, scalar)


# -- rule options: NaN/inf, bad bounds, low > high ------------------------------------------
NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("rule, options, name", [
    ("epsilon", {"epsilon": NAN}, "epsilon"),
    ("epsilon", {"epsilon": INF}, "epsilon"),
    ("EpsilonPlus", {"epsilon": 2 ** 2000}, "epsilon"),  # an int no float can hold
    ("gamma", {"gamma": NAN}, "gamma"),
    ("gamma", {"gamma": INF}, "gamma"),
    ("zplus", {"stabilizer": NAN}, "stabilizer"),
    ("flat", {"stabilizer": INF}, "stabilizer"),
    ("alphabeta", {"alpha": NAN, "beta": NAN}, "alpha"),  # NaN - NaN passed alpha - beta == 1
    ("alphabeta", {"alpha": INF, "beta": INF}, "alpha"),
    ("alphabeta", {"alpha": 2.0, "beta": NAN}, "beta"),
    ("epsilon", {"epsilon": torch.tensor(0.1)}, "epsilon"),
    ("epsilon", {"epsilon": True}, "epsilon"),
])
def test_non_finite_rule_option(rule, options, name):
    with pytest.raises(ValueError, match=rf"^{name} must be a non-negative finite number"):
        rlrp_fast.Explainer(small_cnn(), rule=rule, **options)


@pytest.mark.parametrize("low, high, match", [
    (NAN, 1.0, "^low must be finite"),
    (-1.0, INF, "^high must be finite"),
    (-INF, 1.0, "^low must be finite"),
    (torch.tensor([0.0, NAN, 0.0]), 1.0, "^low must be finite"),
    ("0", 1.0, "^low must be a real number"),
    (0.0, "1", "^high must be a real number"),
    (1j, 2.0, "^low must be a real number"),
    (torch.zeros(3, dtype=torch.complex64), 1.0, "^low must be a real number"),
    (True, 2.0, "^low must be a real number"),
    (torch.zeros(3, dtype=torch.bool), 1.0, "^low must be a real number"),
    ([0.0, "a", 0.0], 1.0, "^low must be a real number"),
    ([[0.0], [0.0, 1.0]], 1.0, "^low must be a real number"),
    (object(), 1.0, "^low must be a real number"),
    (torch.zeros(3, device="meta"), 1.0, "^low is a meta tensor"),
    (0.0, None, "needs the input's bounds"),
    (None, 1.0, "needs the input's bounds"),
    (torch.zeros(2), torch.ones(3), r"^low of shape \(2,\) and high of shape \(3,\) do not"),
])
@pytest.mark.parametrize("rule", ["zbox", "EpsilonGammaBox"])
def test_bad_zbox_bounds(rule, low, high, match):
    with pytest.raises(ValueError, match=match):
        rlrp_fast.Explainer(small_cnn(), rule=rule, low=low, high=high)


@pytest.mark.parametrize("low, high, match", [
    (1.0, -1.0, r"^low must not exceed high: low 1 > high -1$"),
    (torch.tensor([-1.0, 2.0, -1.0]), torch.ones(3),
     r"^low must not exceed high: low 2 > high 1 at index \(1,\)$"),
    (-1.0, torch.tensor([1.0, 1.0, -2.0]).view(3, 1, 1),
     r"^low must not exceed high: low -1 > high -2 at index \(2, 0, 0\)$"),
])
def test_low_above_high_at_construction(low, high, match):
    with pytest.raises(ValueError, match=match):
        rlrp_fast.Explainer(small_cnn(), rule="EpsilonGammaBox", low=low, high=high)


def test_low_above_high_in_mixed_shapes_at_the_first_call():
    """(C,) against (1, C, 1, 1): only the layer input says how they line up (C is
    per channel here, both ways), so the check runs where the bounds meet it."""
    low = torch.zeros(3)
    good = rlrp_fast.Explainer(small_cnn(), rule="EpsilonGammaBox", low=low,
                               high=torch.ones(1, 3, 1, 1))
    assert torch.isfinite(good.explain(X).relevance).all()
    bad = rlrp_fast.Explainer(small_cnn(), rule="EpsilonGammaBox", low=low,
                              high=torch.tensor([1.0, -1.0, 1.0]).view(1, 3, 1, 1))
    with pytest.raises(ValueError, match=r"^low must not exceed high: low 0 > high -1 at "
                                         r"index \(0, 1, 0, 0\)$"):
        bad.explain(X)


def test_a_vector_bound_on_an_image_is_per_channel_never_per_column():
    """A vector as long as the image is wide broadcasts per column in plain torch; on an
    image input it must be one bound per channel, so it is refused."""
    explainer = rlrp_fast.Explainer(small_cnn(), rule="EpsilonGammaBox", low=-torch.ones(8),
                                    high=torch.ones(8))
    with pytest.raises(ValueError, match=r"^low of shape \(8,\) does not broadcast to the input "
                                         r"\(2, 3, 8, 8\) .* one bound per channel \(3 here\)"):
        explainer.explain(X)


@pytest.mark.parametrize("shape", [(3,), (3, 1, 1), (1, 3, 1, 1)])
def test_zbox_per_channel_bounds_equal_zennit(shape):
    """EpsilonGammaBox with per-channel bounds as users write them, ``(C,)``, ``(C, 1, 1)`` or
    ``(1, C, 1, 1)``, equals zennit's ZBox given the same bounds as ``(1, C, 1, 1)``. The image
    is as wide as it has channels, so bounds laid along the width would broadcast too and
    give a different map."""
    pytest.importorskip("zennit")
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonGammaBox

    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3),
                          nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 1, 3)).double().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.bias.normal_(0, 0.3)
    x = torch.randn(2, 3, 7, 3, dtype=torch.float64)
    low = torch.tensor([-4.5, -0.5, -6.0], dtype=torch.float64)
    high = torch.tensor([0.5, 3.0, 1.0], dtype=torch.float64)
    ours = rlrp_fast.Explainer(model, rule="EpsilonGammaBox", backend="torch",
                               low=low.view(shape), high=high.view(shape)).explain(x)
    r_out = torch.zeros_like(ours.logits).scatter_(
        1, ours.targets[:, None], ours.logits.gather(1, ours.targets[:, None]))
    composite = EpsilonGammaBox(low=low.view(1, 3, 1, 1), high=high.view(1, 3, 1, 1))
    with Gradient(model=model, composite=composite) as attributor:
        _, theirs = attributor(x, r_out)
    l1 = lambda t: t.abs().sum((1, 2, 3))  # noqa: E731
    assert (l1(theirs) > 0).all()
    assert (l1(ours.relevance - theirs) / l1(theirs)).max() <= 1e-10
    # the bounds matter: the same bounds laid along the width give another map
    along_w = EpsilonGammaBox(low=low.view(1, 1, 1, 3), high=high.view(1, 1, 1, 3))
    with Gradient(model=model, composite=along_w) as attributor:
        _, wrong = attributor(x, r_out)
    assert (l1(wrong - theirs) / l1(theirs)).max() > 1e-3


# -- target and output_relevance: clear errors, never OverflowError/RuntimeError ------------
@pytest.mark.parametrize("rule", ["rlrp", "gradient_x_input"])
@pytest.mark.parametrize("target, error, match", [
    (2 ** 70, ValueError, r"^target 1180591620717411303424 is out of range for 5 classes$"),
    (-2 ** 70, ValueError, r"^target -1180591620717411303424 is out of range for 5 classes$"),
    ([0, 2 ** 70], ValueError, r"^target 1180591620717411303424 is out of range$"),
    (-3, ValueError, r"^target -3 is out of range for 5 classes$"),
    (torch.tensor([1, -2]), ValueError, r"^target -2 is out of range for 5 classes$"),
    (torch.tensor(-1), ValueError, r"^target -1 is out of range for 5 classes$"),
    (torch.tensor([0, 1], device="meta"), ValueError, r"^target is a meta tensor"),
    (torch.tensor(1, device="meta"), ValueError, r"^target is a meta tensor"),
    (True, TypeError, r"^target must be None, an int or a tensor of class indices, got bool$"),
    (1.0, TypeError, r"^target must be None, an int or a tensor of class indices, got float$"),
    (torch.tensor([True, False]), TypeError, r"^target must hold integer class indices, got dtype torch\.bool$"),
    (torch.tensor(1.0), TypeError, r"^target must hold integer class indices, got dtype torch\.float32$"),
    ([0.5, 1.0], TypeError, r"^target must hold integer class indices"),
    ([0, "a"], TypeError, r"^target must be None, an int or a tensor of class indices, got a list"),
])
def test_bad_target_is_a_clear_error(rule, target, error, match):
    with pytest.raises(error, match=match):
        rlrp_fast.Explainer(small_cnn(), rule=rule).explain(X, target=target)


def test_numpy_int_target_is_an_int():
    np = pytest.importorskip("numpy")
    explainer = rlrp_fast.Explainer(small_cnn())
    assert explainer.explain(X, target=np.int64(3)).targets.tolist() == [3, 3]
    with pytest.raises(ValueError, match=r"^target 7 is out of range for 5 classes$"):
        explainer.explain(X, target=np.int64(7))


@pytest.mark.parametrize("rule", ["rlrp", "gradient_x_input"])
@pytest.mark.parametrize("r_out, error, match", [
    (torch.ones(2, 5, device="meta"), ValueError, r"^output_relevance is a meta tensor"),
    (torch.ones(2, 5, dtype=torch.int64), TypeError,
     r"^output_relevance must be a floating-point tensor, got dtype torch\.int64$"),
    (torch.ones(2, 5, dtype=torch.bool), TypeError, r"^output_relevance must be a floating-point"),
    (torch.ones(2, 5, dtype=torch.complex64), TypeError, r"^output_relevance must be a floating-point"),
    (torch.ones(2, 5).to_sparse(), TypeError, r"^output_relevance must be a dense tensor"),
    (torch.ones(5), ValueError, r"^output_relevance has shape \(5,\); expected \(2, classes\)"),
    (torch.ones(3, 5), ValueError, r"^output_relevance has shape \(3, 5\); expected \(2, classes\)"),
    (torch.ones(2, 4), ValueError, r"^output_relevance has shape \(2, 4\), the logits have \(2, 5\)$"),
    (torch.full((2, 5), float("inf")), ValueError, r"^output_relevance contains NaN or Inf$"),
    ([[1.0] * 5] * 2, TypeError, r"^output_relevance must be a tensor of the logits' shape, got list$"),
])
def test_bad_output_relevance_is_a_clear_error(rule, r_out, error, match):
    with pytest.raises(error, match=match):
        rlrp_fast.Explainer(small_cnn(), rule=rule).explain(X, output_relevance=r_out)


def test_float16_output_relevance_is_taken():
    explainer = rlrp_fast.Explainer(small_cnn())
    r_out = torch.zeros(2, 5)
    r_out[:, 2] = 1.0
    half = explainer.explain(X, output_relevance=r_out.half())
    torch.testing.assert_close(half.relevance, explainer.explain(X, output_relevance=r_out).relevance)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
@pytest.mark.parametrize("rule", ["rlrp", "gradient_x_input"])
def test_target_and_output_relevance_on_another_device_are_moved(rule):
    """Class indices and R_out are small: on another device they are copied to the model's,
    and the result is the one they give on the model's own device."""
    model = small_cnn()
    explainer = rlrp_fast.Explainer(model, rule=rule)
    expected = explainer.explain(X, target=torch.tensor([1, 3]))
    moved = explainer.explain(X, target=torch.tensor([1, 3], device="cuda"))
    torch.testing.assert_close(moved.relevance, expected.relevance)
    assert moved.targets.device == X.device
    r_out = torch.zeros(2, 5, device="cuda")
    r_out[:, 4] = 1.0
    from_cuda = explainer.explain(X, output_relevance=r_out)
    torch.testing.assert_close(from_cuda.relevance,
                               explainer.explain(X, output_relevance=r_out.cpu()).relevance)


# -- gradient × input in every input dtype, like the other rules ----------------------------
def bn_cnn() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 5)).eval()
    with torch.no_grad():
        model[1].running_mean.normal_(0, 0.3)
        model[1].running_var.uniform_(0.5, 1.5)
    return model


def _gxi_of(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Gradient × input through the model itself in ``x``'s dtype (a cast copy)."""
    import copy
    twin = copy.deepcopy(model).to(x.dtype)
    xg = x.clone().requires_grad_(True)
    logits = twin(xg)
    r_out = torch.zeros_like(logits).scatter_(1, target[:, None], logits.gather(1, target[:, None]))
    (grad,) = torch.autograd.grad(logits, xg, r_out)
    rel = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.to(rel) * grad.to(rel), logits.detach()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_gradient_x_input_runs_in_the_inputs_dtype(dtype):
    """As the R-LRP path: the forward in x's dtype on a float32 model, relevance in float32
    (float64 for float64), logits in x's dtype; the model itself is untouched."""
    model = bn_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = X.to(dtype)
    explainer = rlrp_fast.Explainer(model, rule="gradient_x_input")
    got = explainer.explain(x)
    rel = torch.float64 if dtype == torch.float64 else torch.float32
    assert got.relevance.dtype == rel and got.logits.dtype == dtype
    assert got.relevance.dtype == rlrp_fast.Explainer(model).explain(x).relevance.dtype
    assert torch.isfinite(got.relevance).all() and got.relevance.abs().sum() > 0
    # the very computation of the model cast to x's dtype: not x upcast to float32
    expected, logits = _gxi_of(model, x, got.targets)
    torch.testing.assert_close(got.logits, logits, rtol=0, atol=0)
    torch.testing.assert_close(got.relevance, expected, rtol=1e-6, atol=1e-9)
    upcast, _ = _gxi_of(model, x.float(), got.targets)
    assert (got.relevance.double() - upcast.double()).abs().max() > 1e-9
    for k, v in model.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k])
    # close to float32 within the dtype's rounding
    tol = {torch.float16: 5e-2, torch.bfloat16: 1e-1, torch.float64: 1e-5}[dtype]
    reference, _ = _gxi_of(model, X.double(), got.targets)
    err = (got.relevance.double() - reference).abs().sum() / reference.abs().sum()
    assert err < tol


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_gradient_x_input_under_inference_mode_and_with_output_relevance(dtype):
    model = bn_cnn()
    explainer = rlrp_fast.Explainer(model, rule="gradient_x_input")
    r_out = torch.zeros(2, 5, dtype=torch.float64)
    r_out[:, 1] = 1.0
    with torch.inference_mode():
        got = explainer.explain(X.to(dtype), output_relevance=r_out)
    assert torch.isfinite(got.relevance).all() and got.relevance.abs().sum() > 0


def test_gradient_x_input_float32_input_on_a_float16_model():
    model = bn_cnn().half()
    got = rlrp_fast.Explainer(model, rule="gradient_x_input").explain(X)
    assert got.logits.dtype == torch.float32 and got.relevance.dtype == torch.float32
    expected, _ = _gxi_of(model, X, got.targets)
    torch.testing.assert_close(got.relevance, expected, rtol=1e-6, atol=1e-9)
    assert next(model.parameters()).dtype == torch.float16


def test_gradient_x_input_model_that_cannot_run_in_the_dtype_says_what_to_do():
    class FixedProjection(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)
            self.proj = torch.randn(3, 2)  # a plain attribute: not cast with the parameters

        def forward(self, x):
            return self.fc(x) @ self.proj

    explainer = rlrp_fast.Explainer(FixedProjection().eval(), rule="gradient_x_input")
    assert explainer.explain(torch.randn(2, 4)).relevance.dtype == torch.float32
    with pytest.raises(TypeError, match=r"^the model could not run in torch\.float16 .*; pass x "
                                        r"as torch\.float32$"):
        explainer.explain(torch.randn(2, 4, dtype=torch.float16))
