"""The embedded digits model, the heatmap grid, and the `demo` command end to end."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.fx
from matplotlib.image import imread

pytest.importorskip("sklearn")

from rlrp_fast import digits, viz  # noqa: E402
from rlrp_fast.cli import main  # noqa: E402

# Ops the R-LRP plan is promised to support for this model (brief + docs/RLRP_SPEC.md).
_ALLOWED_MODULES = (
    torch.nn.Conv2d,
    torch.nn.BatchNorm2d,
    torch.nn.ReLU,
    torch.nn.MaxPool2d,
    torch.nn.Flatten,
    torch.nn.Linear,
)


@pytest.fixture(scope="module")
def split() -> tuple[torch.Tensor, ...]:
    return digits.load_digits_split()


@pytest.fixture(scope="module")
def pretrained() -> digits.DigitsCNN:
    return digits.load_pretrained()


# ---------------------------------------------------------------- data and model


def test_split_is_fixed_stratified_and_preprocessed(split):
    x_train, y_train, x_test, y_test = split
    assert x_train.shape == (1437, 1, 32, 32) and x_test.shape == (360, 1, 32, 32)
    assert x_train.dtype == x_test.dtype == torch.float32
    assert y_train.dtype == torch.int64
    assert 0.0 <= float(x_train.min()) and float(x_train.max()) <= 1.0
    assert float(x_train.max()) > 0.9  # really scaled to [0, 1], not left at 0..16 / 256 etc.
    # Stratified: every class is 9.5%..11% of the test split (sklearn digits are ~balanced).
    counts = torch.bincount(y_test, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38
    # Same seed, same split; another seed, another split.
    assert torch.equal(digits.load_digits_split(seed=0)[3], y_test)
    assert not torch.equal(digits.load_digits_split(seed=1)[3], y_test)


def test_preprocess_upsamples_bilinearly():
    raw = torch.zeros(1, 8, 8)
    raw[0, 3, 4] = 16.0
    x = digits.preprocess(raw)
    assert x.shape == (1, 1, 32, 32)
    # Independent check: bilinear upsampling of the same [0, 1] image by scale 4.
    expected = torch.nn.functional.interpolate(raw[:, None] / 16, scale_factor=4, mode="bilinear")
    torch.testing.assert_close(x, expected)


def test_shipped_weights_load_and_classify_the_test_split(pretrained, split):
    _, _, x_test, y_test = split
    assert not pretrained.training
    assert digits.WEIGHTS_PATH.stat().st_size < 1_000_000
    with torch.inference_mode():
        accuracy = (pretrained(x_test).argmax(1) == y_test).float().mean().item()
    assert accuracy > 0.95
    assert digits.evaluate_accuracy(pretrained, x_test, y_test) == pytest.approx(accuracy)


def test_load_pretrained_names_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m rlrp_fast.digits"):
        digits.load_pretrained(tmp_path / "nope.pt")


def test_model_is_fx_traceable_with_supported_ops_only(pretrained, split):
    gm = torch.fx.symbolic_trace(pretrained)
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op == "call_module":
            assert isinstance(modules[node.target], _ALLOWED_MODULES), node.format_node()
        else:
            assert node.op in ("placeholder", "output"), node.format_node()
    x = split[2][:7]
    with torch.inference_mode():
        torch.testing.assert_close(gm(x), pretrained(x))
    # Every BatchNorm directly follows a conv, so the plan can fold it.
    nodes = list(gm.graph.nodes)
    for prev, node in zip(nodes, nodes[1:]):
        if node.op == "call_module" and isinstance(modules[node.target], torch.nn.BatchNorm2d):
            assert isinstance(modules[prev.target], torch.nn.Conv2d)


def test_training_is_deterministic():
    a, acc_a = digits.train(epochs=1, seed=3)
    b, acc_b = digits.train(epochs=1, seed=3)
    assert acc_a == acc_b
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert acc_a > 0.5  # one epoch already learns something; a broken loop stays near 0.1


# ---------------------------------------------------------------- heatmap grid


def _grid_pixels(n: int, ncols: int) -> tuple[int, int]:
    # save_grid's layout: 2 panels (input, heatmap) per sample, 1.3 in per panel, 100 dpi.
    side = round(viz._PANEL_INCHES * viz._DPI)
    return math.ceil(n / ncols) * side, 2 * ncols * side


@pytest.mark.parametrize("n, ncols", [(1, None), (5, None), (7, 2), (16, None)])
def test_save_grid_writes_one_png_with_a_panel_pair_per_image(tmp_path, n, ncols):
    gen = torch.Generator().manual_seed(n)
    images = torch.rand(n, 1, 32, 32, generator=gen)
    relevance = torch.randn(n, 1, 32, 32, generator=gen)
    path = viz.save_grid(images, relevance, tmp_path / "sub" / "g.png", ncols=ncols,
                         titles=[f"t{i}" for i in range(n)])
    assert Path(path) == tmp_path / "sub" / "g.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 2_000
    pixels = imread(path)
    assert pixels.shape[:2] == _grid_pixels(n, ncols or math.ceil(math.sqrt(n)))


def test_save_grid_puts_inputs_left_and_diverging_heatmaps_right(tmp_path):
    # 3 samples in one row: columns are input0, heat0, input1, heat1, input2, heat2.
    images = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    relevance = torch.ones(3, 1, 32, 32)
    relevance[1] *= -1e-6  # tiny and negative: the per-image scale must still make it saturated
    relevance[2] = 0.0  # the m = 0 guard: drawn as the neutral colour, no error
    pixels = imread(viz.save_grid(images, relevance, tmp_path / "g.png", ncols=3))[..., :3]
    height, width = pixels.shape[:2]
    band = width // 6

    def centre(k: int) -> np.ndarray:  # middle of the k-th panel, away from titles and edges
        return pixels[height // 4 : 3 * height // 4, k * band + band // 4 : (k + 1) * band - band // 4]
    for k in (0, 2, 4):  # inputs: grayscale
        p = centre(k)
        assert np.allclose(p[..., 0], p[..., 1], atol=0.02)
        assert np.allclose(p[..., 1], p[..., 2], atol=0.02)
    red, blue, neutral = (np.median(centre(k).reshape(-1, 3), axis=0) for k in (1, 3, 5))
    assert red[0] > 0.5 and red[2] < 0.2  # +max -> saturated red
    assert blue[2] > 0.5 and blue[0] < 0.2  # -max -> saturated blue, despite |R| = 1e-6
    assert np.all(neutral > 0.9)  # zero -> white (centre of 'bwr')


def test_save_grid_adds_a_title_band_and_a_colour_bar_blue_to_red(tmp_path):
    images = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    relevance = torch.zeros(2, 1, 32, 32)  # white maps: the only colour is the colour bar's
    plain = imread(viz.save_grid(images, relevance, tmp_path / "plain.png", ncols=2))[..., :3]
    full = imread(viz.save_grid(images, relevance, tmp_path / "full.png", ncols=2,
                                titles=["true 1", "true 2"], heatmap_titles=["pred 1", "pred 2"],
                                title="a title\non two lines", colorbar="caption"))[..., :3]
    assert full.shape[1] == plain.shape[1]  # same panels, more height for the two bands
    title_rows = round(2 * viz._line_inches(viz._TITLE_POINTS) * viz._DPI)  # two lines
    assert full.shape[0] >= plain.shape[0] + round(viz._COLORBAR_INCHES * viz._DPI) + title_rows
    top = full[:title_rows]
    assert (top.min(axis=2) < 0.3).any()  # the title's text
    red = (full[..., 0] > 0.8) & (full[..., 2] < 0.3)
    blue = (full[..., 2] > 0.8) & (full[..., 0] < 0.3)
    band = full.shape[0] - round(viz._COLORBAR_INCHES * viz._DPI)
    for mask in (red, blue):
        rows, _ = np.nonzero(mask)
        assert rows.size > 100 and rows.min() >= band  # the colour bar, under the grid
    assert np.nonzero(blue)[1].max() < np.nonzero(red)[1].min()  # -max|R| left, +max|R| right


def test_save_grid_refuses_an_unknown_extension(tmp_path):
    with pytest.raises(ValueError, match=r"'\.bmp'.*\.png, \.jpg, \.jpeg, \.pdf, \.svg"):
        viz.save_grid(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8), tmp_path / "g.bmp")
    assert not any(tmp_path.iterdir())


def test_heatmap_limit_is_max_abs_with_a_zero_guard():
    assert viz.heatmap_limit(np.array([[0.5, -2.0], [1.0, 0.0]])) == 2.0
    assert viz.heatmap_limit(np.zeros((4, 4))) == 1.0


def test_save_grid_rejects_mismatched_inputs(tmp_path):
    images = torch.rand(2, 1, 8, 8)
    with pytest.raises(ValueError, match="relevance shape"):
        viz.save_grid(images, torch.rand(3, 1, 8, 8), tmp_path / "g.png")
    with pytest.raises(ValueError, match="titles"):
        viz.save_grid(images, torch.rand(2, 1, 8, 8), tmp_path / "g.png", titles=["a"])
    assert not (tmp_path / "g.png").exists()


# ---------------------------------------------------------------- CLI (needs the engine)


def test_cli_demo_writes_the_png_and_prints_accuracy_and_speed(tmp_path, capsys):
    out = tmp_path / "demo.png"
    code = main(["demo", "--out", str(out), "--batch-size", "6", "--n-show", "4"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert out.is_file()
    # 4 images -> a 2 x 2 grid of (input, heatmap) pairs, with a title above and a colour bar below.
    height, width = imread(out).shape[:2]
    grid_height, grid_width = _grid_pixels(4, 2)
    assert width == grid_width and height > grid_height + 100
    accuracy = float(captured.out.split("test accuracy:")[1].split("%")[0])
    assert accuracy > 95.0
    assert "images/s" in captured.out
    assert str(out.resolve()) in captured.out


def test_run_demo_returns_the_documented_fields(tmp_path):
    from rlrp_fast.demo import run_demo

    result = run_demo(out=tmp_path / "d.png", batch_size=3, n_show=8)
    assert set(result) == {"accuracy", "images_per_s", "path", "seconds"}
    assert result["accuracy"] > 0.95
    assert result["seconds"] > 0 and result["images_per_s"] == pytest.approx(3 / result["seconds"])
    assert result["path"].is_absolute() and result["path"].is_file()
    # n_show capped at batch_size: 3 images -> 2 pairs per row.
    assert imread(result["path"]).shape[1] == _grid_pixels(3, 2)[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error path")
def test_cli_demo_without_cuda_is_a_one_line_usage_error(tmp_path, capsys):
    code = main(["demo", "--device", "cuda", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "CUDA" in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("argv", [["demo", "--batch-size", "0"], ["demo", "--device", "tpu"], []])
def test_cli_rejects_bad_options_with_exit_code_2(argv, capsys):
    assert main(argv) == 2
    assert "error" in capsys.readouterr().err
