"""`rlrp-fast explain` and rlrp_fast.pipeline: generated images, resnet18 (10 classes) at 32 px."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

torchvision = pytest.importorskip("torchvision")
from PIL import Image  # noqa: E402  (comes with torchvision)

import rlrp_fast  # noqa: E402
from rlrp_fast import pipeline  # noqa: E402
from rlrp_fast.cli import main  # noqa: E402

SIZE = 32
ROOT = Path(__file__).resolve().parents[1]


def _write_images(folder: Path, n: int, start: int = 0) -> list[Path]:
    rng = np.random.default_rng(start)
    paths = []
    for i in range(start, start + n):
        ext = ("png", "jpg", "webp")[i % 3]
        sub = folder / "sub" if i % 4 == 3 else folder
        sub.mkdir(parents=True, exist_ok=True)
        a = (rng.random((36 + 3 * i, 44, 3)) * 255).astype(np.uint8)
        path = sub / f"img{i:02d}.{ext}"
        Image.fromarray(a).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    path = tmp_path_factory.mktemp("model") / "r18.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "imgs"
    _write_images(folder, 6)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    (folder / "notes.txt").write_text("not an image, not searched")
    return folder


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["explain", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def _records(out: Path, name="predictions.jsonl") -> list[dict]:
    return [json.loads(line) for line in (out / name).read_text().splitlines()]


def _explainer(weights: Path) -> rlrp_fast.Explainer:
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    model.load_state_dict(torch.load(weights, weights_only=True))
    return rlrp_fast.Explainer(model.eval())


# -- inputs ----------------------------------------------------------------------------------
def test_collect_images_files_folders_globs(tmp_path):
    paths = _write_images(tmp_path / "a", 5)
    (tmp_path / "a" / "x.TXT").write_text("")
    errors = []
    found = pipeline.collect_images(
        [str(tmp_path / "a"), str(paths[0]), str(tmp_path / "a" / "*.png"),
         str(tmp_path / "nope.jpg"), str(tmp_path / "none*.jpg")],
        on_error=lambda spec, why: errors.append((spec, why)))
    assert found == sorted(os.path.normpath(p) for p in map(str, paths))  # once each, sorted
    assert [Path(s).name for s, _ in errors] == ["nope.jpg", "none*.jpg"]
    recursive = pipeline.collect_images([str(tmp_path / "**" / "*.jpg")])
    assert sorted(Path(p).name for p in recursive) == sorted(
        p.name for p in paths if p.suffix == ".jpg")


def test_preprocess_shapes_and_normalisation(tmp_path):
    (path,) = _write_images(tmp_path, 1)
    x = pipeline.Preprocess(size=24)(str(path))
    assert x.shape == (3, 24, 24) and x.dtype == torch.float32
    raw = pipeline.Preprocess(size=24, mean=None, std=None)(str(path))
    assert 0 <= raw.min() and raw.max() <= 1
    mean = torch.tensor(pipeline.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(pipeline.IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(x, (raw - mean) / std)
    gray = pipeline.Preprocess(size=24, mean=(0.5,), std=(0.5,), channels=1)(str(path))
    assert gray.shape == (1, 24, 24)


# -- the command -----------------------------------------------------------------------------
def test_explain_end_to_end_top_k(capsys, tmp_path, images, weights):
    out = tmp_path / "out"
    code, stdout, stderr = _run(capsys, images, tmp_path / "missing.jpg", "--model", "resnet18",
                                "--weights", weights, "--size", SIZE, "--top-k", 2,
                                "--batch-size", 4, "--workers", 2, "--out", out)
    assert code == 0, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 2, stderr  # one line per unreadable file or missing input
    assert any("missing.jpg" in s and "no such file" in s for s in lines)
    assert any("broken.png" in s for s in lines)
    assert all(s.startswith("rlrp-fast explain: skipped ") for s in lines)
    assert stdout.count("\n") == 1 and "explained 6 images (top-2), 1 errors" in stdout
    assert "images/s" in stdout

    records = _records(out)
    assert [r["file"] for r in records] == sorted(r["file"] for r in records)  # input order
    assert len(records) == 6 and len({r["file"] for r in records}) == 6
    explainer = _explainer(weights)
    prep = pipeline.Preprocess(SIZE)
    for rec in records:
        assert len(rec["top_k"]) == 2 and rec["logits"][0] >= rec["logits"][1]
        assert rec["labels"] is None and rec["time_s"] > 0
        assert len(rec["outputs"]) == 4 and all((out / p).is_file() for p in rec["outputs"])
        x = prep(rec["file"])[None]
        e = explainer.explain(x)
        assert rec["top_k"][0] == int(e.targets[0])
        assert rec["top_k"] == e.logits[0].topk(2).indices.tolist()
        np.testing.assert_allclose(rec["logits"], e.logits[0, rec["top_k"]].tolist(), rtol=1e-4,
                                   atol=1e-5)
        for j, c in enumerate(rec["top_k"]):
            npy = out / next(p for p in rec["outputs"] if p.endswith(f"top{j + 1}-c{c}.npy"))
            r = np.load(npy)
            assert r.shape == (3, SIZE, SIZE) and r.dtype == np.float32
            want = explainer.explain(x, target=c).relevance[0].numpy()
            np.testing.assert_allclose(r, want, rtol=1e-3, atol=1e-6 * np.abs(want).max())
            # R-LRP conserves |logit| in L1
            assert rec["relevance_l1"][j] == pytest.approx(abs(rec["logits"][j]), rel=1e-3)
            png = npy.with_suffix(".png")
            assert png.read_bytes().startswith(b"\x89PNG")
    # a file in a sub-folder keeps its place under --out
    assert any(p.startswith("sub/") for r in records for p in r["outputs"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["images"] == 7 and manifest["explained"] == 6 and manifest["errors"] == 1


def test_formats_npy_float16_and_resume(capsys, tmp_path, weights):
    folder = tmp_path / "imgs"
    _write_images(folder, 3)
    out = tmp_path / "out"
    args = ["--model", "resnet18", "--weights", weights, "--size", SIZE, "--workers", 0,
            "--format", "npy", "--npy-dtype", "float16", "--out", out]
    code, stdout, _ = _run(capsys, folder, *args)
    assert code == 0 and "explained 3 images" in stdout
    assert not list(out.rglob("*.png"))
    npys = sorted(out.rglob("*.npy"))
    assert len(npys) == 3 and np.load(npys[0]).dtype == np.float16

    _write_images(folder, 2, start=3)  # two new images
    first = npys[0].stat().st_mtime_ns
    code, stdout, _ = _run(capsys, folder, *args, "--resume")
    assert code == 0 and "explained 2 images" in stdout and "3 already done" in stdout
    assert npys[0].stat().st_mtime_ns == first  # not rewritten
    records = _records(out)
    assert len(records) == 5 and len({r["file"] for r in records}) == 5

    npys[0].unlink()  # an image whose outputs are gone is redone
    code, stdout, _ = _run(capsys, folder, *args, "--resume")
    assert code == 0 and "explained 1 images" in stdout and "4 already done" in stdout
    assert npys[0].is_file()

    code, stdout, _ = _run(capsys, folder, *args[:-2], "--out", out, "--format", "png")
    assert code == 0 and "explained 5 images" in stdout  # without --resume: all again
    assert len(_records(out)) == 5 and len(list(out.rglob("*.png"))) == 5


def test_class_names_of_a_1000_class_torchvision_model(capsys, tmp_path):
    folder = tmp_path / "imgs"
    _write_images(folder, 1)
    code, _, err = _run(capsys, folder, "--model", "resnet18", "--size", SIZE, "--workers", 0,
                        "--format", "npy", "--no-normalize", "--out", tmp_path / "out")
    assert code == 0, err
    (rec,) = _records(tmp_path / "out")
    categories = torchvision.models.ResNet18_Weights.DEFAULT.meta["categories"]
    assert rec["labels"] == [categories[rec["top_k"][0]]]


def _tiny() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 6 * 6, 3)).eval()


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
@pytest.mark.parametrize("case, expected", [
    (["--model", "resnet5O"], "not a torchvision classification model or an existing file; "
     "did you mean resnet50"),
    (["--model", "resnet18", "--weights", "{tmp}/nope.pt"], "no such file"),
    (["--model", "resnet18", "--weights", "{tmp}/pickled.pt"], "weights_only=True"),
    (["--model", "resnet18", "--weights", "{tmp}/tiny_state.pt"], "does not fit resnet18"),
    (["--model", "{tmp}/tiny.ts"], "TorchScript model, which torch.fx"),
    (["--model", "{tmp}/tiny.pt2"], "exported program, which cannot be explained"),
    (["--model", "{tmp}/tiny_state.pt"], "for a state_dict pass a torchvision model name"),
    (["--model", "resnet18", "--num-classes", "3", "--top-k", "4"], "exceeds the 3 classes"),
    (["--model", "resnet18", "--mean", "0.5,0.5"], "--mean has 2 values but --std has 3"),
    (["--model", "resnet18", "--mean", "0.5,0.5", "--std", "1,1"], "the model takes 3 channel"),
    (["--model", "resnet18", "--no-normalize", "--std", "1"], "cannot be combined"),
    (["--model", "resnet18", "--format", "gif"], "expected png, npy or png,npy"),
    (["--model", "resnet18", "--rule", "nope"], "nope"),
    (["--model", "vit_b_16"], "Wrong image height! Expected 224 but got"),
    (["--model", "digits", "--weights", "{tmp}/tiny_state.pt"], "not a state_dict of the digits"),
    (["--model", "digits", "--num-classes", "3"], "has 10 classes, not 3"),
])
def test_user_errors_are_one_line(capsys, tmp_path, case, expected):
    folder = tmp_path / "imgs"
    _write_images(folder, 1)
    torch.save(_tiny().state_dict(), tmp_path / "tiny_state.pt")
    torch.save({"model": _tiny()}, tmp_path / "pickled.pt")
    torch.jit.script(_tiny()).save(str(tmp_path / "tiny.ts"))
    torch.export.save(torch.export.export(_tiny(), (torch.rand(1, 3, 8, 8),)),
                      tmp_path / "tiny.pt2")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in case]
    code, stdout, stderr = _run(capsys, folder, *argv, "--size", SIZE, "--workers", 0,
                                "--out", tmp_path / "out")
    assert code == 2 and stdout == ""
    assert stderr.count("\n") == 1 and stderr.startswith("rlrp-fast explain: error:"), stderr
    assert expected in stderr


def test_the_embedded_digits_model_with_its_own_preprocessing(capsys, tmp_path):
    """``--model digits``: the demo's CNN, grey 32×32 pixels in [0, 1] without any option;
    digit class names; the same maps as the explainer on the same pixels."""
    from rlrp_fast.digits import load_pretrained

    folder = tmp_path / "imgs"
    _write_images(folder, 3)
    out = tmp_path / "out"
    code, stdout, stderr = _run(capsys, folder, "--model", "digits", "--format", "npy",
                                "--workers", 0, "--out", out)
    assert code == 0, stderr
    explainer = rlrp_fast.Explainer(load_pretrained())
    prep = pipeline.Preprocess(32, mean=None, std=None, channels=1)
    records = _records(out)
    assert len(records) == 3
    for rec in records:
        x = prep(rec["file"])[None]
        assert x.shape == (1, 1, 32, 32) and 0 <= x.min() and x.max() <= 1
        e = explainer.explain(x)
        assert rec["top_k"] == [int(e.targets[0])] and rec["labels"] == [str(rec["top_k"][0])]
        r = np.load(out / rec["outputs"][0])
        np.testing.assert_allclose(r, e.relevance[0].numpy(), rtol=1e-4,
                                   atol=1e-6 * float(e.relevance.abs().max()))


def test_no_images_is_one_line_error(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, stderr = _run(capsys, tmp_path / "empty", "--model", "resnet18", "--out",
                           tmp_path / "out")
    assert code == 2
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith("rlrp-fast explain: error: no images found")
    assert len(lines) == 2 and "holds no" in lines[0]  # the empty folder, then the error


# -- many processes --------------------------------------------------------------------------
def _strip(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time_s"} for r in records]


def test_torchrun_two_ranks_each_image_once_same_results(capsys, tmp_path, weights):
    folder = tmp_path / "imgs"
    _write_images(folder, 10)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff nothing")
    args = ["--model", "resnet18", "--weights", str(weights), "--size", str(SIZE),
            "--workers", "0", "--format", "npy", "--batch-size", "3", "--quiet"]
    code, _, _ = _run(capsys, folder, *args, "--out", tmp_path / "one")
    assert code == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", "2", "-m", "rlrp_fast", "explain", str(folder), *args,
                "--out", str(tmp_path / "two")]
    # its own session, so that a hang is ended with every rank (not only torchrun itself)
    proc = subprocess.Popen(torchrun, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=tmp_path, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-3000:]
    assert stdout.count("explained 10 images") == 1 and "on 2 ranks" in stdout
    assert stderr.count("skipped") == 1 and "broken.jpg" in stderr
    two = tmp_path / "two"
    ranks = [_records(two, f"predictions-rank{r}.jsonl") for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 5
    assert not {r["file"] for r in ranks[0]} & {r["file"] for r in ranks[1]}
    merged, single = _records(two), _records(tmp_path / "one")
    assert len(merged) == 10
    # the same files in the same order, the same classes, logits and relevance
    assert [r["file"] for r in merged] == [r["file"] for r in single]
    for a, b in zip(_strip(merged), _strip(single)):
        assert a["top_k"] == b["top_k"] and a["outputs"] == b["outputs"]
        np.testing.assert_allclose(a["logits"], b["logits"], rtol=1e-4, atol=1e-5)
    for rel in (p for r in single for p in r["outputs"]):
        want = np.load(tmp_path / "one" / rel)
        np.testing.assert_allclose(np.load(two / rel), want, rtol=1e-3,
                                   atol=1e-6 * np.abs(want).max())
    manifest = json.loads((two / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["explained"] == 10
    assert manifest["errors"] == 1


def test_python_m_rlrp_fast_dispatches_to_the_cli():
    proc = subprocess.run([sys.executable, "-m", "rlrp_fast", "explain", "--help"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0 and "--top-k" in proc.stdout


def test_progress_bar_is_optional(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # as if tqdm were not installed
    assert pipeline._progress(3, enabled=True) is None
    assert pipeline._progress(3, enabled=False) is None


def test_progress_bar_uses_tqdm_on_a_terminal(monkeypatch):
    made = []

    class FakeTqdm:
        def __init__(self, **kwargs):
            made.append(kwargs)

    monkeypatch.setitem(sys.modules, "tqdm", type(sys)("tqdm"))
    sys.modules["tqdm"].tqdm = FakeTqdm
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert isinstance(pipeline._progress(7, enabled=True), FakeTqdm)
    assert made == [{"total": 7, "unit": "img", "desc": "explain", "file": sys.stderr}]
    assert pipeline._progress(7, enabled=False) is None  # --quiet


def test_png_without_matplotlib_is_one_line_error(capsys, monkeypatch, tmp_path):
    import rlrp_fast.viz

    def missing():
        raise ImportError("rlrp_fast's figures need matplotlib, the optional 'viz' extra")

    monkeypatch.setattr(rlrp_fast.viz, "require_matplotlib", missing)
    _write_images(tmp_path / "imgs", 1)
    code, _, stderr = _run(capsys, tmp_path / "imgs", "--model", "resnet18", "--out",
                           tmp_path / "out")
    assert code == 2 and stderr.count("\n") == 1 and "--format npy" in stderr
