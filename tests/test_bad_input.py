"""Bad input gets a clear error that names the problem, before any work is done."""
import pytest
import torch
import torch.nn as nn

import rlrp_fast
from rlrp_fast import UnsupportedModelError


def small_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 5)).eval()


X = torch.randn(2, 3, 8, 8)


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
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2)).eval()
    with pytest.raises(UnsupportedModelError) as info:
        rlrp_fast.Explainer(model)
    msg = str(info.value)
    assert "module '1' (LayerNorm)" in msg and "LayerNorm" in msg and "Supported:" in msg and "Conv1d/2d/3d" in msg


def test_unsupported_function():
    class Softmaxed(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return torch.softmax(self.fc(x), dim=1)

    with pytest.raises(UnsupportedModelError, match="softmax"):
        rlrp_fast.Explainer(Softmaxed().eval())


def test_constant_add_refused():
    class Shift(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x) + 1.0

    with pytest.raises(UnsupportedModelError, match="adding a constant"):
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
    with pytest.raises(ValueError, match="either target or output_relevance"):
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
    with pytest.raises(ValueError, match="epsilon must be a non-negative number"):
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
