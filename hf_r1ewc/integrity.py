"""Run integrity: SHA-256 digests of task-folder artifacts, the run manifest, and the output folder's lock.

A task folder records the digest of every file it holds in ``training_state.json`` (``"sha256"``); loading checks
them (``verify_folder``). A training checkpoint records them in ``digests.json``, written last
(``write_checkpoint_digests``), and is checked before a resume reads it (``checkpoint_problem``). An output folder holds ``run_manifest.json``: every setting that changes results, the
dataset's identity and the tasks, written once by the run that created the folder and compared by every resume and
re-run (``manifest_differences``). ``OutputLock`` keeps a second run off a folder that is being written.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from pathlib import Path

import torch


DIGESTS_KEY = "sha256"


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_tensors(*tensors) -> str:
    """Hex SHA-256 over the dtypes, shapes and bytes of CPU tensors (a dataset's identity)."""
    digest = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def folder_digests(folder: str | os.PathLike, exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """``{relative posix path: sha256}`` of every file under ``folder`` except ``exclude`` (relative paths)."""
    folder = Path(folder)
    return {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.relative_to(folder).as_posix() not in exclude
    }


class IntegrityError(ValueError):
    """An artifact is missing or its bytes differ from the digest recorded when it was written."""


def folder_problems(
    folder: str | os.PathLike, digests: dict[str, str], only: tuple[str, ...] | None = None
) -> list[str]:
    """One line per file of ``digests`` (or of the subset ``only``) that is missing or differs from its SHA-256."""
    folder = Path(folder)
    problems = []
    for name, expected in sorted(digests.items()):
        if only is not None and name not in only:
            continue
        path = folder / name
        if not path.exists():
            problems.append(f"{name} is missing")
        elif sha256_file(path) != expected:
            problems.append(f"{name} differs from the SHA-256 recorded when it was written (corrupt or altered)")
    return problems


def verify_folder(folder: str | os.PathLike, digests: dict[str, str], only: tuple[str, ...] | None = None) -> None:
    """Check the files of ``digests`` (or the subset ``only``) against their recorded SHA-256; raises
    ``IntegrityError`` naming every missing or altered file."""
    problems = folder_problems(folder, digests, only)
    if problems:
        raise IntegrityError(
            f"{folder}: " + "; ".join(problems) + ". Copy the folder again from where it was made "
            "(or pull it from the Hub), or retrain that task."
        )


CHECKPOINT_DIGESTS = "digests.json"


def write_checkpoint_digests(folder: str | os.PathLike) -> None:
    """Record the SHA-256 of every file of a checkpoint folder in its ``digests.json`` (call it last)."""
    digests = folder_digests(folder, exclude=(CHECKPOINT_DIGESTS,))
    (Path(folder) / CHECKPOINT_DIGESTS).write_text(json.dumps(digests, indent=1))


def checkpoint_problem(folder: str | os.PathLike, required: dict[str, str] | None = None) -> str | None:
    """None if a checkpoint folder is intact: its files match ``digests.json``, ``position.json`` parses and every
    file of ``required`` (name -> what it holds) is there; else what is wrong, in one line. One without
    ``digests.json`` cannot be verified and is refused like a damaged one."""
    folder = Path(folder)
    for name, holds in (required or {}).items():
        if not (folder / name).exists():
            return f"{name} is missing: it holds {holds}, which this run needs to resume within a task"
    digest_path = folder / CHECKPOINT_DIGESTS
    if not digest_path.exists():
        return f"{CHECKPOINT_DIGESTS} is missing, so its files cannot be verified (never finished, or the file was deleted)"
    try:
        digests = json.loads(digest_path.read_text())
    except (ValueError, OSError) as err:
        return f"{CHECKPOINT_DIGESTS} cannot be read ({err})"
    if not isinstance(digests, dict):
        return f"{CHECKPOINT_DIGESTS} is not a mapping of file names to SHA-256"
    if problems := folder_problems(folder, digests):
        return "; ".join(problems)
    try:
        position = json.loads((folder / "position.json").read_text())
    except (ValueError, OSError) as err:
        return f"position.json cannot be read ({err})"
    if not isinstance(position, dict) or not {"task", "epoch", "step_in_epoch", "global_step"} <= set(position):
        return "position.json lacks the run position (task, epoch, step_in_epoch, global_step)"
    return None


def manifest_differences(recorded: dict, current: dict) -> dict[str, tuple]:
    """``{key: (recorded, current)}`` for every key whose value differs (keys missing on one side included)."""
    return {
        k: (recorded.get(k), current.get(k))
        for k in sorted(set(recorded) | set(current))
        if recorded.get(k) != current.get(k)
    }


class OutputLock:
    """An exclusive, non-blocking ``flock`` on ``OUTPUT_DIR/.lock`` for the life of a run (released by the OS when
    the process dies, so a killed run never leaves a stale lock)."""

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.path = Path(output_dir) / ".lock"
        self._fd: int | None = None
        self._created: list[Path] = []  # what acquire made (the lock file, folders), newest first

    def acquire(self) -> bool:
        """True if this process now holds the lock; False if another process does."""
        missing = [p for p in (self.path, *self.path.parents) if not p.exists()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        self._created = missing
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def holder(self) -> str:
        """The process id written by the holder (best effort)."""
        try:
            return self.path.read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def release(self, undo: bool = False) -> None:
        """Unlock; ``undo`` (a run refused before it wrote anything): also remove the lock file and the folders that
        ``acquire`` made, where nothing else was written into them, leaving OUTPUT_DIR as it was found."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
            if undo:
                for path in self._created:
                    with contextlib.suppress(OSError):  # a folder something else was written into stays
                        path.rmdir() if path.is_dir() else path.unlink()
            self._created = []
