"""benchmark.py reports every figure it promises, consistently."""
import benchmark


def test_benchmark_reports_its_figures(tmp_path, capsys):
    from synthetic import write_synthetic
    write_synthetic(tmp_path / "data", patients=3, style="mri", seed=1)
    r = benchmark.main(["--data", str(tmp_path / "data"), "--batch-size", "4", "--image-size", "32",
                        "--width", "4", "--steps", "2", "--warmup", "1", "--workers", "0",
                        "--json", str(tmp_path / "b.json")])
    for key in ("matmul_flops", "model_slices_per_s", "model_flops", "full_slices_per_s",
                "per_sample_slices_per_s", "peak_host_memory_mb"):
        assert r[key] > 0, key
    assert abs(r["overhead_ratio"] - r["model_slices_per_s"] / r["full_slices_per_s"]) < 1e-9
    assert abs(r["speedup_over_per_sample"] - r["full_slices_per_s"] / r["per_sample_slices_per_s"]) < 1e-9
    out = capsys.readouterr().out
    assert "overhead ratio" in out and "GFLOP/s" in out and (tmp_path / "b.json").exists()
