"""The one table format every benchmark prints."""

from __future__ import annotations


def print_table(title: str, header: tuple, rows: list[tuple]) -> None:
    widths = [max(len(str(v)) for v in col) for col in zip(header, *rows, strict=True)]
    print(f"\n{title}")
    print("  ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)))
