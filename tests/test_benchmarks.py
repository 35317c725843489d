"""The benchmark scripts run and write what the README shows; the README tables are the reports of the saved
results (never typed by hand)."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import render_probes  # noqa: E402
import render_speed  # noqa: E402
import report  # noqa: E402


def copy_readmes(tmp_path: Path) -> tuple[Path, Path]:
    """README.md and benchmarks/README.md copied into `tmp_path`, laid out as in the repository."""
    readme, bench_readme = tmp_path / "README.md", tmp_path / "benchmarks" / "README.md"
    bench_readme.parent.mkdir()
    shutil.copy(ROOT / "README.md", readme)
    shutil.copy(ROOT / "benchmarks" / "README.md", bench_readme)
    return readme, bench_readme


def test_readme_tables_are_the_reports_of_the_saved_results(tmp_path):
    readme, bench_readme = copy_readmes(tmp_path)
    report.main(["--write-readme", "--readme", str(readme), "--readme", str(bench_readme), "--root", str(tmp_path)])
    for written, original in ((readme, ROOT / "README.md"), (bench_readme, ROOT / "benchmarks" / "README.md")):
        assert written.read_text() == original.read_text(), (
            f"{original} differs from `python benchmarks/report.py --write-readme`: rerun it after a benchmark")


def block(text: str, name: str) -> str:
    return re.search(rf"<!-- bench:{name} -->\n(.*?)\n<!-- /bench:{name} -->", text, re.S).group(1)


def test_write_readme_fills_each_block_in_the_file_that_holds_its_marker(tmp_path, capsys):
    """Stale blocks in both files are replaced by the reports of the results, each in the file that holds its
    markers, with the figures' links made relative to that file; the text around them stays; a result whose
    markers are in neither file is named."""
    readme, bench_readme = copy_readmes(tmp_path)
    results = tmp_path / "results"
    results.mkdir()
    for name in ("capacity.json", "train_speed.json", "babilong_zeroshot.json", "tokenize_throughput.json"):
        shutil.copy(ROOT / "benchmarks" / "results" / name, results / name)
    stale = {readme: ["capacity"], bench_readme: ["train_speed", "babilong_zeroshot"]}
    for path, names in stale.items():
        text = path.read_text()
        for name in names:
            text = text.replace(block(text, name), f"stale {name} table")
        text = text.replace("<!-- bench:tokenize -->", "").replace("<!-- /bench:tokenize -->", "")
        path.write_text(text)
    before = {path: path.read_text() for path in stale}
    report.main(["--write-readme", "--results-dir", str(results), "--readme", str(readme), "--readme",
                 str(bench_readme), "--root", str(tmp_path)])
    err = capsys.readouterr().err
    data = {name: json.loads((results / f"{file}.json").read_text()) for name, file in
            (("capacity", "capacity"), ("train_speed", "train_speed"), ("babilong_zeroshot", "babilong_zeroshot"))}
    assert block(readme.read_text(), "capacity") == render_probes.render_capacity(data["capacity"], False)
    assert block(bench_readme.read_text(), "train_speed") == render_speed.render_train_speed(data["train_speed"], False)
    zeroshot = render_probes.render_babilong_zeroshot(data["babilong_zeroshot"], False)
    assert "](benchmarks/results/babilong_zeroshot.png)" in zeroshot
    assert block(bench_readme.read_text(), "babilong_zeroshot") == zeroshot.replace(
        "](benchmarks/results/babilong_zeroshot.png)", "](results/babilong_zeroshot.png)")
    for path in stale:  # outside the blocks nothing changed
        outside = re.sub(r"<!-- bench:(\w+) -->.*?<!-- /bench:\1 -->", "", path.read_text(), flags=re.S)
        assert outside == re.sub(r"<!-- bench:(\w+) -->.*?<!-- /bench:\1 -->", "", before[path], flags=re.S)
        assert "stale" not in path.read_text()
    assert f"{readme}: replaced ['capacity']" in err
    assert f"{bench_readme}: replaced ['train_speed', 'babilong_zeroshot']" in err
    assert "no markers for ['tokenize']" in err


@pytest.mark.slow
def test_full_attention_memory_benchmark_compares_live_bytes(tmp_path):
    """`full_attention_memory.py --quick` with stm-full and hf-llama at 256 tokens: every position's logits, the
    live and resident peaks, the ratio in the comparisons equal to the figures' quotient, and the goal judged on
    them; merging a second run keeps the first's entries."""
    def run(*args):
        result = subprocess.run([sys.executable, "benchmarks/full_attention_memory.py", "--quick", "--lengths", "256",
                                 "--results-dir", str(tmp_path), *args], cwd=ROOT, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads((tmp_path / "full_attention_memory_quick.json").read_text())

    run("--systems", "stm-full")
    data = run("--systems", "hf-llama", "--merge")
    assert list(data["results"]) == ["stm-full", "hf-llama"]
    ours, peer = data["results"]["stm-full"]["256"], data["results"]["hf-llama"]["256"]
    for entry in (ours, peer):
        assert entry["logits_shape"] == [1, 256, 256] and entry["live"]["peak_live_bytes"] > 0
        assert entry["rss"]["method"] == "rss_high_water"
    [row] = data["comparisons"]
    assert (row["ours"], row["peer"], row["tokens"]) == ("stm-full", "hf-llama", 256)
    assert row["live_ratio"] == ours["live"]["peak_live_bytes"] / peer["live"]["peak_live_bytes"]
    assert data["meets_goal"] == (ours["live"]["peak_live_bytes"] <= peer["live"]["peak_live_bytes"])
    rendered = render_speed.render_full_attention_memory(data, small=True)
    assert f"| **stm-full** | {ours['live']['peak_live_bytes'] / 2**20:.1f} / " in rendered


@pytest.mark.slow
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
    rendered = render_speed.render_train_speed(data, small=True)
    assert "| none | hf-llama (of xt-full, hf-llama) |" in rendered and "| none@bf16 | hf-llama@bf16" in rendered
