"""The ``sql`` verifier: execution match on SQLite, as BIRD and Spider score it.

The predicted query (a fenced ```sql block of the completion if present, else
the whole completion) and the gold query (``answer``) run against the database
(``db_path`` column or ``--db``) opened read-only (``mode=ro`` URI plus
``PRAGMA query_only``) with an authorizer that allows reading and nothing
else (no ATTACH, which ``query_only`` would let create files), each under a
time limit enforced by SQLite's progress handler.  Correct iff both succeed and their result rows are equal as
multisets.  An error or a timeout scores 0 with the message in the verdict.
Nothing can write to the database.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections import Counter
from pathlib import Path

_ALLOWED = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}
_FENCE = re.compile(r"```(?:sql|sqlite)?\s*(.*?)```", re.IGNORECASE | re.DOTALL)


def extract_sql(completion: str) -> str:
    blocks = _FENCE.findall(completion)
    return (blocks[-1] if blocks else completion).strip().rstrip(";")


def _run(db_path: str, query: str, time_limit: float) -> list[tuple]:
    if not Path(db_path).is_file():
        raise FileNotFoundError(f"no database at {db_path}")
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=time_limit)
    try:
        conn.execute("PRAGMA query_only = ON")
        conn.set_authorizer(lambda action, *_: sqlite3.SQLITE_OK if action in _ALLOWED else sqlite3.SQLITE_DENY)
        deadline = time.monotonic() + time_limit
        conn.set_progress_handler(lambda: int(time.monotonic() > deadline), 1000)
        return conn.execute(query).fetchall()
    finally:
        conn.close()


def verify_sql(completion: str, gold: str, db_path: str, time_limit: float = 5.0) -> tuple[bool, str]:
    predicted = extract_sql(completion)
    try:
        gold_rows = _run(db_path, gold, time_limit)
    except sqlite3.Error as err:
        return False, f"gold query failed: {err}"
    try:
        rows = _run(db_path, predicted, time_limit)
    except sqlite3.OperationalError as err:
        reason = "timeout" if "interrupted" in str(err) else str(err)
        return False, f"predicted query failed: {reason}"
    except (sqlite3.Error, ValueError) as err:
        return False, f"predicted query failed: {err}"
    if Counter(rows) == Counter(gold_rows):
        return True, f"execution match ({len(rows)} rows)"
    return False, f"execution mismatch ({len(rows)} rows vs {len(gold_rows)} gold rows)"
