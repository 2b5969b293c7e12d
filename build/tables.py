"""The one markdown-table writer: every table af3trt writes goes through `markdown_table` — the benchmark reports
(perf/) and the generated docs (build/sizing.py, build/memory_plan.py: docs/sizing.md).

A table is declared, not typed out: its columns (`Column`: header, where a cell comes from, its format, its
alignment) over records (dicts or dataclasses with named fields, as the results are stored):

    SWEEP = [Column("c", "concurrency", right=True), Column("req/s", "throughput_rps", "{:.2f}", right=True),
             Column("latency p50", ("latency_ms", "p50"), "{:.0f}", right=True)]
    lines += markdown_table(SWEEP, points)      # → ["| c | req/s | latency p50 |", "|---:|---:|---:|", "| 1 | …"]

A value that is None (a field not measured) is shown as MISSING, a `Text` as it is (a cell already written: a blank,
a failure's message), any other value through the column's format (a str.format pattern or a function)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MISSING = "—"


class Text(str):
    """A cell already written, shown as it is whatever the column's format: Text("") is a blank cell."""


BLANK = Text("")


@dataclass(frozen=True)
class Column:
    """One column. `value`: a record's field name (default: the header), a tuple of names into nested dicts
    (("latency_ms", "p50")), or a function of the record. `fmt`: a str.format pattern or a function of the value
    giving its text. `right`: right-aligned (numbers)."""

    header: str
    value: str | tuple[str, ...] | Callable[[Any], Any] | None = None
    fmt: str | Callable[[Any], str] = "{}"
    right: bool = False

    def cell(self, record: Any) -> str:
        return cell(self.get(record), self.fmt)

    def get(self, record: Any) -> Any:
        if callable(self.value):
            return self.value(record)
        path = (self.header,) if self.value is None else (self.value,) if isinstance(self.value, str) else self.value
        for name in path:
            if record is None or isinstance(record, Text):  # a Text on the way is the cell: ("ttft_ms": BLANK)
                return record
            record = record.get(name) if isinstance(record, Mapping) else getattr(record, name, None)
        return record


def cell(value: Any, fmt: str | Callable[[Any], str] = "{}") -> str:
    """A value as a table shows it: None as MISSING, a Text as it is, anything else through `fmt`."""
    if value is None:
        return MISSING
    if isinstance(value, Text):
        return value
    return fmt(value) if callable(fmt) else fmt.format(value)


def markdown_table(columns: Sequence[Column], records: Iterable[Any]) -> list[str]:
    """The lines of a markdown table: header, alignment row, one line per record (the header alone for none)."""
    return [_line(c.header for c in columns), "|" + "|".join("---:" if c.right else "---" for c in columns) + "|",
            *(_line(c.cell(r) for c in columns) for r in records)]


def _line(cells: Iterable[str]) -> str:
    return "|" + "|".join(f" {c} " if c else " " for c in cells) + "|"
