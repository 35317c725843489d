"""Render benchmarks/results/*.json as markdown tables (stdout), and optionally into README.md and
benchmarks/README.md.

    python benchmarks/report.py                    # print every section
    python benchmarks/report.py --write-readme     # also replace the sections between markers

Each section is written into whichever of the two files holds its markers (README.md keeps the probes'
headline tables, benchmarks/README.md the rest); a section whose markers are in neither is reported. Sections
are replaced only where both markers already exist, e.g.

    <!-- bench:train_speed -->  ...  <!-- /bench:train_speed -->
    <!-- bench:train_speed_bf16 -->  ...  <!-- /bench:train_speed_bf16 -->
    <!-- bench:stream -->       ...  <!-- /bench:stream -->
    <!-- bench:gpu -->          ...  <!-- /bench:gpu -->

Each table names the command that produced it and the machine, torch version and threads it ran on.
For every benchmark the full-size result (train_speed.json, ...) is used; its --quick/--smoke variant only
when no full-size result exists (and the section says so). Links in a section (the figures) are written
relative to the repository root and made relative to the file they go into.

The renderers, one per section (`RENDER`), live by family in render_speed.py, render_probes.py and
render_tasks.py; what they share (cells, tables, the provenance line) in report_format.py.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from render_probes import (  # noqa: E402
    render_babilong_zeroshot,
    render_capacity,
    render_capacity_variants,
    render_horizon,
    render_horizon_lengths,
)
from render_speed import (  # noqa: E402
    render_full_attention_memory,
    render_gpu,
    render_long_context,
    render_stream,
    render_tokenize,
    render_train_speed,
)
from render_tasks import render_real_tasks, render_real_tasks_summary, render_tasks  # noqa: E402

SECTIONS = {  # README marker name -> (benchmark field, full-size file, small variant)
    "train_speed": ("train_speed", "train_speed.json", "train_speed_quick.json"),
    "train_speed_bf16": ("train_speed", "train_speed_fp32_bf16.json", "train_speed_quick_fp32_bf16.json"),
    "stream": ("stream_inference", "stream_inference.json", "stream_inference_quick.json"),
    "stream_armt_1m": ("stream_inference", "stream_inference_armt_1m.json", "stream_inference_armt_1m_quick.json"),
    "gpu": ("gpu_check", "gpu_check.json", "gpu_check_smoke.json"),
    "tokenize": ("tokenize_throughput", "tokenize_throughput.json", "tokenize_throughput_quick.json"),
    "tasks": ("task_runs", "task_runs.json", "task_runs_quick.json"),
    "horizon": ("horizon", "horizon.json", "horizon_quick.json"),
    "capacity": ("horizon", "capacity.json", "capacity_quick.json"),
    "capacity_armt_k8": ("horizon", "capacity_armt_k8.json", "capacity_armt_k8_quick.json"),
    "horizon_babilong_armt": ("horizon", "horizon_babilong_armt.json", "horizon_babilong_armt_quick.json"),
    "babilong_zeroshot": ("babilong_zeroshot", "babilong_zeroshot.json", "babilong_zeroshot_quick.json"),
    "long_context": ("long_context", "long_context.json", "long_context_quick.json"),
    "full_attention_memory": ("full_attention_memory", "full_attention_memory.json",
                              "full_attention_memory_quick.json"),
    "real_tasks": ("real_tasks", "real_tasks.json", "real_tasks_quick.json"),
    "real_tasks_summary": ("real_tasks", "real_tasks.json", "real_tasks_quick.json"),
}


def load(results_dir: Path, section: str) -> tuple[dict | None, bool]:
    _, full, small = SECTIONS[section]
    for name, is_small in ((full, False), (small, True)):
        path = results_dir / name
        if path.is_file():
            return json.loads(path.read_text()), is_small
    return None, False


RENDER = {"train_speed": render_train_speed, "train_speed_bf16": render_train_speed, "stream": render_stream,
          "stream_armt_1m": render_stream, "gpu": render_gpu, "tokenize": render_tokenize, "tasks": render_tasks,
          "horizon": render_horizon, "capacity": render_capacity, "capacity_armt_k8": render_capacity_variants,
          "horizon_babilong_armt": render_horizon_lengths, "babilong_zeroshot": render_babilong_zeroshot,
          "long_context": render_long_context,
          "full_attention_memory": render_full_attention_memory, "real_tasks": render_real_tasks,
          "real_tasks_summary": render_real_tasks_summary}


LINK = re.compile(r"(!?\[[^\]]*\]\()([^)\s]+)(\))")


def relink(body: str, root: Path, readme: Path) -> str:
    """`body` with its markdown links (relative to the repository `root`) made relative to `readme`'s folder;
    absolute paths, URLs and anchors stay as they are."""
    folder = readme.resolve().parent
    if folder == root.resolve():
        return body

    def fix(m: re.Match) -> str:
        target = m.group(2)
        if re.match(r"[a-z][a-z0-9+.-]*:|#|/", target):
            return m.group(0)
        return m.group(1) + Path(os.path.relpath(root.resolve() / target, folder)).as_posix() + m.group(3)

    return LINK.sub(fix, body)


def write_readme(readme: Path, sections: dict[str, str], root: Path | None = None) -> list[str]:
    """Replace each section between its markers; returns the names replaced (others are left alone). With `root`
    (the folder the sections' links are relative to), the links are made relative to `readme`."""
    text = readme.read_text()
    done = []
    for name, body in sections.items():
        if root is not None:
            body = relink(body, root, readme)
        pattern = re.compile(rf"(<!-- bench:{re.escape(name)} -->)(.*?)(<!-- /bench:{re.escape(name)} -->)", re.S)
        if pattern.search(text):
            text = pattern.sub(lambda m, body=body: f"{m.group(1)}\n{body}\n{m.group(3)}", text, count=1)
            done.append(name)
    if done:
        readme.write_text(text)
    return done


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results-dir", default=str(common.RESULTS_DIR))
    p.add_argument("--write-readme", action="store_true",
                   help="fill the sections between markers, in whichever --readme file holds them")
    p.add_argument("--readme", action="append", default=None,
                   help="a markdown file to fill (repeatable; default README.md and benchmarks/README.md)")
    p.add_argument("--root", default=str(common.REPO_ROOT),
                   help="the folder the sections' links are relative to (default the repository root)")
    args = p.parse_args(argv)
    readmes = [Path(r) for r in args.readme or (common.REPO_ROOT / "README.md", common.BENCH_DIR / "README.md")]

    sections = {}
    for name in SECTIONS:
        data, small = load(Path(args.results_dir), name)
        if data is None:
            continue
        try:
            sections[name] = RENDER[name](data, small)
        except (KeyError, TypeError, ValueError) as exc:
            sections[name] = f"(could not render {name}: {type(exc).__name__}: {exc})"
    if not sections:
        print(f"no results in {args.results_dir}", file=sys.stderr)
        return
    print("\n\n".join(f"### {name}\n\n{body}" for name, body in sections.items()))
    if args.write_readme:
        written = set()
        for readme in readmes:
            done = write_readme(readme, sections, Path(args.root)) if readme.is_file() else []
            written.update(done)
            print(f"\n{readme}: replaced {done or 'nothing'}", file=sys.stderr)
        missing = [n for n in sections if n not in written]
        if missing:
            print(f"no markers for {missing} in {', '.join(map(str, readmes))} (add <!-- bench:NAME --> ... "
                  "<!-- /bench:NAME -->)", file=sys.stderr)


if __name__ == "__main__":
    main()
