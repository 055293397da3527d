"""benchmark.py runs every part it promises and reports it, alone or as a suite."""
import json
from types import SimpleNamespace

import pytest
import torch

import benchmark


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    from synthetic import write_synthetic
    root = tmp_path_factory.mktemp("bench")
    return ["--data", str(write_synthetic(root / "data", patients=3, style="mri", seed=1)), "--batch-size", "4",
            "--image-size", "32", "--width", "4", "--steps", "2", "--warmup", "1", "--workers", "0"]


def test_benchmark_reports_its_figures(small, tmp_path, capsys):
    benchmark.main(small + ["--json", str(tmp_path / "b.json")])
    saved = json.loads((tmp_path / "b.json").read_text())
    for key in ("matmul_flops", "loader_slices_per_s", "model_slices_per_s", "model_flops", "mfu", "full_slices_per_s",
                "overhead_ratio", "per_sample_slices_per_s", "chd_pretraining_hours", "save_held_ms", "save_ms",
                "peak_host_memory_mb"):
        assert saved[key] > 0, key
    assert saved["save_held_ms"] <= saved["save_ms"]  # the write goes on after the loop is let go
    out = capsys.readouterr().out
    for line in ("matmul (the peak)", "loader alone", "model alone", "MFU", "full step", "overhead ratio",
                 "per-sample pipeline", "CHD pretraining", "hours (300 epochs of 17,000 slices",
                 "ms holding the loop, of"):
        assert line in out, line


def test_a_suite_measures_each_row_with_its_flags_and_tabulates_them(small, tmp_path, capsys, monkeypatch):
    rows = ["--width 8", "--image-size 48 --device cuda", "--image-size 64 --read-every-step"]
    monkeypatch.setitem(benchmark.SUITES, "gpu", rows)
    done = benchmark.main(small + ["--suite", "gpu", "--json", str(tmp_path / "s.json")])
    assert [(r["config"]["width"], r["config"]["image_size"], r["config"]["read_every_step"])
            for i, (_, r) in enumerate(done) if i != 1] == [(8, 32, False), (4, 64, True)]  # the row's flags win
    assert "error" in done[1][1] and "CUDA" in done[1][1]["error"]  # a failing row is reported, the next still runs
    assert [r["flags"] for r in json.loads((tmp_path / "s.json").read_text())] == rows
    table = capsys.readouterr().out.split("suite gpu on cpu")[1].splitlines()
    assert table[1].startswith("| config | loader | model alone | full step | overhead | MFU |")
    assert table[3].startswith("| --width 8 | ") and table[4].startswith("| --image-size 48 --device cuda | failed: ")
    assert table[5].startswith("| --image-size 64 --read-every-step | ")


def test_benchmark_figures_follow_their_formulas(small, monkeypatch):
    """With the timings fixed (matmul, loader, model alone, full step: 2, 0.5, 0.25, 0.4 s per call), every
    figure is its documented formula: matmul 2 n^3 / t (n = 2048 on a CPU), slices/s B / t, MFU the model's
    FLOP/s over the matmul's, overhead model alone / full step, CHD hours 17,000 x 300 slices at the full step."""
    times = iter([2.0, 0.5, 0.25, 0.4])
    monkeypatch.setattr(benchmark, "timed", lambda step, steps, warmup, device: next(times))
    r = benchmark.main(small + ["--skip-per-sample", "--device", "cpu"])
    assert r["matmul_flops"] == pytest.approx(2 * 2048 ** 3 / 2.0)
    assert (r["loader_slices_per_s"], r["model_slices_per_s"], r["full_slices_per_s"]) == pytest.approx((8, 16, 10))
    assert r["model_flops"] > 0 and r["mfu"] == pytest.approx(r["model_flops"] / r["matmul_flops"])
    assert r["overhead_ratio"] == pytest.approx(1.6)
    assert r["chd_pretraining_hours"] == pytest.approx(17_000 * 300 / 10 / 3600)


def test_per_sample_flops_and_memory_figures_follow_their_formulas(small, monkeypatch):
    """Timings fixed as above, the per-sample step 0.8 s (B = 4: 5 slices/s, the full step 2x faster); one GFLOP per
    forward of the network while counted (one model step: 1e9 / 0.25 s = 4 GFLOP/s); ru_maxrss 3 GiB in KiB: 3072 MB."""
    times, forwards, counting = iter([2.0, 0.5, 0.25, 0.4, 0.8]), [], []

    class Counter:  # FlopCounterMode's interface: 1e9 FLOP per forward of the network inside it
        def __init__(self, display):
            pass

        def __enter__(self):
            counting.append(True)
            return self

        def __exit__(self, *error):
            counting.clear()

        def get_total_flops(self):
            return 1e9 * len(forwards)

    def build(config, real=benchmark.build_pretrainer):
        net = real(config)
        net.register_forward_hook(lambda *_: forwards.append(1) if counting else None)
        return net
    monkeypatch.setattr(benchmark, "timed", lambda step, steps, warmup, device: next(times))
    monkeypatch.setattr(benchmark, "FlopCounterMode", Counter)
    monkeypatch.setattr(benchmark, "build_pretrainer", build)
    monkeypatch.setattr(benchmark, "resource", SimpleNamespace(
        RUSAGE_SELF=0, getrusage=lambda who: SimpleNamespace(ru_maxrss=3 * 2**20)))
    r = benchmark.main(small + ["--device", "cpu"])
    assert (r["per_sample_slices_per_s"], r["speedup_over_per_sample"]) == pytest.approx((5, 2))
    assert (r["model_flops"], r["mfu"]) == pytest.approx((4e9, 4e9 / (2 * 2048 ** 3 / 2.0)))
    assert r["peak_host_memory_mb"] == 3072


def test_timed_leaves_out_the_warmup_calls(monkeypatch):
    """3 warmup calls of 10 s (compiling, say), then 4 timed calls of 1 s each: 1 s per call, 7 calls in all."""
    clock, calls = [0.0], []

    def step():
        calls.append(clock[0])
        clock[0] += 10.0 if len(calls) <= 3 else 1.0
    monkeypatch.setattr(benchmark, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    assert benchmark.timed(step, 4, 3, torch.device("cpu")) == 1.0 and len(calls) == 7


def test_a_checkpoint_save_is_timed_held_and_whole(monkeypatch):
    """Saves that hold the loop 3, 2, 4 s and are written 5, 6, 1 s after: the fastest held 2 s, the fastest whole
    save 5 s (of 8, 8, 5)."""
    clock, held, written = [0.0], iter([3.0, 2.0, 4.0]), iter([5.0, 6.0, 1.0])

    class Run:
        def __init__(self, *config):
            pass

        def save(self, *state):
            clock[0] += next(held)

        def wait(self):
            clock[0] += next(written)
    monkeypatch.setattr(benchmark, "Run", Run)
    monkeypatch.setattr(benchmark, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    net = torch.nn.Linear(2, 2)
    assert benchmark.checkpoint_ms(net, torch.optim.SGD(net.parameters(), lr=0.1), None) == (2000.0, 5000.0)


def test_a_batch_the_data_cannot_fill_is_one_line_not_a_hang(small):
    """drop_last leaves no batch of 1000 in a few hundred slices: the loader's endless stream waited forever
    at full CPU without a word. Now one line (in a subprocess, so that a hang fails instead of stalling)."""
    import subprocess
    import sys
    from conftest import REPO
    flags = [*small, "--batch-size", "1000", "--skip-per-sample"]
    done = subprocess.run([sys.executable, "benchmark.py", *flags], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.strip().splitlines()[-1].startswith("error: ")
    assert done.stderr.strip().endswith("cannot fill one batch of 1000") and " slices of " in done.stderr
    with pytest.raises(SystemExit):
        benchmark.main([*small, "--batch-size", "1"])  # as pretrain.py: a contrastive batch needs others
