"""The per-sample result store: one SQLite file (WAL mode) that every result goes through.

A setup (every setting that can change a result) is identified by the sha256 of its canonical
JSON. Each finished batch of images is committed in one transaction (its per-image records for
every evaluation mode, its cost, its adversarial examples and its attacks' histories) before the
next batch starts, so a run killed at any moment loses at most the batch in flight, and rerunning
the same command computes only what is missing. The adversarial examples (stored_examples.py)
and the attacks' convergence histories (stored_histories.py) are kept under the setup's attack
key (its setup without the evaluation settings, runner.attack_key), so that another evaluation
of the same attack judges them instead of attacking again, and its rows show the history of the
attack that made them. Leaderboards and reports are generated from the store, never kept by hand.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd

from ..errors import UserError

SCHEMA = """
CREATE TABLE IF NOT EXISTS setups (
    setup_hash TEXT PRIMARY KEY, setup TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
    setup_hash TEXT NOT NULL, batch_start INTEGER NOT NULL, n INTEGER NOT NULL, cost TEXT NOT NULL,
    PRIMARY KEY (setup_hash, batch_start));
CREATE TABLE IF NOT EXISTS samples (
    setup_hash TEXT NOT NULL, mode TEXT NOT NULL, image_index INTEGER NOT NULL,
    batch_start INTEGER NOT NULL, record TEXT NOT NULL,
    PRIMARY KEY (setup_hash, mode, image_index));
CREATE TABLE IF NOT EXISTS sanity (
    setup_hash TEXT PRIMARY KEY, checks TEXT NOT NULL, wall_s REAL NOT NULL);
CREATE TABLE IF NOT EXISTS rows (
    setup_hash TEXT NOT NULL, mode TEXT NOT NULL, row TEXT NOT NULL, finished REAL NOT NULL,
    PRIMARY KEY (setup_hash, mode));
CREATE TABLE IF NOT EXISTS examples (
    attack_key TEXT NOT NULL, batch_start INTEGER NOT NULL, attack_index INTEGER NOT NULL,
    setup_hash TEXT NOT NULL, blob BLOB NOT NULL,
    PRIMARY KEY (attack_key, batch_start, attack_index));
CREATE TABLE IF NOT EXISTS histories (
    attack_key TEXT NOT NULL, batch_start INTEGER NOT NULL, attack_index INTEGER NOT NULL,
    setup_hash TEXT NOT NULL, blob BLOB NOT NULL,
    PRIMARY KEY (attack_key, batch_start, attack_index));
"""


TABLES = ("setups", "batches", "samples", "sanity", "rows", "examples", "histories")


@dataclass(frozen=True)
class StoredExamples:
    """One batch's stored adversarial examples (one blob per attack, in the setup's attack order),
    the setup that attacked (``source``) and the seconds its attack took, in all and per attack
    (None for batches stored before attacks were timed one by one)."""

    source: str
    attack_s: float
    blobs: list[bytes]
    attack_s_by_attack: list[float] | None = None


def setup_hash(setup: dict) -> str:
    """sha256 of the canonical JSON of a setup (sorted keys, no whitespace)."""
    return hashlib.sha256(json.dumps(setup, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


class ResultStore:
    """An open store; ``path`` is created with its folder when missing."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a commit survives a killed process
            self.db.executescript(SCHEMA)
        except (OSError, sqlite3.DatabaseError) as exc:
            raise UserError(f"cannot open the result store {self.path}: {exc}") from None

    def close(self) -> None:
        """Fold the write-ahead log into the file (so the store is one file again) and close."""
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.db.close()

    def delete(self) -> None:
        """Close and remove the file (with its WAL side files)."""
        self.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)

    def __enter__(self) -> "ResultStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _transaction(self, statements: Iterable[tuple[str, tuple]]) -> None:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            for sql, params in statements:
                self.db.execute(sql, params)
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # --- writing ---
    def register(self, key: str, setup: dict) -> None:
        self._transaction([(
            "INSERT OR IGNORE INTO setups VALUES (?, ?, ?)",
            (key, json.dumps(setup, sort_keys=True, default=str), time.time()),
        )])

    def commit_batch(
        self, key: str, start: int, records: dict[str, list[dict]], cost: dict,
        attack_key: str | None = None, examples: Sequence[bytes] = (), histories: Mapping[int, bytes] | None = None,
    ) -> None:
        """One batch, atomically: its per-image records per evaluation mode, its cost and, when it
        was attacked (not judged from stored examples), its adversarial examples (one blob per
        attack) and the histories of the attacks that record one (attack index -> blob) under
        ``attack_key``. Examples and histories already stored under that key are kept."""
        histories = histories or {}
        if (examples or histories) and attack_key is None:
            raise ValueError("adversarial examples and histories need their attack key")
        n = len(next(iter(records.values())))
        statements = [("INSERT OR REPLACE INTO batches VALUES (?, ?, ?, ?)", (key, start, n, json.dumps(cost)))]
        statements += [
            ("INSERT OR REPLACE INTO samples VALUES (?, ?, ?, ?, ?)", (key, mode, r["index"], start, json.dumps(r)))
            for mode, rows in records.items() for r in rows
        ]
        statements += [
            ("INSERT OR IGNORE INTO examples VALUES (?, ?, ?, ?, ?)", (attack_key, start, j, key, blob))
            for j, blob in enumerate(examples)
        ]
        statements += [
            ("INSERT OR IGNORE INTO histories VALUES (?, ?, ?, ?, ?)", (attack_key, start, j, key, blob))
            for j, blob in sorted(histories.items())
        ]
        self._transaction(statements)

    def save_sanity(self, key: str, checks: dict[str, list[dict]], wall_s: float) -> None:
        self._transaction([("INSERT OR REPLACE INTO sanity VALUES (?, ?, ?)", (key, json.dumps(checks), wall_s))])

    def save_rows(self, key: str, rows: dict[str, dict]) -> None:
        now = time.time()
        self._transaction([
            ("INSERT OR REPLACE INTO rows VALUES (?, ?, ?, ?)", (key, mode, json.dumps(row, default=str), now))
            for mode, row in rows.items()
        ])

    def forget(self, key: str) -> None:
        """Drop everything of one setup (a shard's copy, once merged into the main store)."""
        self._transaction([(f"DELETE FROM {table} WHERE setup_hash = ?", (key,)) for table in TABLES])

    # --- reading ---
    def is_empty(self) -> bool:
        return all(self.db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] == 0 for table in TABLES)

    def setup(self, key: str) -> dict | None:
        found = self.db.execute("SELECT setup FROM setups WHERE setup_hash = ?", (key,)).fetchone()
        return json.loads(found[0]) if found else None

    def done_batches(self, key: str) -> set[int]:
        return {s for (s,) in self.db.execute("SELECT batch_start FROM batches WHERE setup_hash = ?", (key,))}

    def batch_costs(self, key: str) -> list[dict]:
        rows = self.db.execute("SELECT cost FROM batches WHERE setup_hash = ? ORDER BY batch_start", (key,))
        return [json.loads(cost) for (cost,) in rows]

    def batches(self, key: str) -> list[tuple[int, dict[str, list[dict]], dict, str | None, list[bytes], dict[int, bytes]]]:
        """Every committed batch of a setup as the arguments of commit_batch after the key (start,
        records per mode, cost, attack key, the examples and histories this setup stored): what
        a shard sends."""
        records: dict[int, dict[str, list[dict]]] = {}
        for start, mode, record in self.db.execute(
            "SELECT batch_start, mode, record FROM samples WHERE setup_hash = ? ORDER BY batch_start, image_index",
            (key,),
        ):
            records.setdefault(start, {}).setdefault(mode, []).append(json.loads(record))
        examples: dict[int, tuple[str, list[bytes]]] = {}
        for start, attack_key, blob in self.db.execute(
            "SELECT batch_start, attack_key, blob FROM examples WHERE setup_hash = ? ORDER BY batch_start, attack_index",
            (key,),
        ):
            examples.setdefault(start, (attack_key, []))[1].append(bytes(blob))
        histories: dict[int, dict[int, bytes]] = {}
        for start, j, blob in self.db.execute(  # stored with the batch's examples, under the same key
            "SELECT batch_start, attack_index, blob FROM histories WHERE setup_hash = ?", (key,),
        ):
            histories.setdefault(start, {})[j] = bytes(blob)
        costs = self.db.execute("SELECT batch_start, cost FROM batches WHERE setup_hash = ? ORDER BY batch_start", (key,))
        return [(start, records.get(start, {}), json.loads(cost), *examples.get(start, (None, [])), histories.get(start, {}))
                for start, cost in costs]

    def stored_examples(self, attack_key: str) -> dict[int, StoredExamples]:
        """The adversarial examples stored under an attack key, per batch start (by whichever
        setup attacked that batch first)."""
        found: dict[int, StoredExamples] = {}
        for start, source, cost, blob in self.db.execute(
            "SELECT e.batch_start, e.setup_hash, b.cost, e.blob FROM examples e JOIN batches b "
            "ON b.setup_hash = e.setup_hash AND b.batch_start = e.batch_start "
            "WHERE e.attack_key = ? ORDER BY e.batch_start, e.attack_index",
            (attack_key,),
        ):
            if start not in found:
                cost = json.loads(cost)
                found[start] = StoredExamples(source, cost["attack_s"], [], cost.get("attack_s_by_attack"))
            found[start].blobs.append(bytes(blob))
        return found

    def histories(self, attack_key: str) -> dict[int, dict[int, bytes]]:
        """The attack histories stored under an attack key: per batch start, attack index -> blob."""
        found: dict[int, dict[int, bytes]] = {}
        for start, j, blob in self.db.execute(
            "SELECT batch_start, attack_index, blob FROM histories WHERE attack_key = ?", (attack_key,),
        ):
            found.setdefault(start, {})[j] = bytes(blob)
        return found

    def per_image(self, key: str, mode: str) -> pd.DataFrame:
        """Per-image records of one evaluation mode, in the order of the run's image subset."""
        rows = self.db.execute(
            "SELECT record FROM samples WHERE setup_hash = ? AND mode = ? ORDER BY batch_start, rowid",
            (key, mode),
        )
        return pd.DataFrame([json.loads(record) for (record,) in rows])

    def sanity(self, key: str) -> tuple[dict[str, list[dict]], float] | None:
        found = self.db.execute("SELECT checks, wall_s FROM sanity WHERE setup_hash = ?", (key,)).fetchone()
        return (json.loads(found[0]), found[1]) if found else None

    def rows(self) -> list[dict[str, Any]]:
        """Every finished row, oldest first, each with its setup hash."""
        found = self.db.execute("SELECT setup_hash, row FROM rows ORDER BY finished, setup_hash, mode")
        return [{**json.loads(row), "setup_hash": key} for key, row in found]
