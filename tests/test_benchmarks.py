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
    """`train_speed.py --quick` on one of ours and one peer: tokens/s from real steps, the profiled kernel time
    within the step, and a ceiling ratio no lower than the measured ratio's kernel-bound share."""
    result = subprocess.run([sys.executable, "benchmarks/train_speed.py", "--quick", "--systems", "rmt,rmt-pytorch",
                             "--results-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "train_speed_quick.json").read_text())
    ours, peer = data["systems"]["rmt"], data["systems"]["rmt-pytorch"]
    for rec in (ours, peer):
        assert rec["loss_finite"] and len(rec["times_s"]) == 2
        assert 0 < rec["kernel_s"] <= rec["profiled_step_s"]
        assert rec["tokens_per_s"] == rec["tokens_per_step"] / rec["seconds_per_step"]
    [row] = data["comparisons"]
    assert row["fastest_peer"] == "rmt-pytorch"
    assert row["speed_ratio"] == ours["tokens_per_s"] / peer["tokens_per_s"]
    assert row["ceiling_ratio"] == peer["seconds_per_step"] / ours["kernel_s"]
    assert "| rmt | rmt-pytorch (of rmt-pytorch) |" in report.render_train_speed(data, small=True)
