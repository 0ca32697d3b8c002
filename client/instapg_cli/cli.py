"""The `instapg` command.

instapg [--env .env] [--key DATABASE_URL] [--prefix PUBLIC_] [--ref NAME] [--seed FILE.sql]
        [--logical-replication] [--json] [--yes] [--url BASE]
instapg seed FILE.sql [--env .env] [--key DATABASE_URL]
instapg claim [--env .env] [--prefix PUBLIC_] [--no-browser]
instapg status [--env .env] [--prefix PUBLIC_]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

from instapg_cli import __version__, envfile
from instapg_cli.api import ApiError, Client

DEFAULT_URL = "http://127.0.0.1:8000"  # `make dev`'s local stack
COMMANDS = ("claim", "status", "seed")


class Failure(Exception):
    """Ends the command with one line on stderr and exit status 1."""


def _common(parser: argparse.ArgumentParser, key: bool = True) -> None:
    parser.add_argument("--env", default=".env", type=Path, help="dotenv file to write/read (default: .env)")
    if key:
        parser.add_argument("--key", default="DATABASE_URL", help="name of the connection string variable")
    parser.add_argument("--prefix", default="PUBLIC_", help="prefix of the claim URL variable (default: PUBLIC_)")


def _parser(command: str | None) -> argparse.ArgumentParser:
    if command is None:
        parser = argparse.ArgumentParser(
            prog="instapg",
            description="Create a PostgreSQL database and append its connection strings to .env.",
            epilog="Other commands: instapg claim | status | seed FILE.sql (each takes --help).",
        )
        _common(parser)
        parser.add_argument("--ref", default="instapg-cli", help="who is asking (sent as ref; default: instapg-cli)")
        parser.add_argument("--seed", type=Path, metavar="FILE.sql", help="run this SQL file on the new database")
        parser.add_argument("--logical-replication", action="store_true", help="ask for logical replication")
        parser.add_argument("--json", action="store_true", help="print the server's answer; write nothing")
        parser.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
        parser.add_argument("--url", help=f"instapg server (default: $INSTAPG_URL or {DEFAULT_URL})")
        parser.add_argument("--version", action="version", version=f"instapg {__version__}")
        return parser
    parser = argparse.ArgumentParser(prog=f"instapg {command}")
    _common(parser, key=command == "seed")
    if command == "seed":
        parser.add_argument("file", type=Path, metavar="FILE.sql")
    if command == "claim":
        parser.add_argument("--no-browser", action="store_true", help="print the claim URL only")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else None
    args = _parser(command).parse_args(argv)
    try:
        if command is None:
            return create(args)
        return {"claim": claim, "status": status, "seed": seed}[command](args)
    except (ApiError, Failure) as exc:
        print(f"instapg: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _claim_key(args) -> str:
    return f"{args.prefix}POSTGRES_CLAIM_URL"


def _base_url(args) -> str:
    return (args.url or os.environ.get("INSTAPG_URL") or DEFAULT_URL).rstrip("/")


def _confirm(base: str) -> bool:
    if not sys.stdin.isatty():
        return True
    answer = input(f"Create a PostgreSQL database on {base}? It expires unless you claim it. [Y/n] ")
    return answer.strip().lower() in ("", "y", "yes")


def create(args) -> int:
    base = _base_url(args)
    if args.seed is not None and not args.seed.is_file():
        raise Failure(f"seed file {args.seed} not found")
    keys = (args.key, f"{args.key}_DIRECT", _claim_key(args))
    if not args.json:
        present = [k for k in keys if k in envfile.read(args.env)]
        if present:
            # As get-db does: an existing database is never replaced, and that is not an error.
            print(f"{present[0]} already exists in {args.env}; not creating a database.")
            print(f"Remove it from {args.env} (or use --env/--key) to get a new one; `instapg status` shows this one.")
            return 0
    if not args.yes and not _confirm(base):
        print("Nothing created.")
        return 1

    body = Client(base).create(args.ref, args.logical_replication)
    if args.json:
        print(json.dumps(body, indent=2))
    else:
        envfile.append(
            args.env,
            [
                f"# instapg database {body['id']}: expires {body.get('expires_at') or 'never'} unless claimed at "
                f"{body['claim_url']}",
                f"{args.key}={body['connection_string']}",
                f"{args.key}_DIRECT={body['direct_connection_string']}",
                f"{_claim_key(args)}={body['claim_url']}",
            ],
        )
        print(f"Wrote {args.key}, {args.key}_DIRECT and {_claim_key(args)} to {args.env}.")
        print(f"The database expires {_when(body.get('expires_at'))} unless you claim it: {body['claim_url']}")
    if args.seed is not None:
        _seed(body["direct_connection_string"], args.seed)
    return 0


def _seed(url: str, path: Path) -> None:
    from instapg_cli.seed import SeedError, apply

    try:
        count = apply(url, path.read_text(encoding="utf-8"), filename=str(path))
    except SeedError as exc:
        raise Failure(str(exc)) from None
    print(f"Seeded from {path}: {count} statement{'s' if count != 1 else ''}.")


def seed(args) -> int:
    values = envfile.read(args.env)
    url = values.get(f"{args.key}_DIRECT") or values.get(args.key)
    if not url:
        raise Failure(f"no {args.key} in {args.env}: run `instapg` first")
    if not args.file.is_file():
        raise Failure(f"seed file {args.file} not found")
    _seed(url, args.file)
    return 0


def _claim_url(args) -> str:
    url = envfile.read(args.env).get(_claim_key(args))
    if not url:
        raise Failure(f"no {_claim_key(args)} in {args.env}: run `instapg` first (or pass --env/--prefix)")
    return url


def _can_open_browser() -> bool:
    # Only a graphical browser: a console one would take over this terminal.
    if os.environ.get("BROWSER"):
        return True
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def claim(args) -> int:
    url = _claim_url(args)
    if not args.no_browser and _can_open_browser():
        import webbrowser

        if webbrowser.open(url):
            print(f"Opened {url}")
            return 0
    print(f"Open this URL to claim the database: {url}")
    return 0


def status(args) -> int:
    url = _claim_url(args)
    base, sep, database_id = url.rpartition("/claim/")
    if not sep or not database_id:
        raise Failure(f"{_claim_key(args)} in {args.env} is not an instapg claim URL: {url}")
    body = Client(base).get(database_id)
    print(f"database  {body['id']}")
    print(f"status    {body['status']}")
    expires = body.get("expires_at")
    print(f"expires   {_when(expires) if expires else 'never (claimed)'}")
    size = body.get("size_bytes")
    limit = (body.get("limits") or {}).get("storage_mb")
    size_text = _size(size) if isinstance(size, int) else "not reported by this server"
    print(f"size      {size_text}{f' (limit {limit} MB)' if limit else ''}")
    print(f"claim     {body['claim_url']}")
    return 0


def _when(iso: str | None) -> str:
    if not iso:
        return "never"
    try:
        at = datetime.strptime(iso, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    except ValueError:
        return iso
    left = int((at - datetime.now(UTC)).total_seconds())
    if left <= 0:
        return f"at {iso} (passed)"
    hours, minutes = divmod(left // 60, 60)
    return f"at {iso} (in {hours}h {minutes:02d}m)"


def _size(n: int) -> str:
    for unit in ("bytes", "kB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
