# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""The ratings database of a reader study (``STUDY/ratings.sqlite``).

Every submitted case is one transaction, committed before the server answers, so a server that stops
mid-study loses nothing that a reader saw acknowledged. Tables:

* ``readers(reader_id, case_order, created_at)`` — each reader's own random case order (JSON list);
* ``responses(reader_id, case_id, answer, seconds, submitted_at)`` — "real"/"synthetic" and time on the case;
* ``scores(reader_id, case_id, question, score)`` — the 1-5 Likert answers.
"""

from __future__ import annotations

import json
import os
import random
import re
import sqlite3
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..data.errors import DataError

__all__ = ["DB_FILE", "READER_ID_PATTERN", "RatingsDB", "reader_order"]

DB_FILE = "ratings.sqlite"
#: reader ids: letters, digits, ``_ . -``, 1-64 characters
READER_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
ANSWERS = ("real", "synthetic")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS readers (
    reader_id TEXT PRIMARY KEY, case_order TEXT NOT NULL, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS responses (
    reader_id TEXT NOT NULL, case_id TEXT NOT NULL, answer TEXT NOT NULL CHECK (answer IN ('real', 'synthetic')),
    seconds REAL NOT NULL, submitted_at REAL NOT NULL, PRIMARY KEY (reader_id, case_id));
CREATE TABLE IF NOT EXISTS scores (
    reader_id TEXT NOT NULL, case_id TEXT NOT NULL, question TEXT NOT NULL,
    score INTEGER NOT NULL CHECK (score BETWEEN 1 AND 5), PRIMARY KEY (reader_id, case_id, question));
"""


def reader_order(cases: Sequence[str], seed: int, reader_id: str) -> list[str]:
    """The order in which ``reader_id`` sees the cases: a permutation seeded by the study seed and the id.

    Args:
        cases: the study's case ids.
        seed: the study seed (from the private key).
        reader_id: the reader.

    Returns:
        The cases, shuffled.
    """
    return random.Random(f"{seed}:{reader_id}").sample(list(cases), len(cases))


class RatingsDB:
    """Reads and writes the ratings of one study; every method opens its own connection (thread-safe).

    Args:
        path: the SQLite file (created if missing).
        cases: the study's case ids.
        questions: the Likert question ids.
        seed: the study seed, for :func:`reader_order`.
    """

    def __init__(self, path: str | os.PathLike, cases: Sequence[str], questions: Sequence[str], seed: int) -> None:
        self.path = Path(path)
        self.cases = list(cases)
        self.questions = list(questions)
        self.seed = int(seed)
        with self._connect() as con:
            con.executescript(_SCHEMA)
        con.close()

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30)

    def login(self, reader_id: str) -> dict[str, Any]:
        """Register ``reader_id`` on first use and return their order and progress.

        Args:
            reader_id: the reader.

        Returns:
            ``{"reader": id, "order": [case ids], "done": [rated case ids]}``.

        Raises:
            ValueError: the id has characters other than letters, digits and ``_ . -``.
        """
        if not READER_ID_PATTERN.match(reader_id or ""):
            raise ValueError(f"reader id {reader_id!r}: use 1-64 letters, digits, '_', '.' or '-'")
        con = self._connect()
        try:
            with con:
                row = con.execute("SELECT case_order FROM readers WHERE reader_id = ?", (reader_id,)).fetchone()
                if row is None:
                    order = reader_order(self.cases, self.seed, reader_id)
                    con.execute("INSERT INTO readers VALUES (?, ?, ?)", (reader_id, json.dumps(order), time.time()))
                else:
                    order = json.loads(row[0])
            done = {r[0] for r in con.execute("SELECT case_id FROM responses WHERE reader_id = ?", (reader_id,))}
        finally:
            con.close()
        return {"reader": reader_id, "order": order, "done": [c for c in order if c in done]}

    def record(
        self, reader_id: str, case_id: str, scores: Mapping[str, Any], answer: str, seconds: float
    ) -> int:
        """Store one reader's answers for one case (replacing earlier ones) in one committed transaction.

        Args:
            reader_id: a reader who has logged in.
            case_id: a case of the study.
            scores: question id -> Likert score 1-5, every question.
            answer: ``"real"`` or ``"synthetic"``.
            seconds: time the reader spent on the case.

        Returns:
            The number of cases this reader has rated.

        Raises:
            ValueError: unknown reader or case, a missing question, a score outside 1-5, or a bad answer.
        """
        if case_id not in self.cases:
            raise ValueError(f"unknown case {case_id!r}")
        if answer not in ANSWERS:
            raise ValueError(f"answer must be 'real' or 'synthetic', got {answer!r}")
        missing = [q for q in self.questions if q not in scores]
        if missing:
            raise ValueError(f"no score for question(s) {missing}")
        values = {}
        for q in self.questions:
            v = scores[q]
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 5:
                raise ValueError(f"score of {q!r} must be an integer 1-5, got {v!r}")
            values[q] = v
        seconds = float(seconds)
        if not seconds >= 0:
            raise ValueError(f"seconds must be >= 0, got {seconds!r}")
        con = self._connect()
        try:
            with con:  # one transaction, committed on leaving the block
                if con.execute("SELECT 1 FROM readers WHERE reader_id = ?", (reader_id,)).fetchone() is None:
                    raise ValueError(f"unknown reader {reader_id!r}: log in first")
                con.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?)",
                            (reader_id, case_id, answer, seconds, time.time()))
                con.executemany("INSERT OR REPLACE INTO scores VALUES (?, ?, ?, ?)",
                                [(reader_id, case_id, q, v) for q, v in values.items()])
            (n,) = con.execute("SELECT COUNT(*) FROM responses WHERE reader_id = ?", (reader_id,)).fetchone()
        finally:
            con.close()
        return int(n)

    def rows(self) -> list[dict[str, Any]]:
        """Every rating, one row per reader, case and question.

        Returns:
            Dicts with ``reader``, ``case``, ``question``, ``score``, ``answer``, ``seconds``, ``submitted_at``.
        """
        con = self._connect()
        try:
            cur = con.execute(
                "SELECT s.reader_id, s.case_id, s.question, s.score, r.answer, r.seconds, r.submitted_at "
                "FROM scores s JOIN responses r ON s.reader_id = r.reader_id AND s.case_id = r.case_id "
                "ORDER BY s.reader_id, s.case_id, s.question"
            )
            keys = ("reader", "case", "question", "score", "answer", "seconds", "submitted_at")
            return [dict(zip(keys, row)) for row in cur]
        finally:
            con.close()

    @staticmethod
    def require(path: str | os.PathLike) -> Path:
        """Check that a ratings file exists.

        Args:
            path: the SQLite file.

        Returns:
            The path.

        Raises:
            DataError: it does not exist.
        """
        p = Path(path)
        if not p.is_file():
            raise DataError(p, "is missing: no reader has rated this study yet (run `meddiff reader-study serve`)")
        return p
