"""ExplainedModel (README "Ship it"): its eager explanation is Explainer.explain's; it exports
with a dynamic batch, the saved program and its AOTInductor build run in a process that never
imports rlrp_fast, and torch.compile(fullgraph=True) takes it whole."""
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import rlrp_fast
from rlrp_fast.backends import unavailable_reason
from rlrp_fast.digits import DigitsCNN

BATCH = torch.export.Dim("batch")


def _randomise_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, so that folding matters."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


class TinyResNet(nn.Module):
    """Stem (conv, BatchNorm, ReLU), one residual block with BatchNorm on both convs, a
    strided block with a 1×1 projection skip, global average pool, Linear."""

    def __init__(self, classes: int = 6):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c3, self.bn3 = nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.BatchNorm2d(12)
        self.proj = nn.Conv2d(8, 12, 1, stride=2)
        self.fc = nn.Linear(12, classes)

    def forward(self, x):
        h = F.relu(self.bn0(self.stem(x)))
        h = F.relu(h + self.bn2(self.c2(F.relu(self.bn1(self.c1(h))))))
        h = F.relu(self.proj(h) + self.bn3(self.c3(h)))
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


class GatedAttention(nn.Module):
    """Squeeze-excitation gate on conv features, then tokens through self-attention with
    LayerNorm and a residual, class-token-style pooling (``h[:, 0]``)."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.squeeze, self.excite = nn.Linear(8, 4), nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        h = F.relu(self.conv(x))
        gate = torch.sigmoid(self.excite(F.relu(self.squeeze(h.mean((2, 3))))))
        h = h * gate[:, :, None, None]
        tokens = h.flatten(2).transpose(1, 2)
        a, _ = self.attn(tokens, tokens, tokens)
        return self.head(F.relu(self.norm(tokens + a))[:, 0])


def _model(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    if name == "digits":
        return _randomise_bn(DigitsCNN()), (1, 32, 32)
    if name == "resnet":
        return _randomise_bn(TinyResNet()), (3, 12, 12)
    return GatedAttention().eval(), (3, 6, 6)


def _batch(shape: tuple[int, ...], n: int, seed: int = 1,
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _close(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    """Equal up to ``tol`` relative to each sample's largest value."""
    scale = want.abs().flatten(1).amax(1).clamp_min(1e-30)
    err = (got - want).abs().flatten(1).amax(1) / scale
    assert got.shape == want.shape and err.max() <= tol, err.max()


MODELS = ["digits", "resnet", "gated_attention"]


DTYPES = [(torch.float64, 1e-10), (torch.float32, 1e-5)]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("top_k", [1, 3])
@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_eager_equals_explainer(name, top_k, dtype, tol):
    _check_eager(name, top_k, dtype, tol, "rlrp", {})


@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("rule, options", [("rlrp", {"norm": "layer"}),
                                           ("rlrp", {"skip": "ratio"}),
                                           ("epsilon", {"epsilon": 0.1}), ("EpsilonPlus", {})])
def test_eager_equals_explainer_for_other_rules(rule, options, dtype, tol):
    _check_eager("resnet", 3, dtype, tol, rule, options)


def _check_eager(name, top_k, dtype, tol, rule, options):
    model, shape = _model(name)
    model = model.to(dtype)
    x = _batch(shape, 4, dtype=dtype)
    logits, relevance = rlrp_fast.ExplainedModel(model, rule, top_k=top_k, **options)(x)
    want = rlrp_fast.Explainer(model, rule, backend="torch", **options).explain(
        x, top_k=top_k if top_k > 1 else None)
    assert relevance.shape == ((4, top_k) if top_k > 1 else (4,)) + x.shape[1:]
    assert relevance.dtype == dtype and not relevance.requires_grad
    assert torch.equal(logits, want.logits)
    _close(relevance, want.relevance, tol)
    if top_k > 1:  # each of the K maps is the single-target map of that class
        k_last = want.targets[:, -1]
        single = rlrp_fast.Explainer(model, rule, backend="torch", **options).explain(
            x, target=k_last)
        _close(relevance[:, -1], single.relevance, tol)


def test_eager_takes_the_safe_path_where_the_explainer_reruns():
    """Inputs of 1e30: the plain float32 pass leaves the exact range; ExplainedModel's
    always-safe pass equals the explainer's rerun and the float64 explanation."""
    model, shape = _model("digits")
    x = _batch(shape, 3) * 1e30
    _, relevance = rlrp_fast.ExplainedModel(model)(x)
    want = rlrp_fast.Explainer(model, backend="torch").explain(x.double())
    assert torch.isfinite(relevance).all()
    _close(relevance.double(), want.relevance, 1e-4)


def _export(em: nn.Module, x: torch.Tensor) -> torch.export.ExportedProgram:
    return torch.export.export(em, (x,), dynamic_shapes=({0: BATCH},))


_FRESH_PROCESS = textwrap.dedent("""
    import sys
    import torch
    program_path, package_path, data_path = sys.argv[1:]
    data = torch.load(data_path)
    program = torch.export.load(program_path).module()
    runner = torch._inductor.aoti_load_package(package_path) if package_path != "-" else None
    for x, logits, relevance in data:
        for run in [program] + ([runner] if runner is not None else []):
            got_logits, got_relevance = run(x)
            torch.testing.assert_close(got_logits, logits, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got_relevance, relevance, rtol=1e-5, atol=1e-7)
    assert "rlrp_fast" not in sys.modules, "loading the program imported rlrp_fast"
    print("ok", len(data))
""")


@pytest.mark.parametrize("name, top_k, aoti", [("digits", 3, False), ("resnet", 1, True),
                                               ("gated_attention", 2, False)])
def test_export_runs_without_rlrp_fast(name, top_k, aoti, tmp_path):
    model, shape = _model(name)
    x = _batch(shape, 3)
    em = rlrp_fast.ExplainedModel(model, top_k=top_k, example_input=x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # verified: no warning of ours
        program = _export(em, x)
    data = []
    for n, seed in ((2, 5), (7, 6)):  # two batch sizes, neither the traced one
        xn = _batch(shape, n, seed)
        logits, relevance = em(xn)
        got_logits, got_relevance = program.module()(xn)
        torch.testing.assert_close(got_logits, logits, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_relevance, relevance, rtol=1e-5, atol=1e-7)
        data.append((xn, logits, relevance))
    torch.export.save(program, tmp_path / "program.pt2")
    package = "-"
    if aoti:
        package = torch._inductor.aoti_compile_and_package(
            program, package_path=str(tmp_path / "aoti.pt2"))
    torch.save(data, tmp_path / "data.pt")
    done = subprocess.run([sys.executable, "-c", _FRESH_PROCESS, str(tmp_path / "program.pt2"),
                           str(package), str(tmp_path / "data.pt")],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    # the plan's derived tensors (folded BatchNorm) are plain constants, not autograd leaves
    assert "requires gradient" not in done.stderr
    assert done.stdout.split()[-2:] == ["ok", "2"]


def test_export_of_another_dtype_builds_its_own_weights():
    """A float64 export of a float32-built module: the trace casts the weights itself (and
    leaves no traced tensor in the module's caches)."""
    model, shape = _model("resnet")
    em = rlrp_fast.ExplainedModel(model, example_input=_batch(shape, 2))
    x = _batch(shape, 3, dtype=torch.float64)
    program = _export(em, x)
    assert torch.float64 not in em._explainer._weights
    xn = _batch(shape, 4, 9, torch.float64)
    got = program.module()(xn)
    want = em(xn)
    assert got[1].dtype == torch.float64
    _close(got[1], want[1], 1e-12)


class Copies(nn.Module):
    """Copies of a batched signal (``expand`` of pooled features over new tokens, ``repeat``
    of the tokens): the forward finds the batch dim of each copy from shapes alone."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 4, classes)

    def forward(self, x):
        pooled = F.relu(self.conv(x)).mean((2, 3))               # (N, 6)
        tokens = pooled.unsqueeze(1).expand(-1, 2, -1).repeat(1, 2, 1)  # (N, 4, 6)
        return self.fc(tokens.flatten(1))


def test_export_and_compile_of_copies_of_a_signal():
    model, shape = Copies().eval(), (3, 5, 5)
    em = rlrp_fast.ExplainedModel(model, example_input=_batch(shape, 2))
    program = _export(em, _batch(shape, 3))
    compiled = torch.compile(em, fullgraph=True)
    for n in (2, 6):
        x = _batch(shape, n, n)
        want = em(x)
        _close(program.module()(x)[1], want[1], 1e-5)
        _close(compiled(x)[1], want[1], 1e-5)


@pytest.mark.parametrize("written", [False, True], ids=["sdpa", "written_out"])
def test_export_keeps_the_batch_dynamic_beside_a_dim_of_the_same_size(written):
    """timm's packed qkv: ``reshape(b, n, 3, heads, d).permute(2, 0, 3, 1, 4)``, exported
    with an example batch of 3. The batch dim is found by the marker's stride, never by
    comparing the static 3 with the batch size (which pinned the export to batch 3)."""
    from test_written_attention import TinyViT
    torch.manual_seed(0)
    model, shape = TinyViT(written).eval(), (3, 6, 6)
    em = rlrp_fast.ExplainedModel(model, example_input=_batch(shape, 3))
    program = _export(em, _batch(shape, 3))
    x = _batch(shape, 5, 7)
    _close(program.module()(x)[1], em(x)[1], 1e-5)


@pytest.mark.parametrize("name, top_k", [("digits", 3), ("resnet", 1)])
def test_compile_fullgraph_equals_eager(name, top_k):
    model, shape = _model(name)
    em = rlrp_fast.ExplainedModel(model, top_k=top_k, example_input=_batch(shape, 2))
    compiled = torch.compile(em, fullgraph=True)
    for n in (3, 5):
        x = _batch(shape, n, n)
        got, want = compiled(x), em(x)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
        _close(got[1], want[1], 1e-5)


@pytest.mark.skipif(unavailable_reason("cpp") is not None, reason="cpp extension not built")
def test_cpp_backend_compiles_and_exports_with_torch():
    model, shape = _model("resnet")
    x = _batch(shape, 3)
    em = rlrp_fast.ExplainedModel(model, backend="cpp", example_input=x)
    assert em.backend == "cpp"
    want = rlrp_fast.ExplainedModel(model)(x)
    _close(em(x)[1], want[1], 1e-5)
    # compile keeps the cpp ops (they have fake kernels)
    _close(torch.compile(em, fullgraph=True)(x)[1], want[1], 1e-5)
    with pytest.warns(RuntimeWarning, match="exports with the 'torch' backend, not 'cpp'"):
        program = _export(em, x)
    assert "rlrp_fast" not in program.graph_module.code  # no torch.ops.rlrp_fast call
    _close(program.module()(x)[1], want[1], 1e-5)


def test_unverified_export_warns():
    model, shape = _model("digits")
    em = rlrp_fast.ExplainedModel(model)
    with pytest.warns(RuntimeWarning, match="before its plan was checked"):
        _export(em, _batch(shape, 2))


def test_onnx_export_runs_in_onnxruntime(tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    model, shape = _model("digits")
    x = _batch(shape, 2)
    em = rlrp_fast.ExplainedModel(model, example_input=x)
    torch.onnx.export(em, (x,), str(tmp_path / "em.onnx"), dynamo=True,
                      dynamic_shapes=({0: BATCH},))
    session = ort.InferenceSession(str(tmp_path / "em.onnx"))
    xn = _batch(shape, 5, 3)
    logits, relevance = session.run(None, {session.get_inputs()[0].name: xn.numpy()})
    want = em(xn)
    torch.testing.assert_close(torch.from_numpy(logits), want[0], rtol=1e-5, atol=1e-5)
    _close(torch.from_numpy(relevance), want[1], 1e-5)


# -- what the eager module still checks, and what it refuses ------------------------------------

def test_eager_calls_keep_the_explainers_checks():
    model, shape = _model("digits")
    em = rlrp_fast.ExplainedModel(model)
    with pytest.raises(ValueError, match="NaN or Inf"):
        em(torch.full((2, *shape), float("nan")))
    with pytest.raises(ValueError, match="first layer"):
        em(torch.rand(2, 3, 32, 32))
    with pytest.raises(TypeError, match="dtype"):
        em(torch.ones(2, *shape, dtype=torch.int64))
    em(_batch(shape, 2))
    with torch.no_grad():
        model.classifier[-1].bias.add_(1.0)
    with pytest.raises(rlrp_fast.StaleModelError):
        em(_batch(shape, 2))


class Switch(nn.Module):
    """Python control flow on an attribute: fx bakes in the branch taken at capture."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 3)
        self.flip = False

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(torch.relu(-h if self.flip else h))


def test_the_trace_is_verified_at_construction_or_first_call():
    model = Switch().eval()
    em = rlrp_fast.ExplainedModel(model)
    model.flip = True  # not a parameter: only verification can see it
    with pytest.raises(rlrp_fast.TraceMismatchError, match="'relu'"):
        em(torch.randn(3, 4))

    class FlipsWhenWrapped(Switch):  # the module fx captures is not the one that runs
        def __call__(self, *args):
            self.flip = True
            return super().__call__(*args)

    with pytest.raises(rlrp_fast.TraceMismatchError, match="'relu'"):
        rlrp_fast.ExplainedModel(FlipsWhenWrapped().eval(), example_input=torch.randn(2, 4))


@pytest.mark.parametrize("kwargs, error, match", [
    ({"top_k": 0}, ValueError, "top_k must be a positive int"),
    ({"top_k": True}, ValueError, "top_k must be a positive int"),
    ({"rule": "gradient_x_input"}, ValueError, "autograd"),
    ({"rule": "nope"}, ValueError, "nope"),
    ({"backend": "nope"}, ValueError, "unknown backend"),
])
def test_bad_arguments_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        rlrp_fast.ExplainedModel(_model("digits")[0], **kwargs)


def test_top_k_beyond_the_classes_is_refused():
    model, shape = _model("resnet")
    em = rlrp_fast.ExplainedModel(model, top_k=7)
    with pytest.raises(ValueError, match="top_k=7 exceeds the 6 classes"):
        em(_batch(shape, 2))


def test_no_training_mode_and_no_parameters_of_its_own():
    model, _ = _model("digits")
    em = rlrp_fast.ExplainedModel(model)
    assert not em.training and list(em.parameters()) == [] and em.model is model
    assert em.eval() is em
    with pytest.raises(ValueError, match="no training mode"):
        em.train()
    assert not model.training
    assert "rule='rlrp'" in repr(em) and "top_k=1" in repr(em)
