"""The CLI's tables: as wide as the terminal at most, folding long cells rather than cutting them."""

from __future__ import annotations

from durable_sidecar.tools import tables

URL = "https://api.example.com/v1/chat/completions?session=" + "a" * 60


def test_a_table_fits_the_width_and_folds_the_wide_column_without_losing_text() -> None:
    rows = [[str(n), "POST", URL, "completed"] for n in range(1, 4)]
    text = tables.render("run r1", ["seq", "method", "url", "state"], rows, wide={2}, width=60)
    lines = text.splitlines()
    assert lines[0] == "run r1" and lines[1].split() == ["seq", "method", "url", "state"]
    assert max(map(len, lines)) <= 60
    assert text.count("completed") == 3  # short columns stay whole, one per row
    start, end = lines[1].index("url"), lines[1].index("state")
    first_row = lines[3:3 + (len(lines) - 3) // 3]
    assert "".join(line[start:end].strip() for line in first_row) == URL  # folded, every character kept


def test_a_narrow_table_is_left_as_it_is() -> None:
    text = tables.render("runs", ["run", "steps"], [["r1", "3"]], wide={0}, width=200)
    assert text.splitlines()[2:] == ["───  ─────", "r1   3"]


def test_piped_tables_keep_whole_rows_and_columns_is_honoured(monkeypatch) -> None:
    """`durable runs | grep x` or `> file`: no terminal, so no 80-column folding of run ids; an
    explicit $COLUMNS still fits the table."""
    import io

    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.setattr("sys.stdout", io.StringIO())  # piped: not a terminal
    text = tables.render("run", ["seq", "url"], [["1", URL * 2]], wide={1})
    assert URL * 2 in text
    monkeypatch.setenv("COLUMNS", "60")
    assert max(map(len, tables.render("run", ["seq", "url"], [["1", URL]], wide={1}).splitlines())) <= 60
