"""Record sources: any file or dataset schema -> stm's canonical `Record`, with errors that name the place.

A source is a small iterable of `Record`s (`id, context, target, turns, origin, meta`), built from a Hydra
config (`conf/source/*.yaml`, `_target_: stm.data.sources.<Class>`):

    TextFiles(paths)                        each plain-text file is one record (context = its text)
    ShippedSample(name="austen")            the text files of a sample that ships inside the package
    JsonLines(path, fields)                 .jsonl, one JSON object per line (blank lines are ignored)
    JsonFile(path, records_at, fields)      .json, one record per file, or one per element of a list/mapping
    ParquetFile(path, fields)               .parquet rows (needs pyarrow)
    HubDataset(name, config, split, fields) a Hugging Face hub dataset (needs `datasets`, network or a cache)

`path`/`paths` take a file, a glob or a list of them, relative to `root` when given; a missing file or a glob
that matches nothing is a FileNotFoundError at construction.

The field mapping (`fields:`, `explode:`, `required`, `on_bad_record`) is described in `stm.data.fieldmap`.

Real data configs read `${oc.env:STM_SHARED_DATA,${hydra:runtime.cwd}/../shared/data}`: set STM_SHARED_DATA
to the folder with the shared data sets, or run from the project root next to `../shared/data`. The
`hydra:` default is resolved even when the variable is set, so outside a Hydra run (OmegaConf.load of the
YAML) set `root` yourself.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from stm.data.fieldmap import (  # noqa: F401  (re-exported: configs and users name stm.data.sources.*)
    _ALL,
    CANONICAL,
    ON_BAD_RECORD,
    REQUIRABLE,
    SHOW_REASONS,
    FieldMap,
    PathError,
    Record,
    RecordError,
    Skipped,
    _plain,
    fill,
    parse_path,
    resolve,
)

log = logging.getLogger(__name__)


def expand_paths(paths: str | Path | list, root: str | Path | None = None, key: str = "path") -> list[Path]:
    """Files named by a path, a glob or a list of them (relative to root); a miss is a FileNotFoundError."""
    paths = _plain(paths)
    if paths is None:
        raise ValueError(f"{key} is required")
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: list[Path] = []
    for i, p in enumerate(paths):
        where = key if len(paths) == 1 else f"{key}[{i}]"
        path = Path(str(p)).expanduser()
        if root is not None and not path.is_absolute():
            path = Path(str(root)).expanduser() / path
        if any(c in str(p) for c in "*?["):
            anchor = Path(path.anchor) if path.is_absolute() else Path(".")
            pattern = str(path.relative_to(path.anchor)) if path.is_absolute() else str(path)
            matches = sorted(f for f in anchor.glob(pattern) if f.is_file())
            if not matches:
                raise FileNotFoundError(f"{where}: no file matches {path}")
            files.extend(matches)
        elif not path.is_file():
            raise FileNotFoundError(f"{where}: {path} does not exist or is not a file")
        else:
            files.append(path)
    return files


class Source:
    """Base of all sources: the field mapping, the bad-record policy and the iteration."""

    def __init__(self, fields: Mapping | None = None, explode: str | list[str] | None = None,
                 required: list[str] | None = None, on_bad_record: str = "error", limit: int | None = None,
                 split: str | None = None, start: int = 0):
        name = type(self).__name__
        if on_bad_record not in ON_BAD_RECORD:
            raise ValueError(f"{name}.on_bad_record must be one of {list(ON_BAD_RECORD)}, got {on_bad_record!r}")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0):
            raise ValueError(f"{name}.limit must be a positive integer or null, got {limit!r}")
        if not isinstance(start, int) or isinstance(start, bool) or start < 0:
            raise ValueError(f"{name}.start must be a non-negative integer, got {start!r}")
        self.start = start  # skip this many (good) records first: train on records [0, n), validate on [n, ...)
        self.mapping = FieldMap(fields, explode, required, key=name)
        self.on_bad_record = on_bad_record
        self.limit = limit
        self.split = split
        self.skipped = Skipped()

    def raw(self) -> Iterator[tuple[Any, str, str, dict] | RecordError]:
        """(raw record, origin, default id, specials), or a RecordError for a record that cannot be read."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[Record]:
        self.skipped = Skipped()
        n = seen = 0
        try:
            for entry in self.raw():
                if isinstance(entry, RecordError):
                    self._bad(entry)
                    continue
                raw, origin, default_id, specials = entry
                specials.setdefault("_split", self.split)
                try:
                    scopes = self.mapping.scopes(raw, specials, origin)
                except RecordError as err:
                    self._bad(err)
                    continue
                for scope, k in scopes:
                    where = origin if k is None else f"{origin} (item {k})"
                    try:
                        record = self.mapping.record(scope, where, default_id if k is None else f"{default_id}/{k}")
                    except RecordError as err:
                        self._bad(err)
                        continue
                    seen += 1
                    if seen <= self.start:
                        continue
                    yield record
                    n += 1
                    if self.limit is not None and n >= self.limit:
                        return
        finally:
            if self.skipped.count:
                log.warning("%s: skipped %d bad record(s) (on_bad_record=skip); first: %s", self,
                            self.skipped.count, "; ".join(self.skipped.reasons[:SHOW_REASONS]))

    def _bad(self, err: RecordError) -> None:
        if self.on_bad_record == "error":
            raise err
        self.skipped.count += 1
        self.skipped.reasons.append(str(err))

    def records(self) -> list[Record]:
        return list(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class _FileSource(Source):
    def __init__(self, path, root=None, key: str = "path", **kwargs):
        super().__init__(**kwargs)
        self.files = expand_paths(path, root, key=f"{type(self).__name__}.{key}")

    def __repr__(self) -> str:
        first = self.files[0] if self.files else ""
        more = f" +{len(self.files) - 1} more" if len(self.files) > 1 else ""
        return f"{type(self).__name__}({first}{more})"

    @staticmethod
    def _specials(file: Path, index: Any) -> dict:
        return {"_file": str(file), "_stem": file.stem, "_index": index}


class TextFiles(_FileSource):
    """Each plain-text (UTF-8) file is one record: raw record {text, path}; context = text, id = file stem."""

    def __init__(self, paths, root=None, fields: Mapping | None = None, encoding: str = "utf-8", **kwargs):
        super().__init__(paths, root, key="paths", fields=fields or {"context": "text"}, **kwargs)
        self.encoding = encoding

    def raw(self):
        for f in self.files:
            try:
                text = f.read_text(encoding=self.encoding)
            except UnicodeDecodeError as err:
                yield RecordError(str(f), f"is not {self.encoding} text ({err})")
                continue
            yield {"text": text, "path": str(f)}, str(f), f.stem, self._specials(f, 0)


class ShippedSample(TextFiles):
    """The text files of a sample corpus shipped inside the package (`stm.data.text.sample_files`)."""

    def __init__(self, name: str = "austen", **kwargs):
        from stm.data.text import sample_files

        self.name = name
        super().__init__([str(p) for p in sample_files(name)], **kwargs)


class JsonLines(_FileSource):
    """.jsonl: one JSON object per line; origin '<file>:<line>' (1-based), default id '<stem>:<line>'."""

    def __init__(self, path, fields: Mapping, root=None, **kwargs):
        super().__init__(path, root, fields=fields, **kwargs)

    def raw(self):
        for f in self.files:
            with open(f, encoding="utf-8") as lines:
                for lineno, line in enumerate(lines, 1):
                    if not line.strip():
                        continue
                    origin = f"{f}:{lineno}"
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as err:
                        yield RecordError(origin, f"malformed JSON line ({err.msg} at column {err.colno})")
                        continue
                    yield obj, origin, f"{f.stem}:{lineno}", self._specials(f, lineno)


def _records_at(records_at: str | None, key: str) -> str | None:
    """records_at without its trailing wildcard ('' = the top level); wildcards inside are refused."""
    if records_at is None:
        return None
    text = str(records_at).strip()
    if text in ("*", "[*]"):
        return ""
    for tail in (".*", "[*]"):
        if text.endswith(tail):
            text = text[: -len(tail)]
            break
    if _ALL in parse_path(text):
        raise ValueError(f"{key}: only a trailing '*' or '[*]' is allowed in records_at, got {records_at!r}")
    return text


class JsonFile(_FileSource):
    """.json files: each file one record (records_at null), or one record per element of the list (or value of
    the mapping) at `records_at`; origin '<file>#<index or key>'."""

    def __init__(self, path, fields: Mapping, records_at: str | None = None, root=None, **kwargs):
        super().__init__(path, root, fields=fields, **kwargs)
        self.records_at = _records_at(records_at, f"{type(self).__name__}.records_at")

    def raw(self):
        for f in self.files:
            try:
                data = json.loads(f.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                yield RecordError(str(f), f"malformed JSON ({err.msg} at line {err.lineno} column {err.colno})")
                continue
            except UnicodeDecodeError as err:
                yield RecordError(str(f), f"is not UTF-8 text ({err})")
                continue
            if self.records_at is None:
                yield data, str(f), f.stem, self._specials(f, 0)
                continue
            try:
                container = resolve(data, self.records_at) if self.records_at else data
            except PathError as err:
                yield RecordError(str(f), str(err), field="records_at")
                continue
            if isinstance(container, Mapping):
                entries = container.items()
            elif isinstance(container, list):
                entries = enumerate(container)
            else:
                yield RecordError(str(f), f"records_at finds a {type(container).__name__}, not a list or object",
                                  field="records_at")
                continue
            for i, (k, obj) in enumerate(entries):
                specials = self._specials(f, i)
                specials["_key"] = k
                yield obj, f"{f}#{k}", str(k) if isinstance(container, Mapping) else f"{f.stem}#{k}", specials


class ParquetFile(_FileSource):
    """.parquet rows (read with pyarrow, in batches); origin '<file>#<row>'."""

    def __init__(self, path, fields: Mapping, root=None, batch_size: int = 1024, **kwargs):
        try:
            import pyarrow.parquet  # noqa: F401
        except ImportError as err:
            raise ImportError("ParquetFile needs pyarrow, which is not installed: pip install pyarrow") from err
        super().__init__(path, root, fields=fields, **kwargs)
        self.batch_size = batch_size

    def raw(self):
        import pyarrow.parquet as pq

        for f in self.files:
            row = 0
            for batch in pq.ParquetFile(f).iter_batches(batch_size=self.batch_size):
                for obj in batch.to_pylist():
                    yield obj, f"{f}#{row}", f"{f.stem}#{row}", self._specials(f, row)
                    row += 1


class HubDataset(Source):
    """A Hugging Face hub dataset via `datasets.load_dataset` (network, or a filled cache at cache_dir).

    Loaded on first iteration; origin '<name>[/<config>]:<split>#<row>'.
    """

    def __init__(self, name: str, fields: Mapping, config: str | None = None, split: str = "train",
                 cache_dir: str | None = None, load_kwargs: Mapping | None = None, **kwargs):
        try:
            import datasets  # noqa: F401
        except ImportError as err:
            raise ImportError(f"HubDataset({name!r}) needs the Hugging Face datasets library, which is not "
                              "installed: pip install datasets") from err
        if not name:
            raise ValueError("HubDataset.name (the hub dataset, e.g. 'tau/scrolls') is required")
        super().__init__(fields=fields, split=split, **kwargs)
        self.name, self.config, self.cache_dir = name, config, cache_dir
        self.load_kwargs = dict(_plain(load_kwargs) or {})
        self._data = None

    def __repr__(self) -> str:
        return f"HubDataset({self.name}{'/' + self.config if self.config else ''}:{self.split})"

    def load(self):
        if self._data is None:
            import datasets

            what = f"hub dataset '{self.name}'" + (f" config '{self.config}'" if self.config else "")
            try:
                self._data = datasets.load_dataset(self.name, self.config, split=self.split,
                                                   cache_dir=self.cache_dir, **self.load_kwargs)
            except OSError as err:
                raise OSError(f"HubDataset: could not load {what}, split '{self.split}' (the hub needs network "
                              f"or a filled cache at cache_dir={self.cache_dir}): {err}") from err
            except ValueError as err:
                raise ValueError(f"HubDataset: could not load {what}, split '{self.split}': {err}") from err
        return self._data

    def raw(self):
        label = self.name + (f"/{self.config}" if self.config else "") + f":{self.split}"
        stem = self.name.rsplit("/", 1)[-1]
        for row, obj in enumerate(self.load()):
            yield obj, f"{label}#{row}", f"{stem}#{row}", {"_file": label, "_stem": stem, "_index": row}
