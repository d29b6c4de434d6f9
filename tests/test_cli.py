"""The command line: one-line errors with exit code 2, --out's formats and overwrite rules, --version."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")

import rlrp_fast  # noqa: E402
import rlrp_fast.demo  # noqa: E402
import rlrp_fast.evaluate  # noqa: E402
from rlrp_fast.cli import main  # noqa: E402

_SMALL = ["--batch-size", "2", "--n-show", "2"]
_PNG = b"\x89PNG\r\n\x1a\n"


def _run(argv, capsys) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_one_line_error(code: int, out: str, err: str, command: str, *words: str) -> None:
    assert code == 2, (out, err)
    assert out == ""
    assert err.count("\n") == 1 and err.endswith("\n"), err
    prog = f"rlrp-fast {command}" if command else "rlrp-fast"
    assert err.startswith(f"{prog}: error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in err, (word, err)


@pytest.fixture
def no_demo(monkeypatch):
    """Fails the test if the demo runs: a refused --out must be refused before any work."""
    def refuse(**_):
        raise AssertionError("run_demo ran for an --out that should have been refused")
    monkeypatch.setattr(rlrp_fast.demo, "run_demo", refuse)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    """Runs the test inside a fresh working directory (the overwrite rules depend on it)."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


# ---------------------------------------------------------------- --out that cannot be written


@pytest.mark.parametrize("out, words", [
    ("adir", ["'adir' is a directory", "adir/rlrp_demo.png"]),
    ("adir/", ["is a directory"]),
    ("", ["--out is empty"]),
    ("file.txt/x.png", ["'file.txt' is not a directory"]),
    ("missing/x.png", ["'missing' does not exist"]),
    ("x.bmp", ["'.bmp'", ".png, .jpg, .jpeg, .pdf, .svg"]),
    ("x", ["no extension"]),
    ("a" * 300 + ".png", ["too long"]),
])
def test_unwritable_out_is_a_one_line_error(in_tmp, no_demo, capsys, out, words):
    (in_tmp / "adir").mkdir()
    (in_tmp / "file.txt").write_text("keep me")
    _assert_one_line_error(*_run(["demo", "--out", out], capsys), "demo", *words)
    assert sorted(p.name for p in in_tmp.iterdir()) == ["adir", "file.txt"]  # nothing written
    assert (in_tmp / "file.txt").read_text() == "keep me"
    assert not any((in_tmp / "adir").iterdir())


def test_a_fifo_is_never_overwritten_even_with_force(in_tmp, no_demo, capsys):
    os.mkfifo(in_tmp / "pipe.png")
    _assert_one_line_error(*_run(["demo", "--out", "pipe.png", "--force"], capsys), "demo",
                           "not a regular file")


def test_a_failed_write_is_a_one_line_error(in_tmp, monkeypatch, capsys):
    def fail(**_):
        raise PermissionError(13, "Permission denied", "x.png")
    monkeypatch.setattr(rlrp_fast.demo, "run_demo", fail)
    _assert_one_line_error(*_run(["demo", "--out", "x.png"], capsys), "demo", "Permission denied")


def test_ctrl_c_is_one_line_and_exit_code_130(in_tmp, monkeypatch, capsys):
    def interrupted(**_):
        raise KeyboardInterrupt
    monkeypatch.setattr(rlrp_fast.demo, "run_demo", interrupted)
    code, out, err = _run(["demo", "--out", "x.png"], capsys)
    assert code == 130 and out == "" and err == "rlrp-fast demo: interrupted\n"


# ---------------------------------------------------------------- formats


@pytest.mark.parametrize("name, magic", [
    ("d.png", _PNG), ("d.PNG", _PNG), ("d.jpg", b"\xff\xd8\xff"), ("d.jpeg", b"\xff\xd8\xff"),
    ("d.pdf", b"%PDF-"), ("d.svg", None),
])
def test_out_extension_picks_the_format(in_tmp, capsys, name, magic):
    code, out, err = _run(["demo", "--out", name, *_SMALL], capsys)
    assert code == 0, err
    data = (in_tmp / name).read_bytes()
    if magic is None:
        assert b"<svg" in data[:1024]
    else:
        assert data.startswith(magic)
    assert f"heatmaps: {in_tmp / name}" in out
    assert [p.name for p in in_tmp.iterdir()] == [name]  # no temporary file left behind


# ---------------------------------------------------------------- overwriting and --force


def test_an_earlier_figure_in_the_working_tree_is_overwritten(in_tmp, capsys):
    (in_tmp / "old.png").write_bytes(_PNG + b"an earlier demo")
    code, _, err = _run(["demo", "--out", "old.png", *_SMALL], capsys)
    assert code == 0, err
    assert (in_tmp / "old.png").read_bytes().startswith(_PNG)
    assert b"an earlier demo" not in (in_tmp / "old.png").read_bytes()


@pytest.mark.parametrize("content", [b"my notes", b""])
def test_a_file_that_is_not_a_figure_needs_force(in_tmp, capsys, content):
    notes = in_tmp / "notes.png"  # the name says PNG, the content does not
    notes.write_bytes(content)
    _assert_one_line_error(*_run(["demo", "--out", "notes.png", *_SMALL], capsys), "demo",
                           "not a PNG, JPEG, PDF or SVG", "--force")
    assert notes.read_bytes() == content
    code, _, err = _run(["demo", "--out", "notes.png", "--force", *_SMALL], capsys)
    assert code == 0, err
    assert notes.read_bytes().startswith(_PNG)


def test_a_symlink_needs_force_and_then_the_link_is_replaced_not_its_target(in_tmp, capsys):
    target = in_tmp / "target.png"
    target.write_bytes(_PNG + b"the target")
    (in_tmp / "link.png").symlink_to(target)
    _assert_one_line_error(*_run(["demo", "--out", "link.png", *_SMALL], capsys), "demo",
                           "symbolic link", "--force")
    assert (in_tmp / "link.png").is_symlink()
    code, _, err = _run(["demo", "--out", "link.png", "--force", *_SMALL], capsys)
    assert code == 0, err
    assert not (in_tmp / "link.png").is_symlink()
    assert (in_tmp / "link.png").read_bytes().startswith(_PNG)
    assert target.read_bytes() == _PNG + b"the target"


def test_a_dangling_symlink_needs_force(in_tmp, no_demo, capsys):
    (in_tmp / "dangling.png").symlink_to(in_tmp / "nowhere.png")
    _assert_one_line_error(*_run(["demo", "--out", "dangling.png"], capsys), "demo",
                           "symbolic link")
    assert not (in_tmp / "nowhere.png").exists()


def test_an_existing_file_outside_the_working_tree_needs_force(in_tmp, capsys):
    outside = in_tmp.parent / "outside.png"
    outside.write_bytes(_PNG + b"someone else's")
    _assert_one_line_error(*_run(["demo", "--out", str(outside), *_SMALL], capsys), "demo",
                           "outside the current directory", "--force")
    assert outside.read_bytes() == _PNG + b"someone else's"
    # ../ spelled relative to the working directory is outside too.
    _assert_one_line_error(*_run(["demo", "--out", "../outside.png", *_SMALL], capsys), "demo",
                           "outside the current directory")
    code, _, err = _run(["demo", "--out", str(outside), "--force", *_SMALL], capsys)
    assert code == 0, err
    assert b"someone else's" not in outside.read_bytes()


def test_a_new_file_outside_the_working_tree_is_written(in_tmp, capsys):
    new = in_tmp.parent / "new.png"
    code, _, err = _run(["demo", "--out", str(new), *_SMALL], capsys)
    assert code == 0, err
    assert new.read_bytes().startswith(_PNG)


# ---------------------------------------------------------------- evaluate


@pytest.mark.parametrize("size", ["32", "40", "1000"])
def test_evaluate_refuses_a_patch_as_large_as_the_image(monkeypatch, capsys, size):
    def refuse(**_):
        raise AssertionError("evaluate ran with a patch that does not fit")
    monkeypatch.setattr(rlrp_fast.evaluate, "evaluate_default", refuse)
    _assert_one_line_error(*_run(["evaluate", "--patch-size", size], capsys), "evaluate",
                           f"--patch-size {size}", "32x32", "at most 31")


def test_evaluate_accepts_the_largest_patch_that_fits(monkeypatch, capsys):
    seen = {}

    def fake(**kwargs):
        seen.update(kwargs)
        return "| table |", {}
    monkeypatch.setattr(rlrp_fast.evaluate, "evaluate_default", fake)
    code, out, err = _run(["evaluate", "--patch-size", "31", "--no-progress"], capsys)
    assert code == 0, err
    assert seen["patch_size"] == 31 and "| table |" in out


# ---------------------------------------------------------------- argparse errors, --version


@pytest.mark.parametrize("argv, command, words", [
    ([], "", ["required: COMMAND"]),
    (["demo", "--batch-size", "x"], "demo", ["--batch-size", "'x'"]),
    (["demo", "--bogus"], "", ["unrecognized arguments: --bogus"]),  # argparse: top level
    (["evaluate", "--patch-size", "0"], "evaluate", ["--patch-size"]),
    (["nope"], "", ["'nope'"]),
])
def test_usage_errors_are_one_line(capsys, argv, command, words):
    code, out, err = _run(argv, capsys)
    _assert_one_line_error(code, out, err, command, *words, "--help")


def test_version(capsys):
    code, out, err = _run(["--version"], capsys)
    assert code == 0 and err == ""
    assert out == f"rlrp-fast {rlrp_fast.__version__}\n"


def test_the_real_process_exits_2_with_one_line_and_prints_its_version(tmp_path):
    (tmp_path / "adir").mkdir()

    def cli(*argv):
        return subprocess.run([sys.executable, "-m", "rlrp_fast", *argv], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
    bad = cli("demo", "--out", "adir")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.count("\n") == 1 and "is a directory" in bad.stderr, bad.stderr
    version = cli("--version")
    assert version.returncode == 0 and version.stdout.strip().endswith(rlrp_fast.__version__)
