"""Field mapping: any raw record (JSON object, Parquet row, hub example) -> stm's canonical `Record`.

Field mapping (`fields:`)
-------------------------
`fields` maps canonical names (`id`, `context`, `target`, `turns`, `meta`) to where they are in the raw
record. A *path* is dotted keys with list steps: `a.b`, `a[0]`, `a[*]` (every element of a list), `*` (every
element of a list or every value of a mapping). A path with a wildcard yields a list. A *field spec* is either

    a path                          "input"  "en"  "meeting_transcripts[*].content"
    a string with {placeholders}    a template, the same as {template: "..."}: "{_stem}-{item.query}"
    {path, template, join, default} render each element with `template`, join the pieces with `join`
    {template}                      a template over the record alone, e.g. "Query: {item.query}"
    {parts: [spec, ...], join}      several specs, the non-empty ones joined by `join` (default "\\n\\n")

Templates fill `{dotted.path}` placeholders (`{{`/`}}` for literal braces); inside a `path` with a template,
names are looked up in the element first, then in the record. A list value (a wildcard path, or a path to a
list such as the Bible's `en`) becomes text by joining its pieces with `join` (default "\\n"). A missing key or a
null value is an error unless the spec gives a `default`.

- `id`, `context`, `target`: text specs. Without `id` the id is the file stem plus the line, index or key.
- `turns` (dialogue): `{path: "turns[*]", speaker: "speaker", text: "utterance"}` (speaker/text are specs
  looked up per element), or `{zip: {speaker: <list path>, text: <list path>}}` for parallel lists, or
  `{parts: [turn spec, ...]}` to concatenate; optional `speakers: {raw name: new name}`. Each turn becomes
  `{"speaker": str, "text": str}`; an empty turn text is an error.
- `meta`: `{name: spec}`; a plain path keeps the raw value (a list stays a list), a spec with a template,
  join or parts gives text.

Besides the raw record's keys, paths can read `_file` (the file), `_stem`, `_index` (line number, row or
element index), `_key` (the mapping key or list index under `records_at`) and `_split` (the `split` option).

`explode: <path>` (or a list of paths) makes one record per element of that list, available to the specs as
`item` (and its running number as `_item`): QMSum gives one record per query with
`explode: general_query_list[*]`, `target: item.answer`, context = the transcript.

`records_at` (JsonFile): where the records are in each file: `"*"` for the elements of a top-level list or
the values of a top-level mapping (SGD, Topical-Chat), `"data"` or `"data.items[*]"` for a list deeper in.

Bad input never passes silently
-------------------------------
A malformed JSON line, a missing field, an empty context (or an empty field listed in `required`, default
`[context]`, or `[turns]` for a dialogue source) raises `RecordError` (a ValueError) naming the file, the
line or record index, and the field. With `on_bad_record: skip` such a record is skipped instead: after each
pass a warning gives the count and the first reasons, and `source.skipped` holds `count` and `reasons`.
"""

from __future__ import annotations

import logging
import re
from collections import ChainMap
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

log = logging.getLogger(__name__)

CANONICAL = ("id", "context", "target", "turns", "meta")
REQUIRABLE = ("id", "context", "target", "turns")
ON_BAD_RECORD = ("error", "skip")
TEXT_KEYS = {"path", "template", "join", "default", "parts"}
TURN_KEYS = {"path", "speaker", "text", "zip", "parts", "speakers", "default"}
SHOW_REASONS = 5


@dataclass
class Record:
    """stm's canonical record: what every task reads, whatever the source schema."""

    id: str
    context: str
    target: str = ""
    turns: list[dict] | None = None
    origin: str = ""
    meta: dict = field(default_factory=dict)


class RecordError(ValueError):
    """A bad raw record; the message names where it is (file:line or file#index) and the field."""

    def __init__(self, origin: str, reason: str, field: str | None = None):
        self.origin, self.reason, self.field = origin, reason, field
        what = f"field '{field}': " if field else ""
        super().__init__(f"{origin}: {what}{reason}")


@dataclass
class Skipped:
    """Records skipped in the last pass (with `on_bad_record: skip`)."""

    count: int = 0
    reasons: list[str] = field(default_factory=list)


class PathError(LookupError):
    """A path that does not resolve in a raw record (turned into a RecordError naming the field)."""


# ---------------------------------------------------------------------------------------------------- paths

_ALL = ("all",)
_SEGMENT = re.compile(r"([^\[\]]*)((?:\[(?:\*|-?\d+)\])*)")
_BRACKET = re.compile(r"\[(\*|-?\d+)\]")
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")


@lru_cache(maxsize=1024)
def parse_path(path: str) -> tuple:
    """'a.b[*].c' -> (('key','a'), ('key','b'), ('all',), ('key','c')); a malformed path is a ValueError."""
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"a field path must be a non-empty string, got {path!r}")
    steps: list[tuple] = []
    for part in path.strip().split("."):
        if part == "*":
            steps.append(_ALL)
            continue
        m = _SEGMENT.fullmatch(part)
        if not part or m is None or not (m.group(1) or m.group(2)):
            raise ValueError(f"malformed field path {path!r} (at {part!r}); use keys, '.', '[N]' and '[*]'")
        if m.group(1):
            steps.append(("key", m.group(1)))
        for b in _BRACKET.findall(m.group(2)):
            steps.append(_ALL if b == "*" else ("index", int(b)))
    return tuple(steps)


def _show(steps: list[tuple]) -> str:
    out = ""
    for s in steps:
        if s[0] == "key":
            out += ("." if out else "") + s[1]
        else:
            out += "[*]" if s is _ALL else f"[{s[1]}]"
    return f"'{out}'" if out else "the record"


def _keys(m: Mapping) -> str:
    keys = [str(k) for k in m if not str(k).startswith("_")]
    return ", ".join(keys[:10]) + (", ..." if len(keys) > 10 else "")


def resolve(obj: Any, path: str) -> Any:
    """The value at `path` in obj; a list of values when the path has a wildcard."""
    steps = parse_path(path)
    values, spread, done = [obj], False, []
    for step in steps:
        found = []
        for v in values:
            if step[0] == "key":
                if not isinstance(v, Mapping):
                    raise PathError(f"path '{path}': {_show(done)} is a {type(v).__name__}, not an object "
                                    f"with key '{step[1]}'")
                if step[1] not in v:
                    raise PathError(f"path '{path}': no key '{step[1]}' in {_show(done)} (keys: {_keys(v)})")
                found.append(v[step[1]])
            elif step[0] == "index":
                if not isinstance(v, (list, tuple)):
                    raise PathError(f"path '{path}': {_show(done)} is a {type(v).__name__}, not a list")
                if not -len(v) <= step[1] < len(v):
                    raise PathError(f"path '{path}': index {step[1]} is out of range for {_show(done)} "
                                    f"({len(v)} elements)")
                found.append(v[step[1]])
            elif isinstance(v, (list, tuple)):
                found.extend(v)
            elif isinstance(v, Mapping):
                found.extend(v.values())
            else:
                raise PathError(f"path '{path}': {_show(done)} is a {type(v).__name__}, not a list or object")
        values = found
        done.append(step)
        spread = spread or step is _ALL
    return values if spread else values[0]


def _scalar(value: Any, what: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, int, float)):
        return str(value)
    if value is None:
        raise PathError(f"{what} is null")
    raise PathError(f"{what} is a {type(value).__name__}, not text; give a template (or a path to its text)")


def fill(template: str, scope: Mapping) -> str:
    """Fill `{dotted.path}` placeholders from scope; `{{` and `}}` are literal braces."""
    def sub(m: re.Match) -> str:
        if m.group(0) == "{{":
            return "{"
        if m.group(0) == "}}":
            return "}"
        name = m.group(1).strip()
        value = resolve(scope, name)
        if isinstance(value, list):
            raise PathError(f"template placeholder '{{{name}}}' is a list; use a path with a template and join")
        return _scalar(value, f"template placeholder '{{{name}}}'")

    return _PLACEHOLDER.sub(sub, template)


def _template_paths(template: str) -> list[str]:
    return [m.group(1).strip() for m in _PLACEHOLDER.finditer(template) if m.group(1) is not None]


# ------------------------------------------------------------------------------------------------- mapping

def _plain(value: Any) -> Any:
    """OmegaConf containers (from Hydra) -> plain dicts and lists."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        return value
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _text_spec(spec: Any, key: str) -> dict:
    """Validate a text spec (a path, or a dict) and return it as a dict."""
    if isinstance(spec, str):
        spec = {"template": spec} if "{" in spec else {"path": spec}
    if not isinstance(spec, Mapping):
        raise ValueError(f"{key}: a field spec is a path or a mapping, got {type(spec).__name__}")
    spec = dict(spec)
    unknown = set(spec) - TEXT_KEYS
    if unknown:
        raise ValueError(f"{key}: unknown option(s) {sorted(unknown)}; a text field takes {sorted(TEXT_KEYS)}")
    if "parts" in spec:
        if not isinstance(spec["parts"], list) or not spec["parts"] or set(spec) - {"parts", "join"}:
            raise ValueError(f"{key}: 'parts' is a non-empty list of specs, with at most a 'join'")
        spec["parts"] = [_text_spec(p, f"{key}.parts[{i}]") for i, p in enumerate(spec["parts"])]
        return spec
    if "path" not in spec and "template" not in spec:
        raise ValueError(f"{key}: give a 'path', a 'template' or 'parts'")
    if "path" in spec:
        parse_path(spec["path"])
    if "template" in spec:
        if not isinstance(spec["template"], str):
            raise ValueError(f"{key}.template must be a string")
        for p in _template_paths(spec["template"]):
            try:
                parse_path(p)
            except ValueError as err:
                raise ValueError(f"{key}.template: {err}") from err
    if "join" in spec and not isinstance(spec["join"], str):
        raise ValueError(f"{key}.join must be a string")
    return spec


def _turn_spec(spec: Any, key: str) -> dict:
    if not isinstance(spec, Mapping):
        raise ValueError(f"{key}: a turns spec is a mapping: {{path, speaker, text}}, {{zip: {{speaker, text}}}} "
                         f"or {{parts: [...]}}")
    spec = dict(spec)
    unknown = set(spec) - TURN_KEYS
    if unknown:
        raise ValueError(f"{key}: unknown option(s) {sorted(unknown)}; turns take {sorted(TURN_KEYS)}")
    if "speakers" in spec and not isinstance(spec["speakers"], Mapping):
        raise ValueError(f"{key}.speakers must map raw speaker names to new ones")
    if "parts" in spec:
        if not isinstance(spec["parts"], list) or not spec["parts"]:
            raise ValueError(f"{key}.parts must be a non-empty list of turn specs")
        spec["parts"] = [_turn_spec(p, f"{key}.parts[{i}]") for i, p in enumerate(spec["parts"])]
    elif "zip" in spec:
        z = spec["zip"]
        if not isinstance(z, Mapping) or set(z) != {"speaker", "text"}:
            raise ValueError(f"{key}.zip must be {{speaker: <list path>, text: <list path>}}")
        spec["zip"] = {k: _text_spec(v, f"{key}.zip.{k}") for k, v in z.items()}
    elif {"path", "speaker", "text"} <= set(spec):
        parse_path(spec["path"])
        spec["speaker"] = _text_spec(spec["speaker"], f"{key}.speaker")
        spec["text"] = _text_spec(spec["text"], f"{key}.text")
    else:
        raise ValueError(f"{key}: give 'path', 'speaker' and 'text' (or 'zip', or 'parts')")
    return spec


def _lookup(spec: dict, scope: Mapping) -> Any:
    try:
        value = resolve(scope, spec["path"])
    except PathError:
        if "default" in spec:
            return spec["default"]
        raise
    if value is None:
        if "default" in spec:
            return spec["default"]
        raise PathError(f"path '{spec['path']}' is null")
    return value


def _element_scope(element: Any, scope: Mapping) -> Mapping:
    return ChainMap(element, scope) if isinstance(element, Mapping) else ChainMap({"_": element}, scope)


def render_text(spec: dict, scope: Mapping) -> str:
    """The text a (validated) text spec gives for one record scope."""
    if "parts" in spec:
        pieces = [render_text(p, scope) for p in spec["parts"]]
        return spec.get("join", "\n\n").join(p for p in pieces if p)
    template = spec.get("template")
    if "path" not in spec:
        return fill(template, scope)
    value = _lookup(spec, scope)
    what = f"path '{spec['path']}'"
    if isinstance(value, (list, tuple)):
        pieces = [fill(template, _element_scope(v, scope)) if template is not None else _scalar(v, f"{what}[{i}]")
                  for i, v in enumerate(value)]
        return spec.get("join", "\n").join(pieces)
    if template is not None:
        return fill(template, _element_scope(value, scope))
    return _scalar(value, what)


def render_turns(spec: dict, scope: Mapping) -> list[dict]:
    if "parts" in spec:
        return [t for p in spec["parts"] for t in render_turns(p, scope)]
    if "zip" in spec:
        lists = {}
        for k in ("speaker", "text"):
            sub = spec["zip"][k]
            value = _lookup(sub, scope) if "path" in sub else render_text(sub, scope)
            if not isinstance(value, (list, tuple)):
                raise PathError(f"zip.{k}: path '{sub.get('path')}' is a {type(value).__name__}, not a list")
            lists[k] = value
        if len(lists["speaker"]) != len(lists["text"]):
            raise PathError(f"zip: {len(lists['speaker'])} speakers but {len(lists['text'])} texts")
        pairs = [(_scalar(s, f"zip.speaker[{i}]"), _scalar(t, f"zip.text[{i}]"))
                 for i, (s, t) in enumerate(zip(lists["speaker"], lists["text"]))]
    else:
        elements = _lookup(spec, scope)
        if not isinstance(elements, (list, tuple)):
            raise PathError(f"path '{spec['path']}' is a {type(elements).__name__}, not a list of turns")
        pairs = []
        for el in elements:
            es = _element_scope(el, scope)
            pairs.append((render_text(spec["speaker"], es), render_text(spec["text"], es)))
    names = spec.get("speakers") or {}
    turns = []
    for i, (speaker, text) in enumerate(pairs):
        if not text.strip():
            raise PathError(f"turn {i} (speaker '{speaker}') has empty text")
        turns.append({"speaker": str(names.get(speaker, speaker)), "text": text})
    return turns


class FieldMap:
    """The declarative mapping from one raw record to canonical Records (see the module docstring)."""

    def __init__(self, fields: Mapping | None, explode: str | list[str] | None = None,
                 required: list[str] | None = None, key: str = "source"):
        fields = _plain(fields) or {}
        if not isinstance(fields, Mapping):
            raise ValueError(f"{key}.fields must map canonical names {list(CANONICAL)} to field specs")
        unknown = set(fields) - set(CANONICAL)
        if unknown:
            raise ValueError(f"{key}.fields: unknown canonical field(s) {sorted(unknown)}; a record has "
                             f"{list(CANONICAL)}")
        self.text = {n: _text_spec(fields[n], f"{key}.fields.{n}") for n in ("id", "context", "target")
                     if fields.get(n) is not None}
        self.turns = _turn_spec(fields["turns"], f"{key}.fields.turns") if fields.get("turns") else None
        meta = _plain(fields.get("meta")) or {}
        if not isinstance(meta, Mapping):
            raise ValueError(f"{key}.fields.meta must map names to field specs")
        self.meta = {n: _text_spec(s, f"{key}.fields.meta.{n}") for n, s in meta.items()}
        if "context" not in self.text and self.turns is None:
            raise ValueError(f"{key}.fields: map at least 'context' (or 'turns' for dialogue)")
        explode = _plain(explode)
        self.explode = [explode] if isinstance(explode, str) else list(explode or [])
        for p in self.explode:
            parse_path(p)
        required = _plain(required)
        if required is None:
            required = ["turns"] if self.turns is not None else ["context"]
        if isinstance(required, str):
            required = [required]
        bad = [r for r in required if r not in REQUIRABLE]
        if bad:
            raise ValueError(f"{key}.required: {bad} are not canonical fields; choose from {list(REQUIRABLE)}")
        unmapped = [r for r in required if r != "id" and r not in self.text and not (r == "turns" and self.turns)]
        if unmapped:
            raise ValueError(f"{key}.required lists {unmapped}, which fields does not map")
        self.required = list(required)

    def scopes(self, raw: Any, specials: dict, origin: str) -> list[tuple[Mapping, int | None]]:
        """One (scope, item number) per record the raw record makes: one, or one per exploded item."""
        if not isinstance(raw, Mapping):
            raise RecordError(origin, f"expected a JSON object (a mapping), got {type(raw).__name__}")
        if not self.explode:
            return [(ChainMap(specials, raw), None)]
        out, k = [], 0
        base = ChainMap(specials, raw)
        for p in self.explode:
            try:
                items = resolve(base, p)
            except PathError as err:
                raise RecordError(origin, str(err), field="explode") from None
            if not isinstance(items, (list, tuple)):
                raise RecordError(origin, f"path '{p}' is a {type(items).__name__}, not a list", field="explode")
            for item in items:
                out.append((ChainMap({"item": item, "_item": k}, specials, raw), k))
                k += 1
        return out

    def record(self, scope: Mapping, origin: str, default_id: str) -> Record:
        values: dict[str, Any] = {"id": default_id, "context": "", "target": "", "turns": None, "meta": {}}
        for name, spec in self.text.items():
            values[name] = self._field(name, origin, render_text, spec, scope)
        if self.turns is not None:
            values["turns"] = self._field("turns", origin, render_turns, self.turns, scope)
        for name, spec in self.meta.items():
            build = _lookup if set(spec) <= {"path", "default"} else render_text
            values["meta"][name] = self._field(f"meta.{name}", origin, build, spec, scope)
        for name in self.required:
            v = values[name]
            if not v or (isinstance(v, str) and not v.strip()):
                raise RecordError(origin, "is empty" if name != "turns" else "has no turns", field=name)
        return Record(id=str(values["id"]), context=values["context"], target=values["target"],
                      turns=values["turns"], origin=origin, meta=values["meta"])

    @staticmethod
    def _field(name: str, origin: str, build, spec: dict, scope: Mapping) -> Any:
        try:
            return build(spec, scope)
        except PathError as err:
            raise RecordError(origin, str(err), field=name) from None
