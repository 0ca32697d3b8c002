"""Print the README's configuration table from chalicelib.settings.ENVIRONMENT.

python -m tools.dev.configdoc          # print the table
python -m tools.dev.configdoc --write  # replace it in README.md
"""

from __future__ import annotations

import sys
from pathlib import Path

from chalicelib.settings import ENVIRONMENT

README = Path(__file__).resolve().parents[2] / "README.md"
START, END = "<!-- config:start -->", "<!-- config:end -->"


def table() -> str:
    rows = ["| Variable | Default | What it does |", "| --- | --- | --- |"]
    rows += [
        f"| `{name}` | {f'`{default}`' if default else '(empty)'} | {text} |" for name, default, text in ENVIRONMENT
    ]
    return "\n".join(rows)


def readme_with_table(text: str) -> str:
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    return f"{head}{START}\n{table()}\n{END}{tail}"


if __name__ == "__main__":
    if "--write" in sys.argv:
        README.write_text(readme_with_table(README.read_text()))
    else:
        print(table())
