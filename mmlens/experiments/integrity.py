"""What makes a run directory trustworthy (docs/experiments.md, "What a run guarantees"): the
hash of each sample's content, the lock that gives a run directory one writer per rank, and the
checks of commit records and their parts.

- `sample_digest`: question, answer(s), options, boxes, answer instruction and the image's
  bytes (the file's content, or the pixels of an image object), so that a resume with edited
  questions under the same ids, or with ``--images`` pointing at other pictures, is refused.
- `RunLock`: an advisory `fcntl.flock` on ``OUT/lock-RRR`` (one per rank: the ranks of one
  data-parallel run, or a SLURM array's shards, write their own parts and do not block each
  other; a second process of the same rank is refused, naming the holder's pid and host).
  The kernel releases it when the process ends, however it ends.
- `check_record`: a commit record is a JSON object with the fields the runner writes, and each
  part it names exists with the size and content hash it recorded.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image

from mmlens.loading import file_digest


def sample_digest(sample: Any, image_digests: dict[str, str] | None = None) -> str:
    """A hash of everything of `sample` that its rows depend on: its text fields, boxes and
    image content (`image_digests` caches file hashes by path: samples share images)."""
    digest = hashlib.blake2b(digest_size=12)
    fields = dict(
        question=sample.question,
        answer=sample.answer,
        answers=list(sample.answers),
        options=list(sample.options),
        question_type=sample.question_type,
        boxes=[list(box) for box in sample.boxes],
        suffix=sample.suffix,
    )
    digest.update(json.dumps(fields, sort_keys=True, default=str).encode())
    digest.update(b"\0" + image_digest(sample.image, image_digests).encode())
    return digest.hexdigest()


def image_digest(image: Any, cache: dict[str, str] | None = None) -> str:
    """The image's content hash: a file's bytes (``"missing"`` if there is no such file, so the
    sample fails when it runs), or an image object's mode, size and pixels."""
    if image is None:
        return "none"
    if isinstance(image, (str, Path)):
        key = str(image)
        if cache is not None and key in cache:
            return cache[key]
        try:
            value = file_digest(image)
        except OSError:
            value = "missing"
        if cache is not None:
            cache[key] = value
        return value
    if isinstance(image, Image.Image):
        digest = hashlib.blake2b(f"{image.mode}{image.size}".encode(), digest_size=16)
        try:
            digest.update(image.tobytes())  # decodes a lazily opened image (ScienceQA's)
        except Exception as error:  # noqa: BLE001 - the sample fails, with this error, when it runs
            return f"undecodable ({type(error).__name__})"
        return digest.hexdigest()
    try:  # numpy arrays and tensors
        import numpy as np

        array = np.ascontiguousarray(np.asarray(image))
        digest = hashlib.blake2b(f"{array.dtype}{array.shape}".encode(), digest_size=16)
        digest.update(array.tobytes())
        return digest.hexdigest()
    except Exception:  # noqa: BLE001 - an unknown object: its type stands for it
        return type(image).__name__


class RunLocked(RuntimeError):
    """Another live process writes this rank of the run directory."""


class RunLock:
    """An exclusive advisory lock on ``OUT/lock-RRR`` for rank `rank`, held until `release` (or
    the process' end). Taking a held lock raises `RunLocked` naming the holder.

    Examples:
        >>> Path("runs/locked").mkdir(parents=True, exist_ok=True)
        >>> with RunLock(Path("runs/locked"), rank=0) as lock:  # only this process writes rank 0
        ...     lock.path.name
        'lock-000'
    """

    def __init__(self, out: Path, rank: int = 0):
        self.path = Path(out) / f"lock-{rank:03d}"
        self.rank = rank
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise `RunLocked` naming the process that holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunLocked(
                f"{self.path.parent} is being written by another process ({holder}; lock file "
                f"{self.path}, rank {self.rank}); wait for it to finish or stop it, or write to "
                "another --out directory"
            ) from None
        except OSError:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Let the lock go (idempotent)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


_RECORD_FIELDS: dict[str, type | tuple[type, ...]] = {
    "sample_ids": list,
    "n_rows": int,
    "dropped": dict,
    "failed": dict,
    "parts": dict,
}


def check_record(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The commit record at `path` and None, or None and what is wrong with it or with one of
    the parts it names (missing, truncated, another batch's or changed content)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return None, f"the record is damaged ({type(error).__name__}: {error})"
    if not isinstance(record, dict):
        return None, f"the record is damaged (a {type(record).__name__}, not a JSON object)"
    for name, kind in _RECORD_FIELDS.items():
        if not isinstance(record.get(name), kind):
            return None, f"the record is damaged (field {name!r} missing or not {kind.__name__})"
    for name, part in record["parts"].items():
        problem = _check_part(path.parent / name, part)
        if problem:
            return None, f"part {name} {problem}"
    return record, None


def _check_part(path: Path, part: Mapping[str, Any]) -> str | None:
    if not isinstance(part, Mapping) or not {"bytes", "digest"} <= set(part):
        return "has no size and hash in the record"
    if not path.is_file():
        return "is missing"
    size = path.stat().st_size
    if size != part["bytes"]:
        kind = "truncated" if size < part["bytes"] else "longer than recorded"
        return f"is {kind} ({size} bytes, the record says {part['bytes']})"
    if file_digest(path) != part["digest"]:
        return "does not match the record's content hash (another batch's part, or changed)"
    return None


def fsync_directory(folder: Path) -> None:
    """Make renames in `folder` durable (a no-op where directories cannot be opened)."""
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
