"""Reading and writing Parquet tables under the file contracts (DESIGN.md).

Provenance lives in the file's key-value metadata under the key ``fdivctl``
(a JSON object: schema version, model and tokenizer hashes, parameters,
fdivctl version, and under ``versions`` the libraries of the process that wrote
the file, :func:`fdivctl.io.versions.library_versions`).  Writes are atomic.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fdivctl import __version__
from fdivctl.errors import UserError
from fdivctl.io.atomic import atomic_path
from fdivctl.io.versions import library_versions

METADATA_KEY = b"fdivctl"


def open_parquet(path: str | Path) -> pq.ParquetFile:
    """A Parquet file opened for streaming (footer read only), or one UserError (missing, not Parquet)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise UserError(f"{path}: not a readable Parquet file ({err}){_conversion_hint(path)}") from None


#: how to turn a table in another common format into Parquet, by file suffix
_CONVERSIONS = {
    ".jsonl": "pyarrow.json.read_json", ".csv": "pyarrow.csv.read_csv",
}


def _conversion_hint(path: Path) -> str:
    """For a JSON Lines or CSV file, the one line of Python that writes it as Parquet."""
    reader = _CONVERSIONS.get(path.suffix.lower())
    if reader is None:
        return ""
    module = reader.rsplit(".", 1)[0]
    return (f"; fdivctl reads Parquet: convert it with python -c \"import {module}, pyarrow.parquet as pq; "
            f"pq.write_table({reader}('{path}'), '{path.with_suffix('.parquet')}')\"")


def read_table(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """A Parquet file as a table, or one clear UserError (missing, not Parquet, lacking a requested column, empty)."""
    require_columns(open_parquet(path).schema_arrow.empty_table(), path, columns or [])
    try:
        table = pq.read_table(path, columns=columns)
    except (pa.ArrowInvalid, OSError) as err:
        raise UserError(f"{path}: not a readable Parquet file ({err})") from None
    if table.num_rows == 0:
        raise UserError(f"{path}: the table is empty")
    return table


def provenance(path: str | Path) -> dict:
    """The ``fdivctl`` provenance record of a Parquet file, or {} when it has none (UserError: no Parquet file)."""
    metadata = open_parquet(path).schema_arrow.metadata or {}
    raw = metadata.get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def _with_record(schema: pa.Schema, record: dict) -> pa.Schema:
    record = {"fdivctl_version": __version__, **record, "versions": library_versions()}
    return schema.with_metadata({**(schema.metadata or {}), METADATA_KEY: json.dumps(record, sort_keys=True).encode()})


def write_table(path: str | Path, table: pa.Table, record: dict) -> None:
    """Write ``table`` atomically with ``record`` (plus the fdivctl and library versions) as its provenance."""
    with atomic_path(path) as tmp:
        pq.write_table(table.replace_schema_metadata(_with_record(table.schema, record).metadata), tmp)


def write_tables(path: str | Path, tables: Iterable[pa.Table], record: dict) -> int:
    """Stream ``tables`` (one schema) into one Parquet file, atomically; return the row count.

    Only one table is in memory at a time.
    """
    writer, rows = None, 0
    with atomic_path(path) as tmp:
        try:
            for table in tables:
                if writer is None:
                    schema = _with_record(table.schema, record)
                    writer = pq.ParquetWriter(tmp, schema)
                writer.write_table(table.cast(schema))
                rows += table.num_rows
        finally:
            if writer is not None:
                writer.close()
        if writer is None:
            raise UserError(f"{path}: nothing to write")
    return rows


def require_columns(table: pa.Table, path: str | Path, needed: list[str], hint: str = "") -> None:
    """One UserError naming every column of ``needed`` that ``table`` lacks (and the ones it has)."""
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise UserError(f"{path}: missing column{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}"
                        f"{hint}; it has {', '.join(table.column_names)}")


def require_no_nulls(path: str | Path, name: str, column: pa.ChunkedArray) -> None:
    """One UserError naming the first row where ``column`` (the column ``name`` of ``path``) is null."""
    if column.null_count:
        row = pc.index(pc.is_null(column), True).as_py()
        raise UserError(f"{path}: column {name!r} is null in row {row}")


def require_finite(path: str | Path, name: str, column: pa.ChunkedArray) -> None:
    """One UserError naming the first row where the number column ``name`` is null, NaN or ±inf."""
    require_no_nulls(path, name, column)
    if not (pa.types.is_floating(column.type) or pa.types.is_integer(column.type)):
        raise UserError(f"{path}: column {name!r} must hold numbers, got {column.type}")
    values = column.to_numpy()
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        raise UserError(f"{path}: column {name!r} is {values[bad[0]]} in row {int(bad[0])}: it must be finite")


def require_prompt_ids(path: str | Path, column: pa.ChunkedArray) -> None:
    """One UserError for a null or a repeated ``prompt_id`` in a prompts table, naming the rows: samples are
    keyed and grouped by it (a repeated id would put two prompts' samples in one GRPO group)."""
    require_no_nulls(path, "prompt_id", column)
    first_row: dict[str, int] = {}
    for row, value in enumerate(column.to_pylist()):
        key = str(value)
        if key in first_row:
            raise UserError(f"{path}: prompt_id {key!r} is in rows {first_row[key]} and {row}: every prompt needs "
                            "its own id")
        first_row[key] = row


def is_int_list(field_type: pa.DataType) -> bool:
    return (pa.types.is_list(field_type) or pa.types.is_large_list(field_type)) and pa.types.is_integer(
        field_type.value_type
    )
