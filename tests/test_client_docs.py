"""docs/client.md and docs/mcp.md held to the code: exit codes, commands, tools, config snippets."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import anyio
from instapg_cli import cli

ROOT = Path(__file__).resolve().parent.parent
CLIENT_DOC = (ROOT / "docs" / "client.md").read_text()
MCP_DOC = (ROOT / "docs" / "mcp.md").read_text()
README = (ROOT / "README.md").read_text()


def _table(text: str, header: str) -> list[list[str]]:
    """Rows of the markdown table whose header row starts with `header`."""
    lines = text[text.index(header) :].splitlines()
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_exit_code_table_is_the_codes_the_cli_returns():
    documented = {int(row[0]) for row in _table(CLIENT_DOC, "| Code | Meaning |")}
    constants = {value for name, value in vars(cli).items() if name.startswith("EXIT_")}
    assert documented == constants


def test_command_table_lists_every_command():
    documented = {re.match(r"`instapg (\w+)", row[0]).group(1) for row in _table(CLIENT_DOC, "| Command | Needs |")}
    assert documented == set(cli.COMMANDS)
    for row in _table(CLIENT_DOC, "| Command | Needs |"):
        name = re.match(r"`instapg (\w+)", row[0]).group(1)
        # the account's commands take --api-key, and the table says they need one
        assert ("API key" in row[1]) == (name in ("rotate", "delete", "list", "usage", "copy", "reset")), row
        # claim takes one too (it then claims through the API), but needs none
        with_key = ("status", "claim", "rotate", "delete", "list", "usage", "copy", "reset")
        assert ("--api-key" in cli._parser(name).format_help()) == (name in with_key)


def _tools(api_key: str | None) -> dict[str, str]:
    from instapg_cli.mcp_server import build_server
    from mcp import Client

    async def listed():
        async with Client(build_server("http://127.0.0.1:9", api_key)) as client:
            return {t.name: t.description for t in (await client.list_tools()).tools}

    return anyio.run(listed)


def test_mcp_tool_table_is_the_tools_the_server_offers():
    rows = _table(MCP_DOC, "| Tool | Needs |")
    documented = {row[0].strip("`"): row[1] for row in rows}
    with_key, without_key = _tools("ipg_test"), _tools(None)
    assert set(documented) == set(with_key)
    assert {name for name, needs in documented.items() if needs == "API key"} == set(with_key) - set(without_key)
    for name in with_key:
        assert f"`{name}`" in README  # the README's summary names every tool too
    # Descriptions written for an agent: what expires, what is secret, what is read-only.
    assert "expires" in with_key["create_database"].lower() and "secret" in with_key["create_database"].lower()
    assert "read-only by default" in with_key["run_sql"].lower()
    assert "cannot be undone" in with_key["delete_database"]


def test_config_snippets_start_the_installed_command():
    scripts = tomllib.loads((ROOT / "client" / "pyproject.toml").read_text())["project"]["scripts"]
    blocks = [m for doc in (README, MCP_DOC) for m in re.findall(r"```json\n(.*?)```", doc, re.S)]
    snippets = [b for b in blocks if "mcpServers" in b]
    assert len(snippets) >= 2
    for snippet in snippets:
        server = json.loads(snippet)["mcpServers"]["instapg"]
        assert server["command"] in scripts and scripts[server["command"]] == "instapg_cli.mcp_server:main"
        assert set(server["env"]) <= {"INSTAPG_URL", "INSTAPG_API_KEY"}
