"""The benchmark scripts run and write what the README shows; the README tables are the reports of the saved
results (never typed by hand)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import report  # noqa: E402


def test_readme_tables_are_the_reports_of_the_saved_results(tmp_path):
    readme = tmp_path / "README.md"
    shutil.copy(ROOT / "README.md", readme)
    report.main(["--write-readme", "--readme", str(readme)])
    assert readme.read_text() == (ROOT / "README.md").read_text(), (
        "README.md differs from `python benchmarks/report.py --write-readme`: rerun it after a benchmark")


def test_training_speed_benchmark_reports_kernel_time_and_ceiling(tmp_path):
    """`train_speed.py --quick --precision fp32,bf16` on one of ours and one peer (Hugging Face Llama: the other
    peers come from benchmarks/requirements.txt): tokens/s from real steps, the profiled kernel time within the
    step, the ceiling ratio, each precision compared with its own, and the bf16 speed-up of each system."""
    result = subprocess.run([sys.executable, "benchmarks/train_speed.py", "--quick", "--systems", "none,hf-llama",
                             "--precision", "fp32,bf16", "--results-dir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "train_speed_quick_fp32_bf16.json").read_text())
    assert set(data["systems"]) == {"none", "hf-llama", "none@bf16", "hf-llama@bf16"}
    assert not {k: r["error"] for k, r in data["systems"].items() if "error" in r}
    for rec in data["systems"].values():
        assert rec["loss_finite"] and len(rec["times_s"]) == 2
        assert 0 < rec["kernel_s"] <= rec["profiled_step_s"]
        assert rec["tokens_per_s"] == rec["tokens_per_step"] / rec["seconds_per_step"]
    assert [(c["ours"], c["fastest_peer"]) for c in data["comparisons"]] == [("none", "hf-llama"),
                                                                            ("none@bf16", "hf-llama@bf16")]
    for row in data["comparisons"]:
        ours, peer = data["systems"][row["ours"]], data["systems"][row["fastest_peer"]]
        assert row["speed_ratio"] == ours["tokens_per_s"] / peer["tokens_per_s"]
        assert row["ceiling_ratio"] == peer["seconds_per_step"] / ours["kernel_s"]
    step_s = {name: rec["seconds_per_step"] for name, rec in data["systems"].items()}
    assert data["bf16_speedups"]["none"] == step_s["none"] / step_s["none@bf16"]
    rendered = report.render_train_speed(data, small=True)
    assert "| none | hf-llama (of xt-full, hf-llama) |" in rendered and "| none@bf16 | hf-llama@bf16" in rendered
