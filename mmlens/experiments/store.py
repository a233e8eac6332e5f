"""A run directory: what an experiment wrote so far, written so that no crash can corrupt it.

Layout (docs/experiments.md, "What a run writes"):

    OUT/manifest.json               what the run is (identity) and, at the end, what it dropped
    OUT/parts/RRR-SSSSSS.parquet    rows of one batch of samples, by rank RRR, batch SSSSSS
    OUT/parts/RRR-SSSSSS.safetensors  that batch's tensors (experiments that save maps)
    OUT/parts/RRR-SSSSSS.json       the batch's commit record: its sample ids, their content
                                    hashes, dropped, failed, and each part's size and hash
    OUT/parts/damaged/              batches found damaged, moved aside and computed again
    OUT/lock-RRR                    rank RRR's writer lock (`integrity.RunLock`)

Every file is written to a temporary name, fsync'ed and renamed into place (atomic on POSIX).
The commit record is written last, so a batch counts only once its rows (and tensors) are
complete; a batch cut short by Ctrl-C or SIGKILL leaves no record and is computed again on
resume. Readers only read committed batches whose parts match their record's hashes, so
leftovers of an interrupted batch are never read, and a damaged batch is named (file and what
is wrong) and, by a resuming run, moved to ``parts/damaged/`` and computed again.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors.torch import save_file

from mmlens.experiments.integrity import RunLock, check_record, fsync_directory
from mmlens.loading import file_digest

_PART = re.compile(r"^(\d{3})-(\d{6})\.json$")


class RunMismatch(ValueError):
    """The output directory holds a run made with other settings or other data (or one that
    cannot be identified); resuming into it is refused."""


class DamagedRun(ValueError):
    """Committed batches of a run directory are damaged (named with what is wrong); running
    the same command again moves them aside and computes them again."""


@dataclass
class Batch:
    """What one batch of samples produced: result rows, tensors to save, and the samples that
    produced no rows because the run left them out (`dropped`: id -> reason) or because they
    failed (`failed`: id -> error message); `hashes`: each sample's content hash
    (`integrity.sample_digest`)."""

    sample_ids: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)


def write_atomically(path: Path, write: Any) -> None:
    """Call `write(temporary_path)`, fsync the result, then rename it to `path` (never
    half-written, and durable once renamed)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(temporary)
        with open(temporary, "rb+") as stream:
            os.fsync(stream.fileno())
        os.replace(temporary, path)
        fsync_directory(path.parent)
    finally:
        temporary.unlink(missing_ok=True)


def write_json(path: Path, value: Any) -> None:
    """`value` as indented JSON at `path`, written atomically (`write_atomically`)."""
    write_atomically(path, lambda p: p.write_text(json.dumps(value, indent=2, sort_keys=True)))


class RunStore:
    """The run directory `out` as seen by process `rank`.

    Examples:
        >>> store = RunStore(Path("runs/mine"))
        >>> store.open({"experiment": "mine"})    # creates it, or checks it can be resumed
        >>> store.finished()                      # sample ids already done (by any rank)
        set()
        >>> store.commit(Batch(["q1"], rows=[{"sample_id": "q1", "score": 0.5}]))
        >>> store.finished()
        {'q1'}
        >>> store.close()                         # lets the rank's writer lock go
    """

    def __init__(self, out: str | Path, rank: int = 0):
        self.out = Path(out)
        self.parts = self.out / "parts"
        self.manifest_path = self.out / "manifest.json"
        self.rank = rank
        self.lock = RunLock(self.out, rank)

    def open(
        self,
        identity: Mapping[str, Any],
        details: Mapping[str, Any] = (),
        *,
        relabel: bool = False,
    ) -> None:
        """Take rank `rank`'s writer lock (`integrity.RunLocked` if another process holds it),
        then create the directory with `identity` (and `details`, e.g. versions) in its
        manifest, or check that the manifest already there has the same identity (else
        `RunMismatch`, naming what differs). Committed batches without a readable manifest are
        refused unless `relabel` (then they are labelled with `identity`); a readable manifest
        of other settings is refused whatever `relabel` says."""
        self.parts.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()
        try:
            write = self._check_identity(identity, relabel)
        except BaseException:
            self.lock.release()
            raise
        if write:
            write_json(
                self.manifest_path,
                json.loads(json.dumps({**dict(details), "identity": identity}, default=str)),
            )

    def _check_identity(self, identity: Mapping[str, Any], relabel: bool) -> bool:
        """Whether a manifest is to be written (none yet, or a damaged one relabelled); a
        readable manifest is compared whatever `relabel` says."""
        if not self.manifest_path.exists():
            committed = sorted(p.name for p in self.parts.glob("*.json") if _PART.match(p.name))
            if committed and not relabel:
                raise RunMismatch(
                    f"{self.out} holds {len(committed)} committed batch(es) ({committed[0]}, ...) "
                    "but no manifest.json, so nothing says which settings made them; pass "
                    "--relabel (relabel=True) to label them with this command's settings, or "
                    "write to another --out directory"
                )
            return True
        try:
            existing = self.manifest()["identity"]
        except (DamagedRun, KeyError, TypeError) as error:
            if relabel:
                return True
            raise RunMismatch(
                f"{error}; nothing says which settings made its batches: pass --relabel "
                "(relabel=True) to label them with this command's settings, or write to "
                "another --out directory"
            ) from None
        wanted = json.loads(json.dumps(identity, sort_keys=True, default=str))
        differ = sorted(
            key for key in set(existing) | set(wanted) if existing.get(key) != wanted.get(key)
        )
        if differ:
            details = "; ".join(
                f"{key}: {_difference(existing.get(key), wanted.get(key))}" for key in differ
            )
            raise RunMismatch(
                f"{self.out} holds a run with other settings ({details}); resume it with "
                "the same command, or write to another --out directory"
            )
        return False

    def close(self) -> None:
        """Let this rank's writer lock go (idempotent)."""
        self.lock.release()

    def manifest(self) -> dict[str, Any]:
        """The manifest, or `DamagedRun` naming it if it is not a JSON object."""
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise DamagedRun(
                f"{self.manifest_path} is damaged ({type(error).__name__}: {error})"
            ) from None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("identity"), dict):
            raise DamagedRun(f"{self.manifest_path} is damaged (no 'identity' object)")
        return manifest

    def update_manifest(self, **entries: Any) -> None:
        """Add `entries` to the manifest (atomically; the identity is kept)."""
        manifest = self.manifest()
        manifest.update(json.loads(json.dumps(entries, sort_keys=True, default=str)))
        write_json(self.manifest_path, manifest)

    def records(self, repair: bool = False) -> list[dict[str, Any]]:
        """The commit records of every committed batch, of every rank, in (rank, batch) order,
        each checked with its parts (`integrity.check_record`).

        A damaged batch raises `DamagedRun` naming each one and what is wrong, or, with
        `repair`, is moved to ``parts/damaged/`` with a warning, so that its samples count as
        not done and are computed again.
        """
        records, damaged = [], []
        for path in sorted(self.parts.glob("*.json")):
            if not _PART.match(path.name):
                continue
            record, problem = check_record(path)
            if record is None:
                damaged.append((path, problem))
                continue
            record["stem"] = path.stem
            records.append(record)
        if damaged and not repair:
            raise DamagedRun(
                f"{len(damaged)} committed batch(es) of {self.out} are damaged: "
                + "; ".join(f"{path.name}: {problem}" for path, problem in damaged)
                + ". Run the same command again: it moves them aside and computes them again"
            )
        for path, problem in damaged:
            self._quarantine(path)
            warnings.warn(
                f"{path}: {problem}; moved to {self.parts / 'damaged'} and its samples are "
                "computed again",
                stacklevel=3,
            )
        return records

    def _quarantine(self, record: Path) -> None:
        aside = self.parts / "damaged"
        aside.mkdir(exist_ok=True)
        for path in self.parts.glob(f"{record.stem}.*"):
            try:
                os.replace(path, aside / path.name)
            except FileNotFoundError:  # another rank moved it first
                pass

    def finished(
        self,
        retry_failed: bool = False,
        repair: bool = False,
        records: Sequence[Mapping[str, Any]] | None = None,
    ) -> set[str]:
        """Ids of every sample a committed batch holds (measured, dropped or failed); with
        `retry_failed`, not those whose every attempt failed (they run again). `records`: the
        commit records if already read (else read, with `repair`)."""
        records = self.records(repair=repair) if records is None else records
        done = {sample_id for record in records for sample_id in record["sample_ids"]}
        if retry_failed:
            done -= set(outcomes(records)["failed"])
        return done

    def sample_hashes(self, records: Sequence[Mapping[str, Any]] | None = None) -> dict[str, str]:
        """The content hash each committed sample ran with (`integrity.sample_digest`), for the
        samples that have rows or were dropped (a failed attempt left nothing to mix with: a
        sample whose image was missing may run once the image is there)."""
        records = self.records() if records is None else records
        return {
            sample_id: digest
            for record in records
            for sample_id, digest in record.get("hashes", {}).items()
            if sample_id not in record["failed"]
        }

    def commit(self, batch: Batch) -> None:
        """Write `batch`: its rows (Parquet), tensors (safetensors), then its commit record,
        which names each part with its size and content hash."""
        stem = f"{self.rank:03d}-{self._next_index():06d}"
        parts: dict[str, dict[str, Any]] = {}
        if batch.rows:
            frame = pd.DataFrame(batch.rows)
            path = self.parts / f"{stem}.parquet"
            write_atomically(path, lambda p: frame.to_parquet(p, index=False))
            parts[path.name] = dict(bytes=path.stat().st_size, digest=file_digest(path))
        if batch.tensors:
            tensors = {name: t.detach().cpu().contiguous() for name, t in batch.tensors.items()}
            path = self.parts / f"{stem}.safetensors"
            write_atomically(path, lambda p: save_file(tensors, p))
            parts[path.name] = dict(bytes=path.stat().st_size, digest=file_digest(path))
        record = dict(
            sample_ids=batch.sample_ids,
            n_rows=len(batch.rows),
            tensors=bool(batch.tensors),
            dropped=batch.dropped,
            failed=batch.failed,
            hashes=batch.hashes,
            parts=parts,
        )
        write_json(self.parts / f"{stem}.json", record)

    def _next_index(self) -> int:
        """One past the highest batch number of this rank, leftovers of interrupted batches
        and batches moved aside included (so a new batch never reuses their names)."""
        paths = [
            *self.parts.glob(f"{self.rank:03d}-*"),
            *self.parts.glob(f"damaged/{self.rank:03d}-*"),
        ]
        numbers = [int(path.name[4:10]) for path in paths if path.name[4:10].isdigit()]
        return max(numbers, default=-1) + 1


def _difference(there: Any, now: Any) -> str:
    """What differs between two identity entries: the differing keys of two mappings, else
    both values."""
    if isinstance(there, dict) and isinstance(now, dict):
        keys = sorted(k for k in set(there) | set(now) if there.get(k) != now.get(k))
        return ", ".join(f"{k}: {there.get(k)!r} there, {now.get(k)!r} now" for k in keys)
    return f"{there!r} there, {now!r} now"


def outcomes(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Each committed sample's outcome over every attempt: ``done`` (rows or dropped, with the
    stem of its batch), ``dropped`` and ``failed`` (id -> reason; failed: every attempt
    failed, the last reason) and ``attempts`` (id -> failed attempts).

    Raises:
        ValueError: a sample has rows (or was dropped) in two batches: two processes ran the
            same shard.
    """
    done: dict[str, str] = {}
    dropped: dict[str, str] = {}
    failed: dict[str, str] = {}
    attempts: dict[str, int] = {}
    for record in records:
        for sample_id in record["sample_ids"]:
            if sample_id in record["failed"]:
                failed[sample_id] = record["failed"][sample_id]
                attempts[sample_id] = attempts.get(sample_id, 0) + 1
                continue
            if sample_id in done:
                raise ValueError(
                    f"sample {sample_id!r} is in batches {done[sample_id]} and {record['stem']} "
                    f"of the run: two processes ran the same shard"
                )
            done[sample_id] = record["stem"]
            if sample_id in record["dropped"]:
                dropped[sample_id] = record["dropped"][sample_id]
    failed = {k: v for k, v in failed.items() if k not in done}
    return dict(done=done, dropped=dropped, failed=failed, attempts=attempts)


def read_rows(out: str | Path) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """The rows of every committed batch of run `out`, and the commit records.

    Raises:
        ValueError: a sample was committed twice (a run written by two processes that were
            given overlapping shards).
        DamagedRun: a committed batch is damaged (named, with what is wrong).
    """
    store = RunStore(out)
    records = store.records()
    try:
        outcomes(records)
    except ValueError as error:
        raise ValueError(f"{error} ({store.out})") from None
    frames = [
        pd.read_parquet(store.parts / f"{record['stem']}.parquet")
        for record in records
        if record["n_rows"]
    ]
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return rows, records


def merged(records: Sequence[Mapping[str, Any]], key: str) -> dict[str, str]:
    """`key` ("dropped" or "failed") of every record, merged into one id -> reason mapping
    (`outcomes`: a sample that failed and later ran is not failed)."""
    return outcomes(records)[key]
