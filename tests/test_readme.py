"""The README describes the tree as it is: its module map names every module of stm/ and nothing that is not
there, its configuration table lists the options that conf/ has, and its links (and those of
benchmarks/README.md, where the benchmark tables live) lead somewhere."""

from __future__ import annotations

import re
from fnmatch import fnmatch
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
MAP_COLUMN = 30  # where the descriptions of the module map start
NAME = re.compile(r"(?<![\w/.-])([A-Za-z_][\w/]*\.py|[A-Za-z_]\w*/)(?=[\s,;:)]|$)")


def section(title: str) -> str:
    """The text of the README's `## title` section, up to the next `## ` heading."""
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:] if end == -1 else README[start:end]


def module_map() -> tuple[set[Path], set[Path]]:
    """(paths the map names, row heads left out): every `*.py` and `folder/` of the map's code block, a name
    found under its row's folder (`stm/memory/base.py ... none.py` is stm/memory/none.py) or else from the root.
    A row's own folder (`stm/app/`) is the place of its names, not a name: it does not cover its files."""
    block = re.search(r"```\n(.*?)```", section("How it fits together"), re.S).group(1)
    named, heads, base = set(), set(), ROOT
    for line in block.splitlines():
        head = line[:MAP_COLUMN].split()
        if head:
            first = head[0].rstrip(",")
            base = ROOT / first if first.endswith("/") else (ROOT / first).parent
            if first.endswith("/"):
                heads.add((ROOT / first).resolve())
        for name in NAME.findall(line):
            path = base / name if (base / name).exists() else ROOT / name
            named.add(path.resolve())
    return named, heads


def test_the_module_map_names_what_exists():
    named, _ = module_map()
    missing = sorted(str(p.relative_to(ROOT)) for p in named if not p.exists())
    assert not missing, f"README.md, How it fits together: the module map names {missing}, which do not exist"


def test_the_module_map_names_every_module():
    named, heads = module_map()
    covering = {p for p in named - heads if p.is_dir()}
    modules = [p for p in (ROOT / "stm").rglob("*.py") if p.name != "__init__.py"]
    unnamed = sorted(str(p.relative_to(ROOT)) for p in modules
                     if p.resolve() not in named and not any(d in p.resolve().parents for d in covering))
    assert not unnamed, f"README.md, How it fits together: the module map does not name {unnamed}; add them"


def test_the_module_map_check_sees_a_missing_module():
    named, heads = module_map()
    assert (ROOT / "stm" / "loop" / "segments.py").resolve() in named
    assert (ROOT / "stm" / "data" / "probes").resolve() in named  # a package named as a folder covers its files
    assert (ROOT / "stm" / "app").resolve() in heads


def config_rows() -> list[tuple[list[str], list[str]]]:
    """(groups, options) of each row of the Configuration table: the backticked names of its first two cells
    (a list such as `[rmt,swa]` is an example, not an option)."""
    table = section("Configuration").split("| group | options | what it chooses |\n", 1)[1].split("\n\n", 1)[0]
    rows = []
    for line in table.splitlines():
        cells = line.split(" | ")
        if not line.startswith("| `") or len(cells) < 3:
            continue
        groups = re.findall(r"`([^`]+)`", cells[0])
        options = [o for o in re.findall(r"`([^`]+)`", cells[1]) if "[" not in o]
        rows.append((groups, options))
    return rows


def test_the_configuration_table_lists_the_options_of_conf():
    rows = config_rows()
    assert [g for g, _ in rows][:3] == [["model"], ["tokenizer"], ["memory"]]
    for groups, options in rows:
        for group in groups:
            have = sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))
            listed = [o for o in options if "*" not in o]
            patterns = [o for o in options if "*" in o]
            unknown = sorted(set(listed) - set(have))
            unlisted = [h for h in have if h not in listed and not any(fnmatch(h, p) for p in patterns)]
            assert not unknown, f"README.md, Configuration: the `{group}` row lists {unknown}, not in conf/{group}/"
            assert not unlisted, f"README.md, Configuration: conf/{group}/ has {unlisted}; list them in its row"


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of a markdown file's headings: lower case, punctuation dropped, spaces as hyphens."""
    return {re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            for m in re.finditer(r"^#+ (.+)$", path.read_text(), re.M)}


def test_the_links_between_the_readmes_resolve():
    """Every relative link of README.md and benchmarks/README.md (outside code blocks) names a file that exists,
    and an anchor that is a heading of that file: the sections moved between them stay reachable."""
    broken = []
    for doc in (ROOT / "README.md", ROOT / "benchmarks" / "README.md"):
        text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc
            if not file.exists() or (anchor and file.suffix == ".md" and anchor not in anchors(file)):
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
    assert not broken, f"links that lead nowhere: {broken}"
