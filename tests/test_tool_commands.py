"""Every `python -m tools....` command and `tools/...` path the docs, the Makefile and the code name exists.

tools/ is split by audience (dev, ops, deploy, bench); a renamed command must
not live on in a README line, a docs page, an error hint or the Makefile.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMAND = re.compile(r"-m (tools(?:\.\w+)+)")
PATH = re.compile(r"\btools/[\w./-]*\w\.(?:py|sh)\b")


def _texts() -> dict[str, str]:
    files = [ROOT / "README.md", ROOT / "Makefile", *(ROOT / "docs").rglob("*.md"), *(ROOT / "infra").rglob("*.yaml")]
    for package in ("chalicelib", "tools", "tests", "client"):
        files += (ROOT / package).rglob("*.py")
    return {str(f.relative_to(ROOT)): f.read_text() for f in files if f.is_file()}


def test_named_tool_commands_exist():
    texts = _texts()
    named = {(m, name) for name, text in texts.items() for m in COMMAND.findall(text)}
    assert {m for m, _ in named} >= {"tools.dev.devstack", "tools.ops.hostctl", "tools.bench"}  # the scan sees them
    missing = []
    for module, where in sorted(named):
        path = ROOT.joinpath(*module.split("."))
        runnable = path.with_suffix(".py").is_file() or (path / "__main__.py").is_file()
        if not runnable:
            missing.append(f"{where}: python -m {module}")
    assert not missing, "commands named that do not exist:\n" + "\n".join(missing)


def test_named_tool_paths_exist():
    texts = _texts()
    missing = sorted(
        f"{where}: {p}" for where, text in texts.items() for p in PATH.findall(text) if not (ROOT / p).exists()
    )
    assert not missing, "tools/ paths named that do not exist:\n" + "\n".join(missing)
