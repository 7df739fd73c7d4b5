"""Typed report schemas: each report type declares its columns once, with a line of documentation.

The declaration gives three things: a pandera schema (checked on write and on read), the Arrow schema
the Parquet files are written with, and the README's table of columns (``lens schema``).
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import pandera.pandas as pa
import pyarrow

_ARROW = {"string": pyarrow.string(), "int64": pyarrow.int64(), "float64": pyarrow.float64(), "bool": pyarrow.bool_()}
_PANDAS = {"string": "str", "int64": "int64", "float64": "float64", "bool": "bool"}


@dataclass(frozen=True)
class Column:
    name: str
    dtype: str  # one of "string", "int64", "float64", "bool"
    doc: str
    nullable: bool = False


# Columns of every per-head report, declared once.
LAYER = Column("layer", "int64", "layer index, from 0")
HEAD = Column("head", "int64", "query-head index within the layer, from 0")

# Every row of every report carries these; the store adds them from the report's metadata.
STAMP_COLUMNS = (
    Column("run_id", "string", "census run that wrote the row"),
    Column("model", "string", "model name (also the partition directory)"),
    Column("detector", "string", "detector that wrote the row"),
)


class SchemaMismatchError(ValueError):
    pass


@dataclass(frozen=True)
class ReportSchema:
    name: str
    doc: str
    columns: tuple[Column, ...]

    @property
    def all_columns(self) -> tuple[Column, ...]:
        return STAMP_COLUMNS + self.columns

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.all_columns]

    def arrow_schema(self) -> pyarrow.Schema:
        return pyarrow.schema([pyarrow.field(c.name, _ARROW[c.dtype], nullable=c.nullable) for c in self.all_columns])

    def empty_frame(self) -> pd.DataFrame:
        return pd.DataFrame({c.name: pd.Series(dtype=_PANDAS[c.dtype]) for c in self.all_columns})

    def empty_rows(self) -> pd.DataFrame:
        """A report with no rows, as a detector returns it: its own columns, without the stamp columns."""
        return self.empty_frame()[[c.name for c in self.columns]]

    def pandera_schema(self) -> pa.DataFrameSchema:
        return pa.DataFrameSchema(
            {
                # Integers are accepted where floats are declared; nothing else is converted.
                c.name: pa.Column(_PANDAS[c.dtype], nullable=c.nullable, coerce=c.dtype == "float64")
                for c in self.all_columns
            },
            strict=True,
        )

    def conform(self, frame: pd.DataFrame, where: str) -> pd.DataFrame:
        """Check ``frame`` against the schema and return it with columns in schema order.

        ``where`` (a file or a report) starts every error message, followed by the column at fault.
        """
        missing = [c for c in self.column_names if c not in frame.columns]
        extra = [c for c in frame.columns if c not in self.column_names]
        if missing or extra:
            problems = [f"missing column {c!r}" for c in missing] + [f"unexpected column {c!r}" for c in extra]
            raise SchemaMismatchError(f"{where}: report {self.name!r}: {', '.join(problems)}")
        try:
            return self.pandera_schema().validate(frame[self.column_names])
        except pa.errors.SchemaError as error:
            column, message = getattr(error.schema, "name", None), str(error).splitlines()[0]
        except pa.errors.SchemaErrors as error:
            column, message = error.failure_cases["column"].iloc[0], "values cannot be converted to the declared type"
        raise SchemaMismatchError(f"{where}: report {self.name!r}: column {column!r}: {message}")


REPORT_SCHEMAS: dict[str, ReportSchema] = {}


def register_schema(schema: ReportSchema) -> ReportSchema:
    existing = REPORT_SCHEMAS.get(schema.name)
    if existing is not None and existing != schema:
        raise ValueError(f"report type {schema.name!r} is declared twice, differently")
    REPORT_SCHEMAS[schema.name] = schema
    return schema


def unregister_schema(name: str) -> None:
    """Forget a report type (its detector was unregistered)."""
    REPORT_SCHEMAS.pop(name, None)


def schema_for(report_type: str) -> ReportSchema:
    """The registered schema of ``report_type``. A detector registers its reports' schemas when it is
    registered (``probes.register``); the store never loads detectors itself."""
    try:
        return REPORT_SCHEMAS[report_type]
    except KeyError:
        raise SchemaMismatchError(
            f"unknown report type {report_type!r}; known: {', '.join(sorted(REPORT_SCHEMAS))} (a detector's report types are known "
            f"once it is registered: `import probes` registers the built-in detectors)"
        ) from None


def schema_markdown() -> str:
    """Every registered report type and its columns as Markdown (the README's store schema section)."""
    parts = []
    for name in sorted(REPORT_SCHEMAS):
        schema = REPORT_SCHEMAS[name]
        lines = [f"### `{name}`", "", schema.doc, "", "| column | type | meaning |", "|---|---|---|"]
        lines += [f"| `{c.name}` | {c.dtype}{' (nullable)' if c.nullable else ''} | {c.doc} |" for c in schema.all_columns]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)
