"""rlrp_fast.metrics (and the evaluation driver) against slow, obvious implementations."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy import ndimage, stats

import rlrp_fast
from rlrp_fast import metrics as M
from rlrp_fast import evaluate as E


def _tiny_model(seed=0, bias=True):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=bias), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Flatten(), nn.Linear(4 * 4 * 4, 16, bias=bias), nn.ReLU(),
                      nn.Linear(16, 5, bias=bias))
    return m.eval()


class _Counting(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


# -- slow references ------------------------------------------------------------------------
def _slow_patch_scores(rel, p):
    n, c, h, w = rel.shape
    per_row = math.ceil(w / p)
    out = np.zeros((n, math.ceil(h / p) * per_row))
    for s in range(n):
        for i in range(h):
            for j in range(w):
                out[s, (i // p) * per_row + j // p] += float(rel[s, :, i, j].sum())
    return out


def _slow_curve(model, x, rel, target, p, steps, base, morf=True, insertion=False,
                score="prob"):
    n, c, h, w = x.shape
    scores = _slow_patch_scores(rel, p)
    num = scores.shape[1]
    per_row = math.ceil(w / p)
    out = np.zeros((n, steps + 1))
    for s in range(n):
        order = np.argsort(-scores[s] if morf else scores[s], kind="stable")
        for k in range(steps + 1):
            chosen = set(order[:round(k * num / steps)].tolist())
            img = (base[s] if insertion else x[s]).clone()
            for i in range(h):
                for j in range(w):
                    if (i // p) * per_row + j // p in chosen:
                        img[:, i, j] = x[s, :, i, j] if insertion else base[s, :, i, j]
            with torch.no_grad():
                logits = model(img[None])[0].double()
            v = logits.softmax(0)[target[s]] if score == "prob" else logits[target[s]]
            out[s, k] = float(v)
    return out


# -- perturbation ---------------------------------------------------------------------------
@pytest.mark.parametrize("patch", [2, 3])
@pytest.mark.parametrize("baseline", ["zeros", "mean", 0.3])
def test_region_perturbation_matches_slow(patch, baseline):
    model = _tiny_model()
    x = torch.rand(3, 1, 8, 8)
    rel = torch.randn(3, 1, 8, 8)  # continuous: no ties in patch relevance
    target = torch.tensor([0, 3, 4])
    steps = 4
    res = M.region_perturbation(model, x, rel, target, patch_size=patch, steps=steps,
                                baseline=baseline)
    base = M.make_baseline(x, baseline)
    for morf, curve in ((True, res.morf), (False, res.lerf)):
        slow = _slow_curve(model, x, rel, target, patch, steps, base, morf=morf)
        np.testing.assert_allclose(curve.numpy(), slow, rtol=1e-5, atol=1e-6)
    slow_m = _slow_curve(model, x, rel, target, patch, steps, base, morf=True)
    slow_l = _slow_curve(model, x, rel, target, patch, steps, base, morf=False)
    np.testing.assert_allclose(res.abpc.numpy(), np.trapezoid(slow_l, dx=1 / steps, axis=1)
                               - np.trapezoid(slow_m, dx=1 / steps, axis=1), atol=1e-6)
    assert res.fractions[0] == 0 and res.fractions[-1] == 1


def test_insertion_deletion_matches_slow():
    model = _tiny_model(1)
    x = torch.rand(2, 1, 8, 8)
    rel = torch.randn(2, 1, 8, 8)
    target = torch.tensor([1, 2])
    res = M.insertion_deletion(model, x, rel, target, patch_size=2, steps=8,
                               insertion_baseline="blur", deletion_baseline="zeros",
                               score="logit")
    ins = _slow_curve(model, x, rel, target, 2, 8, M.make_baseline(x, "blur"), True, True,
                      "logit")
    dele = _slow_curve(model, x, rel, target, 2, 8, torch.zeros_like(x), True, False, "logit")
    np.testing.assert_allclose(res.insertion.numpy(), ins, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(res.deletion.numpy(), dele, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(res.auc_insertion.numpy(), np.trapezoid(ins, dx=1 / 8, axis=1),
                               rtol=1e-6)
    # insertion ends at the clean score, deletion starts there
    np.testing.assert_allclose(res.insertion[:, -1], res.deletion[:, 0])


def test_one_model_call_per_step_for_the_whole_batch():
    model = _Counting(_tiny_model())
    x, rel = torch.rand(7, 1, 8, 8), torch.randn(7, 1, 8, 8)
    M.region_perturbation(model, x, rel, torch.zeros(7, dtype=torch.long), patch_size=2,
                          steps=5)
    assert model.calls == 2 * 6
    model.calls = 0
    M.region_perturbation(model, x, rel, torch.zeros(7, dtype=torch.long), patch_size=2,
                          steps=5, batch_size=4)  # chunked: two calls per step
    assert model.calls == 2 * 6 * 2


def test_curves_are_batch_independent():
    model = _tiny_model()
    x, rel = torch.rand(5, 1, 8, 8), torch.randn(5, 1, 8, 8)
    t = torch.arange(5) % 5
    full = M.region_perturbation(model, x, rel, t, patch_size=2, steps=4, baseline="blur")
    one = M.region_perturbation(model, x[2:3], rel[2:3], t[2:3], patch_size=2, steps=4,
                                baseline="blur")
    torch.testing.assert_close(full.morf[2:3], one.morf)


def test_patch_order_breaks_ties_randomly_but_reproducibly():
    rel = torch.zeros(2, 1, 8, 8)
    o1 = M.patch_order(rel, 2, seed=0)
    assert not torch.equal(o1[0], torch.arange(16))  # not top-left first
    assert torch.equal(o1, M.patch_order(rel, 2, seed=0))
    assert not torch.equal(o1, M.patch_order(rel, 2, seed=1))
    assert torch.equal(o1.sort(1).values, torch.arange(16).expand(2, 16))
    rel[0, 0, 0, 0] = 5.0  # a clear winner comes first (MoRF) and last (LeRF)
    assert M.patch_order(rel, 2)[0, 0] == 0
    assert M.patch_order(rel, 2, most_relevant_first=False)[0, -1] == 0


def test_patch_relevance_and_blur_against_slow():
    rel = torch.randn(2, 3, 7, 5)
    np.testing.assert_allclose(M.patch_relevance(rel, 3).numpy(), _slow_patch_scores(rel, 3),
                               atol=1e-5)
    x = torch.rand(2, 2, 12, 12, dtype=torch.float64)
    blur = M.make_baseline(x, "blur", blur_sigma=1.0)
    for s in range(2):
        for c in range(2):
            ref = ndimage.gaussian_filter(x[s, c].numpy(), 1.0, mode="nearest", truncate=3.0)
            np.testing.assert_allclose(blur[s, c].numpy(), ref, atol=1e-12)
    mean = M.make_baseline(x, "mean")
    np.testing.assert_allclose(mean[1, 1, 3, 4].item(), x[:, 1].mean().item())
    with pytest.raises(ValueError, match="baseline"):
        M.make_baseline(x, "median")


def test_auc_is_the_trapezoid():
    c = torch.rand(4, 9, dtype=torch.float64)
    np.testing.assert_allclose(M.auc(c).numpy(), np.trapezoid(c.numpy(), dx=1 / 8, axis=1))
    assert M.auc(torch.ones(1, 3)).item() == pytest.approx(1.0)


def test_faithful_map_beats_random_and_inverted_on_a_known_model():
    # logit 0 = sum of the top-left quadrant: relevance = x there is the perfect map
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2, bias=False)).eval()
    with torch.no_grad():
        w = torch.zeros(2, 1, 8, 8)
        w[0, 0, :4, :4] = 1.0
        model[1].weight.copy_(w.view(2, 64))
    x = torch.rand(6, 1, 8, 8)
    good = x * w[0]
    t = torch.zeros(6, dtype=torch.long)
    r_good = M.region_perturbation(model, x, good, t, 2, 8, score="logit")
    r_bad = M.region_perturbation(model, x, -good, t, 2, 8, score="logit")
    assert (r_good.abpc > 0).all() and (r_bad.abpc < 0).all()
    assert torch.allclose(r_good.morf[:, 4:], torch.zeros(6, 5, dtype=torch.float64))


# -- statistics -----------------------------------------------------------------------------
def test_spearman_matches_scipy_with_ties():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 4, (5, 1, 6, 6), generator=g).float()  # many ties
    b = a + torch.randint(0, 3, (5, 1, 6, 6), generator=g).float()
    b[1] = torch.randn(1, 6, 6, generator=g)
    got = M.spearman(a, b)
    for s in range(5):
        ref = stats.spearmanr(a[s].flatten().numpy(), b[s].flatten().numpy()).statistic
        assert got[s].item() == pytest.approx(ref, abs=1e-12)
    assert M.spearman(a, a).sub(1).abs().max() < 1e-12
    assert math.isnan(M.spearman(torch.ones(1, 4), torch.rand(1, 4)).item())


def test_gini_matches_slow_definition():
    r = torch.randn(4, 1, 5, 5)
    r[2] = 0
    r[3] = 0
    r[3, 0, 1, 1] = -3.0
    got = M.gini(r)
    for s in range(4):
        c = np.sort(np.abs(r[s].flatten().numpy().astype(np.float64)))
        n = len(c)
        ref = 0.0 if c.sum() == 0 else 1 - 2 * sum(c[k] / c.sum() * (n - (k + 1) + 0.5) / n
                                                   for k in range(n))
        assert got[s].item() == pytest.approx(ref, abs=1e-12)
    assert got[3].item() == pytest.approx(1 - 1 / 25)
    assert M.gini(torch.ones(1, 10)).item() == pytest.approx(0.0, abs=1e-12)


def test_concentration_nonfinite_and_shift():
    r = torch.tensor([[1.0, -3.0, 0.0, 4.0], [1.0, float("nan"), float("inf"), 0.0]])
    assert M.concentration(r)[0].item() == pytest.approx(0.5)
    assert M.nonfinite_count(r).tolist() == [0, 2]
    a = torch.tensor([[1.0, 1.0, 2.0]])
    assert M.map_shift(a, 10 * a).item() == pytest.approx(0.0)  # positive rescaling
    assert M.map_shift(a, -a).item() == pytest.approx(2.0)
    assert M.map_shift(a, 2 * a, normalize=False).item() == pytest.approx(1.0)


# -- randomisation --------------------------------------------------------------------------
def test_randomize_top_layers_changes_only_the_top_and_not_the_model():
    model = _tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rnd = M.randomize_top_layers(model, 2, seed=3)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    sd = rnd.state_dict()
    assert torch.equal(sd["0.weight"], before["0.weight"])
    assert not torch.equal(sd["4.weight"], before["4.weight"])
    assert not torch.equal(sd["6.weight"], before["6.weight"])
    assert not torch.equal(sd["6.bias"], before["6.bias"])
    assert torch.equal(sd["6.weight"], M.randomize_top_layers(model, 2, seed=3)
                       .state_dict()["6.weight"])
    with pytest.raises(ValueError, match="n_layers"):
        M.randomize_top_layers(model, 4)


def test_randomization_check_separates_model_blind_maps():
    model = _tiny_model()
    x = torch.rand(6, 1, 8, 8)
    blind = M.randomization_check(lambda m: E.RandomMap(m), model, x, n_layers=3)
    assert torch.allclose(blind, torch.ones(6, dtype=torch.float64))
    rho = M.randomization_check(lambda m: rlrp_fast.Explainer(m, rule="rlrp"), model, x,
                                n_layers=3)
    assert rho.mean() < 0.9
    # the slow way: explain both models, scipy's Spearman
    e1 = rlrp_fast.Explainer(model).explain(x)
    e2 = rlrp_fast.Explainer(M.randomize_top_layers(model, 3)).explain(x, target=e1.targets)
    ref = [stats.spearmanr(e1.relevance[s].flatten(), e2.relevance[s].flatten()).statistic
           for s in range(6)]
    np.testing.assert_allclose(rho.numpy(), ref, atol=1e-10)


# -- per-layer diagnostics ------------------------------------------------------------------
def test_layer_diagnostics_rlrp_conserves_l1_and_matches_the_map():
    model = _tiny_model()
    x = torch.rand(3, 1, 8, 8)
    ex = rlrp_fast.Explainer(model, rule="rlrp")
    diags = M.layer_diagnostics(ex, x)
    assert [d.kind for d in diags] == ["Affine"] * 3
    for d in diags:
        torch.testing.assert_close(d.l1_ratio, torch.ones(3, dtype=torch.float64))
    e = ex.explain(x)
    torch.testing.assert_close(diags[-1].sum_in, e.relevance.double().flatten(1).sum(1))
    torch.testing.assert_close(diags[0].sum_out, e.logits.gather(1, e.targets[:, None])
                               .squeeze(1).double())


def test_layer_diagnostics_lrp0_conserves_sum_without_bias():
    model = _tiny_model(bias=False)
    x = torch.rand(3, 1, 8, 8)
    diags = M.layer_diagnostics(rlrp_fast.Explainer(model, rule="lrp0"), x)
    for d in diags:
        torch.testing.assert_close(d.conservation, torch.ones(3, dtype=torch.float64),
                                   rtol=1e-4, atol=1e-4)
    biased = M.layer_diagnostics(rlrp_fast.Explainer(_tiny_model(), rule="lrp0"), x)
    assert any((d.conservation - 1).abs().max() > 1e-3 for d in biased)
    with pytest.raises(ValueError, match="gradient_x_input"):
        M.layer_diagnostics(rlrp_fast.Explainer(model, rule="gradient_x_input"), x)


# -- progress bar ---------------------------------------------------------------------------
def test_progress_bar_silent_by_default_and_on_stderr(capsys, monkeypatch):
    model = _tiny_model()
    x, rel = torch.rand(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    M.region_perturbation(model, x, rel, patch_size=2, steps=2)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    M.region_perturbation(model, x, rel, patch_size=2, steps=2, progress=True)
    out = capsys.readouterr()
    assert out.out == "" and out.err != ""
    import builtins
    real_import = builtins.__import__

    def no_tqdm(name, *a, **k):
        if name.startswith("tqdm"):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    assert list(M.progress_bar(range(3), True, "x")) == [0, 1, 2]
    assert "3/3" in capsys.readouterr().err


# -- evaluation driver ----------------------------------------------------------------------
def test_preactivation_std_pools_folded_preactivations():
    from rlrp_fast import zoo
    torch.manual_seed(0)
    model = zoo.VGGBN().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    x = torch.rand(4, 1, 32, 32)
    # slow: run the layers by hand, collect BN outputs and the Linear outputs
    vals, h = [], x
    for layer in model.features:
        h = layer(h)
        if isinstance(layer, nn.BatchNorm2d):
            vals.append(h.flatten())
    h = model.classifier[0](h)
    h1 = model.classifier[1](h)
    vals += [h1.flatten(), model.classifier[4](torch.relu(h1)).flatten()]
    ref = torch.cat(vals).double().std(unbiased=False).item()
    assert E.preactivation_std(model, x) == pytest.approx(ref, rel=1e-6)


def test_faithfulness_table_and_cli_on_tiny_inputs(capsys):
    model = _tiny_model()
    x = torch.rand(4, 1, 8, 8)
    res = E.faithfulness_table(model, x, patch_size=2, steps=2)
    assert list(res) == [m.key for m in E.METHODS]
    table = E.format_table(res)
    assert table.count("\n") == len(E.METHODS) + 1 and "R-LRP" in table
    r = res["rlrp"]
    torch.testing.assert_close(r.abpc, r.auc_lerf - r.auc_morf)
    from rlrp_fast.cli import main
    assert main(["evaluate", "--n-images", "3", "--steps", "2", "--methods", "rlrp",
                 "random"]) == 0
    out = capsys.readouterr()
    assert "| R-LRP (default: norm=layer, skip=linear) |" in out.out and "random map" in out.out
    assert main(["evaluate", "--methods", "nope"]) == 2
    assert "unknown method" in capsys.readouterr().err


def test_on_step_reports_each_ruled_step_of_the_returned_pass_only():
    """The public recording hook: one event per relevance-changing step, backward order,
    the first layer's input relevance is the map; a safe rerun reports its own pass only."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    ex = rlrp_fast.Explainer(model, rule="rlrp")
    for scale in (1.0, 1e30):  # 1e30: the range check fails and the safe rerun runs
        events = []
        x = torch.randn(3, 4) * scale
        out = ex.explain(x, on_step=lambda step, r_out, r_in: events.append((step, r_out, r_in)))
        assert [type(e[0]).__name__ for e in events] == ["Affine", "Affine"]
        torch.testing.assert_close(events[-1][2][0], out.relevance, rtol=1e-5, atol=0)
        assert events[0][1].shape == (3, 2)
    with pytest.raises(ValueError, match="gradient_x_input"):
        rlrp_fast.Explainer(model, rule="gradient_x_input").explain(
            torch.randn(1, 4), on_step=lambda *a: None)
