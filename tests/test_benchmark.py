"""benchmark.py runs every part it promises and reports it."""
import json

import benchmark


def test_benchmark_reports_its_figures(tmp_path, capsys):
    from synthetic import write_synthetic
    write_synthetic(tmp_path / "data", patients=3, style="mri", seed=1)
    benchmark.main(["--data", str(tmp_path / "data"), "--batch-size", "4", "--image-size", "32", "--width", "4",
                    "--steps", "2", "--warmup", "1", "--workers", "0", "--json", str(tmp_path / "b.json")])
    saved = json.loads((tmp_path / "b.json").read_text())
    for key in ("matmul_flops", "model_slices_per_s", "model_flops", "mfu", "full_slices_per_s", "overhead_ratio",
                "per_sample_slices_per_s", "chd_pretraining_hours", "peak_host_memory_mb"):
        assert saved[key] > 0, key
    out = capsys.readouterr().out
    for line in ("matmul (the peak)", "model alone", "MFU", "full step", "overhead ratio", "per-sample pipeline",
                 "CHD pretraining", "hours (300 epochs of 17,000 slices"):
        assert line in out, line
