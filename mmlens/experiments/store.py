"""A run directory: what an experiment wrote so far, written so that no crash can corrupt it.

Layout (docs/experiments.md, "What a run writes"):

    OUT/manifest.json               what the run is (identity) and, at the end, what it dropped
    OUT/parts/RRR-SSSSSS.parquet    rows of one batch of samples, by rank RRR, batch SSSSSS
    OUT/parts/RRR-SSSSSS.safetensors  that batch's tensors (experiments that save maps)
    OUT/parts/RRR-SSSSSS.json       the batch's commit record: its sample ids, dropped, failed

Every file is written to a temporary name and renamed into place (atomic on POSIX). The commit
record is written last, so a batch counts only once its rows (and tensors) are complete; a
batch cut short by Ctrl-C or SIGKILL leaves no record and is computed again on resume. Readers
only read committed batches, so leftovers of an interrupted batch are never read.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors.torch import save_file

_PART = re.compile(r"^(\d{3})-(\d{6})\.json$")


class RunMismatch(ValueError):
    """The output directory holds a run made with other settings; resuming into it is refused."""


@dataclass
class Batch:
    """What one batch of samples produced: result rows, tensors to save, and the samples that
    produced no rows because the run left them out (`dropped`: id -> reason) or because they
    failed (`failed`: id -> error message)."""

    sample_ids: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)


def write_atomically(path: Path, write: Any) -> None:
    """Call `write(temporary_path)`, then rename the result to `path` (never half-written)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_json(path: Path, value: Any) -> None:
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
    """

    def __init__(self, out: str | Path, rank: int = 0):
        self.out = Path(out)
        self.parts = self.out / "parts"
        self.manifest_path = self.out / "manifest.json"
        self.rank = rank

    def open(self, identity: Mapping[str, Any], details: Mapping[str, Any] = ()) -> None:
        """Create the directory with `identity` (and `details`, e.g. versions) in its
        manifest, or check that the manifest already there has the same identity (else
        `RunMismatch`, naming what differs)."""
        self.parts.mkdir(parents=True, exist_ok=True)
        if self.manifest_path.exists():
            existing = json.loads(self.manifest_path.read_text())["identity"]
            wanted = json.loads(json.dumps(identity, sort_keys=True, default=str))
            differ = sorted(
                key for key in set(existing) | set(wanted) if existing.get(key) != wanted.get(key)
            )
            if differ:
                details = "; ".join(
                    f"{key}: {existing.get(key)!r} there, {wanted.get(key)!r} now" for key in differ
                )
                raise RunMismatch(
                    f"{self.out} holds a run with other settings ({details}); resume it with "
                    "the same command, or write to another --out directory"
                )
            return
        write_json(
            self.manifest_path,
            json.loads(json.dumps({**dict(details), "identity": identity}, default=str)),
        )

    def manifest(self) -> dict[str, Any]:
        return json.loads(self.manifest_path.read_text())

    def update_manifest(self, **entries: Any) -> None:
        """Add `entries` to the manifest (atomically; the identity is kept)."""
        manifest = self.manifest()
        manifest.update(json.loads(json.dumps(entries, sort_keys=True, default=str)))
        write_json(self.manifest_path, manifest)

    def records(self) -> list[dict[str, Any]]:
        """The commit records of every committed batch, of every rank, in (rank, batch) order."""
        records = []
        for path in sorted(self.parts.glob("*.json")):
            if _PART.match(path.name):
                record = json.loads(path.read_text())
                record["stem"] = path.stem
                records.append(record)
        return records

    def finished(self) -> set[str]:
        """Ids of every sample a committed batch holds (measured, dropped or failed)."""
        return {sample_id for record in self.records() for sample_id in record["sample_ids"]}

    def commit(self, batch: Batch) -> None:
        """Write `batch`: its rows (Parquet), tensors (safetensors), then its commit record."""
        stem = f"{self.rank:03d}-{self._next_index():06d}"
        if batch.rows:
            frame = pd.DataFrame(batch.rows)
            write_atomically(
                self.parts / f"{stem}.parquet", lambda p: frame.to_parquet(p, index=False)
            )
        if batch.tensors:
            tensors = {name: t.detach().cpu().contiguous() for name, t in batch.tensors.items()}
            write_atomically(self.parts / f"{stem}.safetensors", lambda p: save_file(tensors, p))
        record = dict(
            sample_ids=batch.sample_ids,
            n_rows=len(batch.rows),
            tensors=bool(batch.tensors),
            dropped=batch.dropped,
            failed=batch.failed,
        )
        write_json(self.parts / f"{stem}.json", record)

    def _next_index(self) -> int:
        """One past the highest batch number of this rank, leftovers of interrupted batches
        included (so a new batch never reuses their names)."""
        numbers = [
            int(path.name[4:10])
            for path in self.parts.glob(f"{self.rank:03d}-*")
            if path.name[4:10].isdigit()
        ]
        return max(numbers, default=-1) + 1


def read_rows(out: str | Path) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """The rows of every committed batch of run `out`, and the commit records.

    Raises:
        ValueError: a sample was committed twice (a run written by two processes that were
            given overlapping shards).
    """
    store = RunStore(out)
    records = store.records()
    seen: dict[str, str] = {}
    for record in records:
        for sample_id in record["sample_ids"]:
            if sample_id in seen:
                raise ValueError(
                    f"sample {sample_id!r} is in batches {seen[sample_id]} and {record['stem']} "
                    f"of {store.out}: two processes ran the same shard"
                )
            seen[sample_id] = record["stem"]
    frames = [
        pd.read_parquet(store.parts / f"{record['stem']}.parquet")
        for record in records
        if record["n_rows"]
    ]
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return rows, records


def merged(records: Sequence[Mapping[str, Any]], key: str) -> dict[str, str]:
    """`key` ("dropped" or "failed") of every record, merged into one id -> reason mapping."""
    return {sample_id: reason for record in records for sample_id, reason in record[key].items()}
