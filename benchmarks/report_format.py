"""What every benchmark renderer shares: numbers as table cells, a markdown table, the line saying which command,
machine and commit a result comes from, and stream lengths in k / M."""

from __future__ import annotations


def fmt(x, digits=3) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def provenance(data: dict, small: bool) -> str:
    env = data.get("environment", {})
    cuda = env.get("cuda")
    where = f"{cuda['device']} (CUDA {cuda.get('cuda_version')})" if cuda else \
        f"{env.get('cpu_model', '?')}, {env.get('cpu_count', '?')} CPUs"
    threads = data.get("config", {}).get("threads", env.get("torch_num_threads"))
    git = env.get("git", {}) or {}
    commit = (git.get("commit") or "?")[:10] + (" (uncommitted changes)" if git.get("dirty") else "")
    load = data.get("load_average_before") or env.get("load_average")
    after = data.get("load_average_after")
    load_txt = f"; load average before {load[0]}" if load else ""
    load_txt += f", after {after[0]}" if after else ""
    note = " **(small check run, not the full-size benchmark)**" if small else ""
    return (f"`{data.get('command', '?')}`{note}  \n{where}, torch {env.get('torch', '?')}, {threads} threads, "
            f"Python {env.get('python', '?')}; {env.get('date', '?')}, commit {commit}{load_txt}.")


def short_len(n: int) -> str:
    return f"{n // 1048576}M" if n % 1048576 == 0 else f"{n // 1024}k" if n % 1024 == 0 else str(n)
