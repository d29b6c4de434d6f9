"""The evaluation's modern section: LXT's AttnLRP as a compared method, the per-model method
lists, and the ``--section`` that writes its own part of EVALUATION.md."""
import pytest
import torch
import torch.nn as nn

from rlrp_fast import evaluate as E
from rlrp_fast import zoo

pytestmark = pytest.mark.usefixtures("one_thread")


def _bias_free_vit() -> nn.Module:
    """A random TinyViT whose constants (biases, LayerNorm shifts, class token, position
    embedding) are all 0: under CP-LRP with σ and the attention held constant the logit is
    a linear function of the input, so gradient × input must sum to it exactly."""
    torch.manual_seed(0)
    model = zoo.TinyViT().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or name in ("cls_token", "pos_embed"):
                p.zero_()
    return model


def test_lxt_applies_its_rules_and_conserves_on_a_bias_free_vit():
    pytest.importorskip("lxt")
    model = _bias_free_vit()
    x = torch.rand(3, 1, 32, 32)
    e = E.LXTAttnLRP(model).explain(x)
    logit = e.logits.gather(1, e.targets[:, None])[:, 0]
    torch.testing.assert_close(e.relevance.flatten(1).sum(1), logit, rtol=1e-4, atol=1e-5)
    # plain gradient × input does not conserve here (LayerNorm's σ and the softmax are not
    # held constant), so the sum above shows LXT's rules were in force
    xg = x.clone().requires_grad_(True)
    out = model(xg).gather(1, e.targets[:, None]).sum()
    (g,) = torch.autograd.grad(out, xg)
    assert not torch.allclose((g * x).flatten(1).sum(1), logit, rtol=1e-2)
    torch.testing.assert_close(e.logits, model(x))
    e5 = E.LXTAttnLRP(model).explain(x, target=5)
    assert (e5.targets == 5).all()


def test_lxt_patches_are_undone_even_when_the_model_fails():
    pytest.importorskip("lxt")
    classes = (nn.MultiheadAttention, nn.LayerNorm, nn.GELU)
    before = {cls: dict(cls.__dict__) for cls in classes}
    E.LXTAttnLRP(zoo.build("vit")).explain(torch.rand(1, 1, 32, 32))
    with pytest.raises(RuntimeError):
        E.LXTAttnLRP(zoo.build("vit")).explain(torch.rand(1, 1, 31, 31))  # 64 != 7x7+1 tokens
    for cls in classes:
        assert dict(cls.__dict__) == before[cls], f"{cls.__name__} left patched"


def test_lxt_missing_is_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_lxt(name, *args, **kwargs):
        if name.startswith("lxt"):
            raise ImportError("No module named 'lxt'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lxt)
    with pytest.raises(ImportError, match="pip install lxt"):
        E.LXTAttnLRP(zoo.build("vit"))


def test_methods_for_adds_lxt_on_attention_models_only(monkeypatch):
    base = [m.key for m in E.METHODS]
    monkeypatch.setattr(E, "_lxt_installed", lambda: True)
    assert E.methods_for(zoo.build("vit")) == base + ["lxt"]
    assert E.methods_for(zoo.build("se_convnet")) == base
    assert E.methods_for(zoo.build("resnet")) == base
    monkeypatch.setattr(E, "_lxt_installed", lambda: False)
    assert E.methods_for(zoo.build("vit")) == base


def test_sections_cover_the_zoo_and_an_unknown_one_is_refused(tmp_path):
    assert E.SECTIONS["classic"].archs == zoo.CLASSIC_ARCHS
    assert E.SECTIONS["modern"].archs == zoo.MODERN_ARCHS
    with pytest.raises(ValueError, match="unknown section 'postmodern'"):
        E.run_full_evaluation(tmp_path, section="postmodern")
    with pytest.raises(ValueError, match="unknown architecture 'swin'"):
        E.run_full_evaluation(tmp_path, archs=["swin"], section="modern")


def test_modern_section_is_appended_then_replaced_and_leaves_the_rest(tmp_path, monkeypatch):
    monkeypatch.setattr(E, "_lxt_installed", lambda: False)  # keep it fast; tested above
    doc = tmp_path / "EVALUATION.md"
    classic = "# Evaluation\n\nhand text\n\n<!-- results:begin -->\nCLASSIC\n<!-- results:end -->\n"
    doc.write_text(classic)
    small = dict(n_images=4, n_robust=2, n_sanity=2, archs=["se_convnet"], section="modern")
    E.run_full_evaluation(tmp_path, **small)
    text = doc.read_text()
    assert text.startswith(classic.rstrip("\n"))
    assert text.count("<!-- modern-results:begin -->") == 1
    assert "## Faithfulness (ViT, SE-ConvNeXt)" in text and "### se_convnet" in text
    assert "residual study" not in text  # the u ≈ −v study is the ResNet's alone
    assert (tmp_path / "eval_modern_heatmaps.png").is_file()
    assert (tmp_path / "eval_modern_curves.png").is_file()
    doc.write_text(text.replace("### se_convnet", "### STALE") + "\ntrailing hand text\n")
    E.run_full_evaluation(tmp_path, **small)
    again = doc.read_text()
    assert "STALE" not in again and again.count("<!-- modern-results:begin -->") == 1
    assert again.startswith(classic.rstrip("\n")) and again.endswith("trailing hand text\n")
