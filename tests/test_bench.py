"""The benchmark harness (benchmarks/harness, not installed with the library): the matrix, the
peers' agreement with normcore, and the `python -m benchmarks.harness` command with a tiny time
budget. No timing is asserted."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from normcore.__main__ import main as normcore_main

# The harness is the package benchmarks.harness of the checkout's root, which `pytest` does not
# put on sys.path (appended: an installed normcore still comes first).
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from benchmarks.harness import cases, peers, runner  # noqa: E402 - after the root is on the path
from benchmarks.harness.runner import main as cli_main  # noqa: E402

SMALL = (4, 8, 5, 6)
SMALL_ROWS = (16, 32)
TINY_BUDGET = ["--min-time", "0", "--repeat", "1", "--copy-mib", "4"]


# -- the matrix ------------------------------------------------------------------------------

def test_every_layer_has_modes_shapes_and_traffic():
    full = cases.all_cases()
    for layer in cases.LAYERS:
        mine = [c for c in full if c.layer == layer]
        assert mine, layer
        assert {c.mode for c in mine} == set(cases.modes_for(layer))
        assert {c.shape for c in mine} == {s for _, s in cases.shapes_for(layer)}
        for c in mine:
            assert c.traffic_bytes() > 0
            assert c.traffic_bytes() % c.nbytes() == 0
    assert len(set(full)) == len(full)


def test_quick_subset_of_full():
    full = set(cases.all_cases())
    quick = cases.all_cases(quick=True)
    assert quick and set(quick) < full
    assert {c.layer for c in quick} == set(cases.LAYERS)


def test_traffic_formula():
    shape = (2, 3, 4, 4)
    B = 2 * 3 * 4 * 4 * 4
    assert cases.traffic_bytes("instance_norm", "forward", shape) == 2 * B
    assert cases.traffic_bytes("batch_norm", "eval", shape) == 2 * B
    assert cases.traffic_bytes("batch_norm", "train", shape) == 3 * B
    assert cases.traffic_bytes("switchable_norm", "train", shape) == 3 * B
    assert cases.traffic_bytes("group_norm", "fwd+bwd", shape) == 5 * B
    assert cases.traffic_bytes("batch_norm", "fwd+bwd", shape) == 8 * B
    assert cases.traffic_bytes("layer_norm", "fwd+bwd", shape, itemsize=8) == 10 * B
    with pytest.raises(ValueError, match="modes"):
        cases.traffic_bytes("group_norm", "eval", shape)
    with pytest.raises(ValueError, match="batch_norm"):
        cases.all_cases(layers=["nope"])


def test_shapes_named_in_the_issue():
    assert dict(cases.shapes_for("layer_norm"))["rows_4096"] == (4096, 4096)
    assert all(len(s) == 4 for _, s in cases.shapes_for("batch_norm"))
    assert [cases.group_count(c) for c in (3, 8, 64, 96, 100)] == [1, 8, 32, 32, 4]


# -- the peers -------------------------------------------------------------------------------

PEER_CASES = [(layer, mode, SMALL) for layer in cases.LAYERS for mode in cases.modes_for(layer)]
PEER_CASES += [("layer_norm", mode, SMALL_ROWS) for mode in cases.modes_for("layer_norm")]


@pytest.mark.parametrize("layer,mode,shape", PEER_CASES, ids=[f"{l}-{m}-{len(s)}d" for l, m, s in PEER_CASES])
def test_peers_agree_with_normcore(layer, mode, shape):
    """Forward y (and dx for fwd+bwd) of every installed peer equals normcore's."""
    with peers.set_threads(1):
        diffs = peers.cross_check(layer, mode, shape)
    expected = {impl for impl in peers.available_peers() if impl != "normcore" and peers.supports(impl, layer, mode)}
    assert set(diffs) == expected
    assert ("numpy" in diffs) == (layer != "switchable_norm")  # numpy: every layer but SwitchableNorm


def test_lrn_backward_of_the_numpy_peer_with_a_strong_alpha(monkeypatch):
    # With alpha = 1e-4 the window term of dx is tiny; make it matter.
    monkeypatch.setattr(peers, "LRN_ALPHA", 2.0)
    with peers.set_threads(1):
        assert "numpy" in peers.cross_check("local_response_norm", "fwd+bwd", (3, 9, 4, 5))


def test_peer_errors_and_support():
    assert peers.available_peers()[0] == "normcore" and "numpy" in peers.available_peers()
    assert not peers.supports("onnxruntime", "batch_norm", "train")
    assert peers.supports("onnxruntime", "batch_norm", "eval")
    assert not peers.supports("onnxruntime", "switchable_norm", "eval")
    assert not peers.supports("numpy", "switchable_norm", "train")  # its NumPy formula is tests/reference.py
    with pytest.raises(peers.UnsupportedCase):
        peers.make("onnxruntime", "group_norm", "fwd+bwd", SMALL)
    with pytest.raises(ValueError, match="normcore, torch, onnxruntime, numpy"):
        peers.make("tensorflow", "group_norm", "forward", SMALL)
    with pytest.raises(ValueError, match="modes"):
        peers.make("normcore", "group_norm", "train", SMALL)


def test_missing_peer_is_reported_not_raised(monkeypatch):
    monkeypatch.setitem(peers._import_errors, "onnx", "onnx is not installed (test)")
    monkeypatch.delitem(sys.modules, "onnx", raising=False)
    assert "pip install onnxruntime onnx" in peers.unavailable_reason("onnxruntime")
    assert "onnxruntime" not in peers.available_peers()
    with pytest.raises(peers.PeerUnavailable):
        peers.make("onnxruntime", "layer_norm", "forward", SMALL_ROWS)


def test_set_threads_sets_and_restores():
    import normcore as nc

    before = nc.get_num_threads()
    with peers.set_threads(1) as n:
        assert n == 1 and nc.get_num_threads() == 1 and peers.current_threads() == 1
    assert nc.get_num_threads() == before
    with pytest.raises(ValueError):
        peers.set_threads(0)


def test_time_call_and_progress():
    calls = []
    t = runner.time_call(lambda: calls.append(1), min_time=0, repeat=2)
    assert t.reps == 2 and t.best <= t.median and len(calls) == 1 + 2 * t.number
    assert runner.format_time(12e-6) == "12.0 µs" and runner.format_time(0.01234) == "12.34 ms"

    class Tty:
        text = ""

        def isatty(self):
            return True

        def write(self, s):
            self.text += s

        def flush(self):
            pass

    out = Tty()
    bar = runner.Progress(4, stream=out, width=10)
    bar.update(2, "batch_norm train (2,3,4,4)")
    assert "\r[#####.....] 2/4 batch_norm train (2,3,4,4)" in out.text
    bar.close()
    quiet = runner.Progress(4, stream=Tty(), enabled=False)
    quiet.update(1)
    assert quiet.stream.text == ""


# -- the command -----------------------------------------------------------------------------

def test_bench_command_in_a_subprocess(tmp_path):
    md, png = tmp_path / "BENCH.md", tmp_path / "bench.png"
    argv = ["--quick", "--threads", "1", "--layers", "batch_norm", "--impls", "normcore", "numpy",
            *TINY_BUDGET, "--markdown", str(md)]
    has_mpl = importlib.util.find_spec("matplotlib") is not None
    if has_mpl:
        argv += ["--plot", str(png)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    done = subprocess.run([sys.executable, "-m", "benchmarks.harness", *argv], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "CPU:" in out and "copy bandwidth" in out and "numpy" in out
    assert "== batch_norm ==" in out
    header = next(line for line in out.splitlines() if line.startswith("shape"))
    assert header.split() == ["shape", "mode", "threads", "normcore", "numpy", "GB/s", "of", "copy", "vs", "numpy"]
    rows = [line for line in out.splitlines() if line.startswith("(")]
    assert len(rows) == len(cases.all_cases(quick=True, layers=["batch_norm"]))
    assert {r.split()[1] for r in rows} == {"train", "eval", "fwd+bwd"}
    assert "[" not in done.stderr  # no progress bar when stderr is not a terminal

    text = md.read_text(encoding="utf-8")
    assert text.startswith("# normcore benchmarks")
    assert "python -m benchmarks.harness --quick --threads 1" in text
    assert "| shape | mode | threads | normcore | numpy | GB/s | of copy | vs numpy |" in text
    assert "## batch_norm" in text and "CPU:" in text
    if has_mpl:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "](bench.png)" in text


def test_bench_main_with_unavailable_and_unsupported_cells(capsys, monkeypatch):
    monkeypatch.setitem(peers._import_errors, "torch", "torch is not installed (test)")
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    monkeypatch.setattr(cases, "QUICK_SHAPES", ("seed", "rows_768"))
    argv = ["--quick", "--threads", "1", "--layers", "group_norm", "--impls", "normcore", "torch",
            "onnxruntime", *TINY_BUDGET]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("(2,3,4,4)")]
    assert [r[1] for r in rows] == ["forward", "fwd+bwd"]
    assert rows[0][5] == "n/a" and rows[1][5] == "n/a"  # torch not installed
    assert rows[1][6] == "-"  # onnxruntime has no backward
    assert "not installed: torch" in out


@pytest.mark.parametrize("args,words", [
    (["--layers", "batch_nrom"], ["invalid choice", "batch_norm", "switchable_norm"]),
    (["--impls", "jax"], ["invalid choice", "normcore", "onnxruntime", "numpy"]),
    (["--threads", "0"], ["--threads", "at least 1"]),
    (["--threads", "two"], ["--threads", "positive number"]),
    (["--min-time", "-1"], ["--min-time"]),
])
def test_bad_arguments_exit_2(capsys, args, words):
    with pytest.raises(SystemExit) as exc:
        cli_main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err


def test_plot_without_matplotlib_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(SystemExit) as exc:
        cli_main(["--quick", "--plot", str(tmp_path / "x.png")])
    assert "pip install matplotlib" in str(exc.value.code)


def test_demo_still_there(capsys):
    assert normcore_main(["demo"]) in (0, None)
    assert capsys.readouterr().out


def test_the_library_has_no_bench_command_but_says_where_it_went():
    with pytest.raises(SystemExit) as exc:
        normcore_main(["bench", "--quick"])
    assert "python -m benchmarks.harness" in str(exc.value.code)
