"""Checkpoints written whole or not at all: a process killed while writing one leaves the file before it as it was.

Lightning's `TorchCheckpointIO` serialises the checkpoint in memory and writes it through an fsspec transaction,
which for a local path writes a temporary file in the system's temp folder (`$TMPDIR`, `/tmp`) and moves it into
place. Where that folder is on another file system than the checkpoint (a node's local `/tmp`, the checkpoints on
a shared file system, as on most clusters), the move is a copy into `last.ckpt` itself: a rank killed, or a job
ended by the DDP launcher (`stm.app.sweeps`), during that copy leaves a truncated `last.ckpt` that `resume=auto`
cannot read. `AtomicCheckpointIO` writes `<folder>/.<name>.partial-<pid>` next to the checkpoint, flushes it to
the disk and renames it over the checkpoint (`os.replace`: atomic within one folder on POSIX).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` whose local writes go through a file in the checkpoint's own folder and one rename
    (see the module docstring); reading, and writing to remote URLs (`s3://...`), are Lightning's."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path) or storage_options is not None:  # remote, or options only Lightning's code knows
            return super().save_checkpoint(checkpoint, path, storage_options=storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
        try:
            with open(partial, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        _sync_folder(path.parent)


def _sync_folder(folder: Path) -> None:
    """Flush a folder's entries (the rename) to the disk, where the system allows opening a folder."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
