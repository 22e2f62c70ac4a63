"""Smoke tests of examples/train_multimodal.py (CPU, torch backend, a few seconds).

matplotlib is optional for the example: the checks of the PNG it writes skip without it,
and one test hides matplotlib to check that the run then completes without a plot.
"""

import importlib.util
import pathlib
import sys

import pytest
import torch

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "train_multimodal.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("train_multimodal", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(example, tmp_path, *extra):
    out = tmp_path / "plot.png"
    threads = torch.get_num_threads()
    metrics = example.main(["--device", "cpu", "--backend", "torch", "--out", str(out), "--log-every", "0", *extra])
    assert torch.get_num_threads() == threads          # main() restores the thread setting
    return metrics, out


@pytest.fixture(scope="module")
def short_run(example, tmp_path_factory):
    return _run(example, tmp_path_factory.mktemp("short"), "--steps", "30", "--check-finite")


def test_short_run_learns(short_run):
    metrics, _ = short_run
    assert metrics["final_loss"] < 0.6 * metrics["first_loss"]
    assert metrics["history"]["pos_prob"][-1] > 2 * metrics["history"]["pos_prob"][0]
    assert metrics["r1_after"]["text"] > metrics["r1_before"]["text"] + 0.2
    assert metrics["spikes"] == 0 and metrics["optimizer_steps"] == 30
    assert metrics["feature_dtype"] == "float32"


def test_short_run_writes_the_plot(short_run):
    pytest.importorskip("matplotlib")
    metrics, out = short_run
    assert metrics["plot"] == str(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_without_matplotlib_the_run_completes_without_a_plot(example, tmp_path, monkeypatch, capsys):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)       # import matplotlib raises ImportError
    metrics, out = _run(example, tmp_path, "--steps", "2")
    assert metrics["plot"] is None and metrics["optimizer_steps"] == 2
    assert not out.exists()
    assert "matplotlib is not installed" in capsys.readouterr().out


def test_plot_paths(example, tmp_path, monkeypatch):
    # The default is the current directory: a run must not overwrite the README's figure.
    monkeypatch.chdir(tmp_path)
    assert example.parse_args([]).plot_path == "train_multimodal.png"
    assert example.parse_args(["--out", "x.png"]).plot_path == "x.png"
    assert example.parse_args(["--no-plot"]).plot_path is None
    assert example.parse_args(["--readme-plot"]).plot_path == str(EXAMPLE.with_suffix(".png"))
    with pytest.raises(SystemExit):
        example.parse_args(["--readme-plot", "--out", "x.png"])
    tracked = EXAMPLE.with_suffix(".png").read_bytes()
    metrics = example.main(["--device", "cpu", "--backend", "torch", "--steps", "1", "--log-every", "0"])
    if metrics["plot"] is not None:
        assert (tmp_path / "train_multimodal.png").is_file()
    assert EXAMPLE.with_suffix(".png").read_bytes() == tracked


def test_ignoring_masks_hurts_retrieval(example, tmp_path, short_run):
    # The seed's v2 lesson: null tokens of missing views must not take part in alignment.
    masked, _ = short_run
    unmasked, _ = _run(example, tmp_path, "--steps", "30", "--ignore-masks")
    for m in ("ir", "text"):
        assert unmasked["r1_after"][m] < masked["r1_after"][m] - 0.05
    assert unmasked["final_pos_prob"] < masked["final_pos_prob"] - 0.1


def test_corrupted_batch_is_flagged_and_skipped(example, tmp_path):
    metrics, _ = _run(example, tmp_path, "--steps", "130", "--corrupt-step", "120", "--log-every", "10")
    assert metrics["spike_steps"] == [120]
    assert metrics["optimizer_steps"] == 129
    loss = metrics["history"]["loss"]
    assert loss[119] > 2 * max(loss[100:119])


def test_progress_is_printed_every_step(example, tmp_path, capsys):
    out = tmp_path / "p.png"
    metrics = example.main(["--device", "cpu", "--steps", "3", "--amp", "--out", str(out)])
    assert metrics["feature_dtype"] == "bfloat16"          # --amp: bf16 features, the loss still in fp32
    printed = capsys.readouterr().out
    lines = [l for l in printed.splitlines() if l.startswith("step ")]
    assert [l.split()[1] for l in lines] == ["1/3", "2/3", "3/3"]
    assert all("pos_prob" in l for l in lines)
    assert "done in" in printed


def test_bad_arguments(example, tmp_path):
    with pytest.raises(SystemExit):
        example.main(["--steps", "0", "--out", str(tmp_path / "x.png")])
