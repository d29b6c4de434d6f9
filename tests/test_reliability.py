"""Never silently wrong: in-place ops, trace verification, stale models, extreme magnitudes,
forks, and a seeded fuzz suite over random architectures with all of them."""
import copy
import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import rlrp_fast
from rlrp_fast import StaleModelError, TraceMismatchError, UnsupportedModelError
from test_fast_vs_reference import random_model


def l1(t: torch.Tensor) -> torch.Tensor:
    return t.double().abs().flatten(1).sum(1)


def target_mass(e) -> torch.Tensor:
    return e.logits.double().gather(1, e.targets[:, None]).abs().view(-1)


# -- in-place ops ---------------------------------------------------------------------------
class SideEffect(nn.Module):
    """Every in-place form the issue lists, each changing what later ops read."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        h = self.fc1(x)
        if self.form == "method":
            h.relu_()
        elif self.form == "functional":
            F.relu(h, inplace=True)
        elif self.form == "torch":
            torch.relu_(h)
        elif self.form == "module":
            self.act(h)  # called for its side effect, result not re-assigned
        h2 = self.fc2(h)
        if self.form == "add_":
            h2.add_(h)
        elif self.form == "iadd":
            h2 += h
        else:
            h2 = h2 + h
        return self.fc3(h2)


@pytest.mark.parametrize("form", ["method", "functional", "torch", "module", "add_", "iadd"])
def test_inplace_ops_get_their_real_semantics(form):
    model = SideEffect(form).eval()
    x = torch.randn(5, 4)
    e = rlrp_fast.Explainer(model, verify=False).explain(x)
    with torch.no_grad():
        torch.testing.assert_close(e.logits, model(x), rtol=0, atol=1e-6)
    torch.testing.assert_close(l1(e.relevance), target_mass(e), rtol=1e-5, atol=0)


def test_inplace_results_differ_from_the_out_of_place_misreading():
    """The cases above are not vacuous: the in-place op changes the logits."""
    x = torch.randn(5, 4)
    with torch.no_grad():
        model = SideEffect("module").eval()
        plain = SideEffect("none").eval()
        plain.load_state_dict(model.state_dict())
        assert (model(x) - plain(x)).abs().max() > 1e-3


class ViewThenMutate(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x):
        h = self.fc1(x)
        v = h.view(h.size(0), 2, 3)
        h.relu_()
        return self.fc2(v.flatten(1))


class MutateInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x.relu_()
        return self.fc(x)


@pytest.mark.parametrize("cls,match", [(ViewThenMutate, "view"), (MutateInput, "input")])
def test_inplace_ops_the_plan_cannot_follow_are_refused_by_name(cls, match):
    with pytest.raises(UnsupportedModelError, match=rf"relu_.*{match}"):
        rlrp_fast.Explainer(cls().eval())


def test_inplace_relu_reassigned_keeps_working():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 3)).eval()
    x = torch.randn(2, 3, 8, 8)
    e = rlrp_fast.explain(model, x)
    with torch.no_grad():
        torch.testing.assert_close(e.logits, model(x))


# -- trace verification ---------------------------------------------------------------------
class Switch(nn.Module):
    """Python control flow on an attribute: fx bakes in the branch taken at capture."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 3)
        self.flip = False

    def forward(self, x):
        h = self.fc1(x)
        if self.flip:
            h = -h
        return self.fc2(torch.relu(h))


def test_trace_mismatch_is_an_error_naming_the_first_differing_step():
    model = Switch().eval()
    explainer = rlrp_fast.Explainer(model)
    model.flip = True  # not a parameter: only verification can see it
    with pytest.raises(TraceMismatchError, match=r"first step that differs is 'relu'"):
        explainer.explain(torch.randn(3, 4))


def test_verify_false_skips_the_check():
    model = Switch().eval()
    explainer = rlrp_fast.Explainer(model, verify=False)
    model.flip = True
    explainer.explain(torch.randn(3, 4))  # the user opted out


def test_verification_runs_once_per_shape_dtype_device():
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    explainer = rlrp_fast.Explainer(model)
    for shape in [(2, 4), (2, 4), (3, 4), (2, 4), (3, 4)]:
        explainer.explain(torch.randn(shape))
    explainer.explain(torch.randn(2, 4, dtype=torch.float64))
    assert len(calls) == 3


# -- stale models ---------------------------------------------------------------------------
def _bn_net() -> nn.Module:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    model[1].running_mean.normal_()
    model[1].running_var.uniform_(0.5, 2)
    return model


def _replace_layer(m):
    m[4] = nn.Linear(4 * 6 * 6, 5)


def _relu_to_tanh(m):
    m[2] = nn.Tanh()


def _new_parameter(m):
    m[6].weight = nn.Parameter(torch.randn(3, 5))


def _bias_none(m):
    m[6].bias = None


def _load_assign(m):
    m.load_state_dict({k: v.clone() for k, v in m.state_dict().items()}, assign=True)


def _half(m):
    m.half()


def _bf16_roundtrip(m):
    m.bfloat16().float()


def _data_assign(m):
    m[6].weight.data = torch.randn(3, 5)


def _bn_data_inplace(m):
    m[1].running_var.data.mul_(4)


def _weight_inplace(m):
    with torch.no_grad():
        m[0].weight.mul_(2)


def _bias_data_inplace(m):
    m[4].bias.data.add_(1)


def _new_buffer(m):
    m[6].register_buffer("extra", torch.zeros(1))


STALE = [_replace_layer, _relu_to_tanh, _new_parameter, _bias_none, _load_assign, _half,
         _bf16_roundtrip, _data_assign, _bn_data_inplace, _weight_inplace, _bias_data_inplace,
         _new_buffer]


@pytest.mark.parametrize("change", STALE, ids=[f.__name__.strip("_") for f in STALE])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_every_kind_of_model_change_is_refused(change, x_dtype):
    model = _bn_net()
    explainer = rlrp_fast.Explainer(model)
    x = torch.randn(2, 3, 8, 8, dtype=x_dtype)
    explainer.explain(x)  # caches the bfloat16 weight copies
    change(model)
    with pytest.raises(StaleModelError, match="build a new Explainer"):
        explainer.explain(x)


def test_unchanged_model_is_not_refused():
    model = _bn_net()
    explainer = rlrp_fast.Explainer(model)
    x = torch.randn(2, 3, 8, 8)
    for _ in range(3):
        explainer.explain(x)
    with torch.no_grad():
        model(x)  # running the model in eval changes nothing


# -- magnitudes -----------------------------------------------------------------------------
def _check_conserves(explainer, x):
    e = explainer.explain(x)
    assert torch.isfinite(e.logits).all()
    assert torch.isfinite(e.relevance).all()
    torch.testing.assert_close(l1(e.relevance), target_mass(e), rtol=1e-4, atol=0)
    return e


@pytest.mark.parametrize("value", [1e-44, 1e-38, 1e-20, 1.0, 1e15, 1e30])
def test_linear_chain_at_extreme_inputs(value):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    with torch.no_grad():
        model[0].bias.fill_(0.1)  # alive at tiny inputs (all-dead layers vanish, rightly)
    x = torch.full((2, 4), value)
    x[1] *= -0.5
    _check_conserves(rlrp_fast.Explainer(model), x)


def _small_cnn():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 6, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(6 * 2 * 2, 10)).eval()


@pytest.mark.parametrize("value", [3e11, 1e15, 1e18])
def test_small_cnn_at_large_inputs(value):
    x = torch.rand(3, 1, 8, 8) * value
    _check_conserves(rlrp_fast.Explainer(_small_cnn()), x)


def test_conv_with_huge_weights():
    model = _small_cnn()
    with torch.no_grad():
        model[0].weight.mul_(1e20)
    _check_conserves(rlrp_fast.Explainer(model), torch.rand(2, 1, 8, 8))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_extremes(dtype):
    model = _small_cnn().to(dtype)
    info = torch.finfo(dtype)
    for value in (info.tiny * 4, 1.0, info.max ** 0.5 / 100):
        x = (torch.rand(2, 1, 8, 8) * value).to(dtype)
        _check_conserves(rlrp_fast.Explainer(model), x)


def test_non_finite_logits_are_an_error():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    with torch.no_grad():
        model[2].weight.fill_(1e30)
    with pytest.raises(ValueError, match="logits are not finite"):
        rlrp_fast.Explainer(model).explain(torch.full((1, 4), 1e20))


def test_returned_tensors_are_ordinary():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    e = rlrp_fast.explain(model, torch.randn(2, 4))
    e.relevance /= e.relevance.abs().amax()
    e.logits.add_(1)
    assert not e.relevance.is_inference()


# -- forks keep the L1 mass -----------------------------------------------------------------
class Fork(nn.Module):
    """One tensor read by two branches whose relevance arrives with opposite signs."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(4, 6)
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)
        self.head = nn.Linear(12, 2)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        return self.head(torch.cat([self.a(h), self.b(h)], 1))


def test_fork_keeps_the_arriving_mass():
    torch.manual_seed(5)
    model = Fork().eval()
    with torch.no_grad():
        model.b.weight.copy_(-model.a.weight)  # the two branches' relevance nearly cancels
        model.b.bias.copy_(model.a.bias)
    e = rlrp_fast.explain(model, torch.randn(4, 4))
    torch.testing.assert_close(l1(e.relevance), target_mass(e), rtol=1e-5, atol=0)


# -- fuzz: random architectures, in-place variants, magnitudes, dtypes ----------------------
def _inplace_variant(model: nn.Module) -> nn.Module:
    """The same function with every ReLU in place (as ``x = relu(x)`` in Sequential)."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = True
    return model


FUZZ = list(itertools.product(range(0, 24, 3), [1e-40, 1e-6, 1.0, 1e12, 1e30],
                              [torch.float32, torch.float16, torch.bfloat16]))


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("norm", ["layer", "neuron"])
@pytest.mark.parametrize("seed,magnitude,dtype", FUZZ,
                         ids=[f"{s}-{m:g}-{str(d)[6:]}" for s, m, d in FUZZ])
def test_fuzz(seed, magnitude, dtype, norm):
    base, shape = random_model(seed)
    model = _inplace_variant(base) if seed % 2 else base
    model = model.to(dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = (torch.randn(3, *shape, generator=torch.Generator().manual_seed(seed)) * magnitude)
    x = x.to(dtype)
    if not torch.isfinite(x).all() or (x == 0).all():
        pytest.skip(f"{magnitude:g} is outside {dtype}'s range")
    explainer = rlrp_fast.Explainer(model, norm=norm)  # verify: plan logits == model logits
    try:
        e = explainer.explain(x)
    except ValueError as exc:
        assert "logits are not finite" in str(exc)
        with torch.no_grad():
            assert not torch.isfinite(model(x)).all()
    else:
        assert torch.isfinite(e.relevance).all()
        alive = ~e.vanished
        torch.testing.assert_close(l1(e.relevance)[alive], target_mass(e)[alive], rtol=1e-3,
                                   atol=0)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


class Asserting(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        torch._assert(x.shape[1] == 3, "expected 3 tokens")
        return self.fc(x).mean(1)


def test_the_models_own_shape_checks_run_in_the_plan():
    explainer = rlrp_fast.Explainer(Asserting().eval())
    explainer.explain(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="expected 3 tokens"):
        explainer.explain(torch.randn(2, 5, 4))
