"""Reading and writing Parquet tables under the file contracts (DESIGN.md).

Provenance lives in the file's key-value metadata under the key ``fdivctl``
(a JSON object: schema version, model and tokenizer hashes, parameters,
fdivctl version).  Writes are atomic.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from fdivctl import __version__
from fdivctl.errors import UserError
from fdivctl.io.atomic import atomic_path

METADATA_KEY = b"fdivctl"


def read_table(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """A Parquet file as a table, or one clear UserError (missing, not Parquet, empty)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        table = pq.read_table(path, columns=columns)
    except (pa.ArrowInvalid, OSError) as err:
        raise UserError(f"{path}: not a readable Parquet file ({err})") from None
    if table.num_rows == 0:
        raise UserError(f"{path}: the table is empty")
    return table


def provenance(path: str | Path) -> dict:
    """The ``fdivctl`` provenance record of a Parquet file, or {} when it has none."""
    metadata = pq.read_schema(path).metadata or {}
    raw = metadata.get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def write_table(path: str | Path, table: pa.Table, record: dict) -> None:
    """Write ``table`` atomically with ``record`` (plus the fdivctl version) as its provenance."""
    record = {"fdivctl_version": __version__, **record}
    metadata = {**(table.schema.metadata or {}), METADATA_KEY: json.dumps(record, sort_keys=True).encode()}
    with atomic_path(path) as tmp:
        pq.write_table(table.replace_schema_metadata(metadata), tmp)


def require_columns(table: pa.Table, path: str | Path, needed: list[str], hint: str = "") -> None:
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise UserError(f"{path}: missing column {missing[0]!r}{hint}; it has {', '.join(table.column_names)}")


def is_int_list(field_type: pa.DataType) -> bool:
    return (pa.types.is_list(field_type) or pa.types.is_large_list(field_type)) and pa.types.is_integer(
        field_type.value_type
    )
