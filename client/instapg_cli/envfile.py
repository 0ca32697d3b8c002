"""Reading and appending to a dotenv file; only `rotate` rewrites lines, and only their values."""

from __future__ import annotations

import os
import re
from pathlib import Path

_LINE = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_.-]*)\s*=\s*(.*)$")


def read(path: Path) -> dict[str, str]:
    """KEY=value pairs of a dotenv file (quotes removed); {} when the file does not exist."""
    if not path.exists():
        return {}
    values: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        match = _LINE.match(line)
        if match and not line.lstrip().startswith("#"):
            value = match.group(2).strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            values[match.group(1)] = value
    return values


def append(path: Path, lines: list[str]) -> None:
    """Append lines, after a newline if the file does not end with one."""
    existing = path.read_text(encoding="utf-8") if path.exists() else ""
    prefix = "" if not existing or existing.endswith("\n") else "\n"
    if existing.strip():
        prefix += "\n"
    with path.open("a", encoding="utf-8") as fh:
        fh.write(prefix + "\n".join(lines) + "\n")


def replace(path: Path, values: dict[str, str]) -> None:
    """Set the value of existing KEY=... lines (a rotated password); other lines stay byte for byte."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    out = []
    for line in lines:
        match = _LINE.match(line.rstrip("\r\n"))
        if match and not line.lstrip().startswith("#") and match.group(1) in values:
            ending = line[len(line.rstrip("\r\n")) :]
            head = line[: match.start(2)]
            line = f"{head}{values[match.group(1)]}{ending}"
        out.append(line)
    # Written next to the file and renamed: a crash leaves the old file or the new one, never half.
    tmp = path.with_name(f".{path.name}.instapg-tmp")
    tmp.write_text("".join(out), encoding="utf-8")
    os.chmod(tmp, path.stat().st_mode & 0o777)
    tmp.replace(path)
