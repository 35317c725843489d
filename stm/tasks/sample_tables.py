"""Tables of sample generations for every logger of a run: wandb tables, TensorBoard text, JSON Lines files.

The task calls `log_generation_samples(trainer.loggers, rows, step)` itself (no Lightning callback needed):

- `WandbLogger` (anything with `log_table`) -> a `wandb.Table` under `key`;
- `TensorBoardLogger` -> a markdown table through `experiment.add_text(key, table, step)`;
- `CSVLogger` and any other logger with a `log_dir` -> `<log_dir>/samples/<key, "/" as "_">_step<step>.jsonl`.

A logger of another kind is skipped with one log message per kind, and an error in one logger is logged, not
raised: sample tables are a diagnostic and must never stop training.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger("stm")

_SKIPPED_KINDS: set[str] = set()


def excerpt(text: str, chars: int = 300) -> str:
    """`text` when it has at most 2 * chars characters, else its first and last `chars` joined by ` ... `."""
    if chars <= 0 or len(text) <= 2 * chars:
        return text
    return f"{text[:chars]} ... {text[-chars:]}"


def _plain(value: Any) -> Any:
    """A value as a JSON-friendly cell: tensors and numpy values as Python numbers/lists, other objects as str."""
    if value is None or isinstance(value, str | bool | int | float):
        return value
    if hasattr(value, "tolist"):  # torch tensors, numpy arrays and scalars
        plain = value.tolist()
        return plain if isinstance(plain, str | bool | int | float) else json.dumps(plain)
    return str(value)


def sample_table(rows: Sequence[dict], excerpt_columns: Iterable[str] = ("source",),
                 excerpt_chars: int = 300) -> tuple[list[str], list[list[Any]]]:
    """(columns, data): columns are the rows' keys in order of first appearance, missing cells are None.

    String cells of `excerpt_columns` are shortened with `excerpt`.
    """
    columns = list(dict.fromkeys(key for row in rows for key in row))
    shorten = set(excerpt_columns)
    data = []
    for row in rows:
        cells = []
        for column in columns:
            value = _plain(row.get(column))
            if column in shorten and isinstance(value, str):
                value = excerpt(value, excerpt_chars)
            cells.append(value)
        data.append(cells)
    return columns, data


def markdown_table(columns: Sequence[str], data: Sequence[Sequence[Any]]) -> str:
    """A markdown table (as TensorBoard's text plugin renders it); `|` escaped, newlines as `<br>`."""

    def cell(value: Any) -> str:
        text = "" if value is None else str(value)
        return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r\n", "\n").replace("\n", "<br>")

    lines = ["| " + " | ".join(cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in data]
    return "\n".join(lines)


def samples_path(log_dir: str | Path, key: str, step: int) -> Path:
    """Where the JSON Lines file of `key` at `step` goes in a logger's log_dir."""
    return Path(log_dir) / "samples" / f"{key.replace('/', '_')}_step{step}.jsonl"


def write_jsonl(path: Path, columns: Sequence[str], data: Sequence[Sequence[Any]]) -> None:
    """One JSON object per row, keys in column order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in data:
            f.write(json.dumps(dict(zip(columns, row)), ensure_ascii=False) + "\n")


def _is_tensorboard(logger: Any) -> bool:
    return type(logger).__name__ == "TensorBoardLogger"


def _log_to(logger: Any, columns: list[str], data: list[list[Any]], step: int, key: str) -> bool:
    """Write the table to one logger; False when the logger is of a kind that takes no tables."""
    if callable(getattr(logger, "log_table", None)):
        logger.log_table(key=key, columns=columns, data=data, step=step)
    elif _is_tensorboard(logger):
        logger.experiment.add_text(key, markdown_table(columns, data), step)
    elif isinstance(getattr(logger, "log_dir", None), str | Path):
        write_jsonl(samples_path(logger.log_dir, key, step), columns, data)
    else:
        return False
    return True


@rank_zero_only
def log_generation_samples(loggers: Iterable[Any] | None, rows: Sequence[dict], step: int,
                           key: str = "val/samples", excerpt_chars: int = 300,
                           excerpt_columns: Iterable[str] = ("source",)) -> None:
    """Log a table of sample generations (one dict per row, e.g. index/source/reference/output) to each logger.

    Long `source` cells (more generally `excerpt_columns`) show their first and last `excerpt_chars` characters.
    Runs on global rank 0 only. Never raises because of a logger: failures are logged as warnings.
    """
    if not rows:
        return
    columns, data = sample_table(rows, excerpt_columns, excerpt_chars)
    for logger in loggers or ():
        kind = type(logger).__name__
        try:
            written = _log_to(logger, columns, data, step, key)
        except Exception:
            log.warning("could not log %r sample table to %s", key, kind, exc_info=True)
            continue
        if not written and kind not in _SKIPPED_KINDS:
            _SKIPPED_KINDS.add(kind)
            log.info("sample tables are not written to %s (no table, text or log_dir support); skipping it", kind)
