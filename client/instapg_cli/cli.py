"""The `instapg` command.

instapg [--env .env] [--key DATABASE_URL] [--prefix PUBLIC_] [--ref NAME] [--seed FILE.sql]
        [--region REGION] [--logical-replication] [--json] [--yes] [--url BASE]
instapg seed FILE.sql [--env .env] [--key DATABASE_URL]
instapg status [ID] [--env .env] [--prefix PUBLIC_] [--api-key KEY]
instapg claim [ID] [--env .env] [--key DATABASE_URL] [--prefix PUBLIC_] [--no-browser] [--api-key KEY]
instapg rotate [ID] [--env .env] [--key DATABASE_URL] --api-key KEY
instapg delete [ID] [--env .env] [--key DATABASE_URL] [--api-key KEY] [--yes]
instapg list --api-key KEY
instapg copy [ID] [--env .env] [--key DATABASE_URL] [--as DATABASE_URL_COPY] --api-key KEY
instapg reset COPY_ID --api-key KEY [--yes]
instapg usage [ID] [--env .env] [--prefix PUBLIC_] --api-key KEY
Every command takes --json and --url; exit codes are the EXIT_* constants below (docs/client.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from instapg_cli import __version__, envfile
from instapg_cli.api import ApiError, Client, check_id

DEFAULT_URL = "http://127.0.0.1:8000"  # `make dev`'s local stack
COMMANDS = ("claim", "status", "seed", "rotate", "delete", "list", "usage", "copy", "reset")

# Exit codes (documented in docs/client.md; scripts and agents branch on them).
EXIT_OK = 0
EXIT_FAILED = 1  # the server refused (4xx), or seeding failed
EXIT_USAGE = 2  # bad arguments, nothing in .env to act on, no API key (argparse also exits 2)
EXIT_DEPENDENCY = 3  # an optional dependency is missing (psycopg for --seed); nothing was created
EXIT_TEMPORARY = 4  # the server was unreachable, busy (503) or rate limiting (429): retry later
EXIT_INTERRUPTED = 130


class Failure(Exception):
    """Ends the command with one line on stderr and the given exit status."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def _common(parser: argparse.ArgumentParser, key: bool = True) -> None:
    parser.add_argument("--env", default=".env", type=Path, help="dotenv file to write/read (default: .env)")
    if key:
        parser.add_argument("--key", default="DATABASE_URL", help="name of the connection string variable")
    parser.add_argument("--prefix", default="PUBLIC_", help="prefix of the claim URL variable (default: PUBLIC_)")
    parser.add_argument("--json", action="store_true", help="print JSON (errors too) instead of text")
    parser.add_argument("--url", help=f"instapg server (default: $INSTAPG_URL or {DEFAULT_URL})")


def _parser(command: str | None) -> argparse.ArgumentParser:
    if command is None:
        parser = argparse.ArgumentParser(
            prog="instapg",
            description="Create a PostgreSQL database and append its connection strings to .env.",
            epilog="Other commands: instapg status | claim | seed FILE.sql | rotate | delete | list | usage | copy "
            "| reset "
            "(each takes --help). Exit codes: 0 ok, 1 refused/failed, 2 usage, 3 missing dependency, "
            "4 temporary (retry later).",
        )
        _common(parser)  # here --json prints the server's answer and writes nothing to .env
        parser.add_argument("--ref", default="instapg-cli", help="who is asking (sent as ref; default: instapg-cli)")
        parser.add_argument("--seed", type=Path, metavar="FILE.sql", help="run this SQL file on the new database")
        parser.add_argument("--logical-replication", action="store_true", help="ask for logical replication")
        parser.add_argument("--region", help="where the database lives, e.g. eu-west-1 (default: the server's)")
        parser.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
        parser.add_argument("--version", action="version", version=f"instapg {__version__}")
        return parser
    parser = argparse.ArgumentParser(prog=f"instapg {command}")
    _common(parser, key=command in ("seed", "claim", "rotate", "delete", "copy"))
    if command == "seed":
        parser.add_argument("file", type=Path, metavar="FILE.sql")
    if command in ("status", "claim", "rotate", "delete", "usage", "copy"):
        parser.add_argument("id", nargs="?", help="database id (default: the database in --env)")
    if command == "reset":
        parser.add_argument("id", help="id of the copy to reset to its source")
    if command in ("status", "claim", "rotate", "delete", "list", "usage", "copy", "reset"):
        parser.add_argument("--api-key", help="account API key (default: $INSTAPG_API_KEY)")
    if command == "copy":
        parser.add_argument(
            "--as", dest="as_key", help="variable for the copy's connection string in --env (default: <--key>_COPY)"
        )
    if command == "claim":
        parser.add_argument("--no-browser", action="store_true", help="print the claim URL only")
    if command in ("delete", "reset"):
        parser.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else None
    args = _parser(command).parse_args(argv)
    handlers = {
        "claim": claim,
        "status": status,
        "seed": seed,
        "rotate": rotate,
        "delete": delete,
        "list": list_,
        "copy": copy,
        "reset": reset,
        "usage": usage,
    }
    try:
        return create(args) if command is None else handlers[command](args)
    except ApiError as exc:
        return _fail(args, str(exc), EXIT_TEMPORARY if exc.temporary else EXIT_FAILED, exc.status)
    except Failure as exc:
        return _fail(args, str(exc), exc.code)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _fail(args, message: str, code: int, status: int | None = None) -> int:
    print(f"instapg: {message}", file=sys.stderr)
    if args.json:
        _print_json({"error": message, "http_status": status, "exit_code": code})
    return code


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def _claim_key(args) -> str:
    return f"{args.prefix}POSTGRES_CLAIM_URL"


def _token_key(args) -> str:
    # Named after the database's variables, never the public prefix: PUBLIC_/VITE_/NEXT_PUBLIC_
    # variables are bundled into browser code, and this one is a secret.
    return f"{args.key}_CREATOR_TOKEN"


def _base_url(args) -> str:
    return (args.url or os.environ.get("INSTAPG_URL") or DEFAULT_URL).rstrip("/")


def _api_key(args) -> str:
    key = args.api_key or os.environ.get("INSTAPG_API_KEY")
    if not key:
        raise Failure(
            "this command needs your account's API key: pass --api-key or set INSTAPG_API_KEY "
            "(an unclaimed database has no owner yet; claim it first with `instapg claim`)",
            EXIT_USAGE,
        )
    return key


def _confirm(question: str) -> bool:
    if not sys.stdin.isatty():
        return True
    answer = input(f"{question} [Y/n] ")
    return answer.strip().lower() in ("", "y", "yes")


def _in_region(body: dict[str, Any]) -> str:
    """The words ' in eu-west-1' for a sentence about the database; none from a server that does not say."""
    return f" in {body['region']}" if body.get("region") else ""


def create(args) -> int:
    base = _base_url(args)
    if args.seed is not None:
        if not args.seed.is_file():
            raise Failure(f"seed file {args.seed} not found", EXIT_USAGE)
        _require_psycopg()  # before anything is created, not after
    keys = (args.key, f"{args.key}_DIRECT", _claim_key(args), _token_key(args))
    if not args.json:
        present = [k for k in keys if k in envfile.read(args.env)]
        if present:
            # As get-db does: an existing database is never replaced, and that is not an error.
            print(f"{present[0]} already exists in {args.env}; not creating a database.")
            print(f"Remove it from {args.env} (or use --env/--key) to get a new one; `instapg status` shows this one.")
            return EXIT_OK
    if not args.yes and not _confirm(f"Create a PostgreSQL database on {base}? It expires unless you claim it."):
        print("Nothing created.")
        return EXIT_FAILED

    body = Client(base).create(args.ref, args.logical_replication, args.region)
    if not args.json:
        lines = [
            f"# instapg database {body['id']}{_in_region(body)}: expires {body.get('expires_at') or 'never'} "
            f"unless claimed at {body['claim_url']}",
            f"{args.key}={body['connection_string']}",
            f"{args.key}_DIRECT={body['direct_connection_string']}",
            f"{_claim_key(args)}={body['claim_url']}",
        ]
        replication = body.get("replication_connection_string")  # with --logical-replication: the gateway's
        if replication:
            lines.insert(3, f"{args.key}_REPLICATION={replication}")
        token = body.get("creator_token")  # servers before issue 19 return none
        if token:
            lines += [
                f"# {_token_key(args)} is a secret: it deletes this database until it is claimed (`instapg delete`).",
                f"{_token_key(args)}={token}",
            ]
        envfile.append(args.env, lines)
        names = [args.key, f"{args.key}_DIRECT"] + ([f"{args.key}_REPLICATION"] if replication else [])
        names += [_claim_key(args)] + ([_token_key(args)] if token else [])
        print(f"Wrote {', '.join(names[:-1])} and {names[-1]} to {args.env}.")
        print(
            f"The database{_in_region(body)} expires {_when(body.get('expires_at'))} unless you claim it: "
            f"{body['claim_url']}"
        )
    if args.seed is None:
        if args.json:
            _print_json(body)
        return EXIT_OK
    try:
        count = _seed(body["direct_connection_string"], args.seed, quiet=args.json)
    except Failure as exc:
        if args.json:  # the database exists: its strings must not be lost with the error
            _print_json({**body, "seed": {"file": str(args.seed), "error": str(exc)}})
            print(f"instapg: {exc}", file=sys.stderr)
            return exc.code
        raise
    if args.json:
        _print_json({**body, "seed": {"file": str(args.seed), "statements": count}})
    return EXIT_OK


def _require_psycopg() -> None:
    from instapg_cli.seed import SeedError, require_psycopg

    try:
        require_psycopg()
    except SeedError as exc:
        raise Failure(str(exc), EXIT_DEPENDENCY) from None


def _seed(url: str, path: Path, quiet: bool = False) -> int:
    from instapg_cli.progress import Progress
    from instapg_cli.seed import SeedError, apply

    _require_psycopg()
    sql = path.read_text(encoding="utf-8")
    try:
        with Progress(f"Seeding {path}", len(sql.encode())):
            count = apply(url, sql, filename=str(path))
    except SeedError as exc:
        raise Failure(str(exc)) from None
    if not quiet:
        print(f"Seeded from {path}: {count} statement{'s' if count != 1 else ''}.")
    return count


def seed(args) -> int:
    values = envfile.read(args.env)
    url = values.get(f"{args.key}_DIRECT") or values.get(args.key)
    if not url:
        raise Failure(f"no {args.key} in {args.env}: run `instapg` first", EXIT_USAGE)
    if not args.file.is_file():
        raise Failure(f"seed file {args.file} not found", EXIT_USAGE)
    count = _seed(url, args.file, quiet=args.json)
    if args.json:
        _print_json({"file": str(args.file), "statements": count})
    return EXIT_OK


def _claim_url(args) -> str:
    url = envfile.read(args.env).get(_claim_key(args))
    if not url:
        raise Failure(
            f"no {_claim_key(args)} in {args.env}: run `instapg` first (or pass --env/--prefix, or a database id)",
            EXIT_USAGE,
        )
    return url


def _target(args) -> tuple[str, str]:
    """(server, database id): the id given on the command line, else the database in .env.

    The .env's claim URL names both, so no --url is needed for the database it holds.
    """
    if args.id:
        try:
            return _base_url(args), check_id(args.id)
        except ApiError as exc:
            raise Failure(str(exc), EXIT_USAGE) from None
    url = _claim_url(args)
    base, sep, database_id = url.rpartition("/claim/")
    if not sep or not database_id:
        raise Failure(f"{_claim_key(args)} in {args.env} is not an instapg claim URL: {url}", EXIT_USAGE)
    return (args.url.rstrip("/") if args.url else base), database_id


def _can_open_browser() -> bool:
    # Only a graphical browser: a console one would take over this terminal.
    if os.environ.get("BROWSER"):
        return True
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def claim(args) -> int:
    """With an API key, claim through the API (sending the creator token from .env); else open the claim URL."""
    key = args.api_key or os.environ.get("INSTAPG_API_KEY")
    if key:
        base, database_id = _target(args)
        token = _creator_token(args, database_id)
        body = Client(base, api_key=key).claim(database_id, token)
        if args.json:
            _print_json({"id": database_id, "status": body.get("status"), "with_creator_token": token is not None})
        else:
            print(f"Claimed database {database_id} for your account: it no longer expires.")
        return EXIT_OK
    if args.id:
        base, database_id = _target(args)
        url = Client(base).get(database_id)["claim_url"]
    else:
        url = _claim_url(args)
    opened = False
    if not args.no_browser and not args.json and _can_open_browser():
        import webbrowser

        opened = webbrowser.open(url)
    if args.json:
        _print_json({"claim_url": url, "opened": opened})
    elif opened:
        print(f"Opened {url}")
    else:
        print(f"Open this URL to claim the database: {url}")
    return EXIT_OK


def status(args) -> int:
    base, database_id = _target(args)
    body = Client(base).get(database_id)
    key = args.api_key or os.environ.get("INSTAPG_API_KEY")
    owner = None
    if key and body.get("status") == "CLAIMED":
        try:
            owner = Client(base, api_key=key).owned(database_id)
        except ApiError as exc:
            if exc.status not in (401, 403, 404):  # not this account's: the public view is all there is
                raise
    if args.json:
        _print_json({**body, "owner": owner} if owner else body)
        return EXIT_OK
    quota = body.get("quota") or {}
    limits = (owner or body).get("limits") or {}
    print(f"database     {body['id']}")
    print(f"status       {body['status']}")
    print(f"region       {body.get('region') or 'not reported by this server'}")
    expires = body.get("expires_at")
    print(f"expires      {_when(expires) if expires else 'never (claimed)'}")
    storage = f" (limit {limits['storage_mb']} MB)" if limits.get("storage_mb") else ""
    if owner and isinstance(owner.get("size_bytes"), int):
        print(f"size         {_size(owner['size_bytes'])} now{storage}")
    elif isinstance(quota.get("size_bytes"), int):
        print(f"size         {_size(quota['size_bytes'])} at {quota.get('size_checked_at') or '?'}{storage}")
    else:
        print(f"size         not measured yet{storage}")
    connections_limit = f" (limit {limits['connections']})" if limits.get("connections") else ""
    if owner and isinstance(owner.get("connections"), int):
        print(f"connections  {owner['connections']} open{connections_limit}")
    else:
        how = "pass --api-key" if body.get("status") == "CLAIMED" else "claim it, then --api-key"
        print(f"connections  shown to the owner only ({how}){connections_limit}")
    print(f"transfer     {_transfer(quota.get('transfer'))}")
    locked = quota.get("locked")
    if locked:
        print(f"locked       since {locked.get('since')}: {locked.get('hint') or locked.get('reason')}")
    print(f"claim        {body['claim_url']}")
    return EXIT_OK


def rotate(args) -> int:
    base, database_id = _target(args)
    body = Client(base, api_key=_api_key(args)).rotate(database_id)
    if args.json:
        _print_json(body)
        return EXIT_OK
    values = envfile.read(args.env)
    in_env = not args.id or database_id in values.get(_claim_key(args), "")
    replication = body.get("replication_connection_string")
    if in_env and args.key in values:
        updates = {args.key: body["connection_string"], f"{args.key}_DIRECT": body["direct_connection_string"]}
        if replication and f"{args.key}_REPLICATION" in values:
            updates[f"{args.key}_REPLICATION"] = replication
        envfile.replace(args.env, updates)
        print(f"New password; updated {args.key} and {args.key}_DIRECT in {args.env}. Old sessions were ended.")
    else:
        print("New password (the old one no longer works; its sessions were ended):")
        print(f"{args.key}={body['connection_string']}")
        print(f"{args.key}_DIRECT={body['direct_connection_string']}")
        if replication:
            print(f"{args.key}_REPLICATION={replication}")
    return EXIT_OK


def _creator_token(args, database_id: str) -> str | None:
    """The creator token in --env, if it is the one of the database in --env and that is the target."""
    values = envfile.read(args.env)
    if not values.get(_claim_key(args), "").endswith(f"/claim/{database_id}"):
        return None
    return values.get(_token_key(args)) or None


def delete(args) -> int:
    base, database_id = _target(args)
    key = args.api_key or os.environ.get("INSTAPG_API_KEY")
    # An API key deletes what the account owns; without one, the creator token deletes an unclaimed database.
    token = None if key else _creator_token(args, database_id)
    if not key and not token:
        raise Failure(
            f"deleting needs the creator token (no {_token_key(args)} for this database in {args.env}) or, "
            "for a claimed database, your account's API key: pass --api-key or set INSTAPG_API_KEY",
            EXIT_USAGE,
        )
    if not args.yes and not _confirm(f"Delete database {database_id} and all its data? This cannot be undone."):
        print("Nothing deleted.")
        return EXIT_FAILED
    if key:
        Client(base, api_key=key).delete(database_id)
    else:
        Client(base).delete_unclaimed(database_id, token)
    if args.json:
        _print_json({"id": database_id, "deleted": True, "with": "api_key" if key else "creator_token"})
    else:
        print(f"Deleted database {database_id}.")
        if not args.id:
            print(f"Its lines in {args.env} no longer work; remove them before running `instapg` again.")
    return EXIT_OK


def list_(args) -> int:
    databases = Client(_base_url(args), api_key=_api_key(args)).list()
    if args.json:
        _print_json({"databases": databases})
        return EXIT_OK
    if not databases:
        print("No databases in this account. Claim one with `instapg claim`.")
        return EXIT_OK
    print(f"{'ID':36}  {'STATUS':9}  {'PLAN':8}  {'REGION':14}  CREATED")
    for db in databases:
        region = db.get("region") or "-"
        print(f"{db['id']:36}  {db['status']:9}  {db.get('plan') or '-':8}  {region:14}  {db.get('created_at') or '-'}")
    return EXIT_OK


def copy(args) -> int:
    """A copy of a claimed database (schema and data as of now); its strings go to --env under --as."""
    base, database_id = _target(args)
    name = args.as_key or f"{args.key}_COPY"
    if not args.json and name in envfile.read(args.env):
        raise Failure(f"{name} already exists in {args.env}; pass --as NAME for another variable", EXIT_USAGE)
    body = Client(base, api_key=_api_key(args)).copy(database_id)
    if args.json:
        _print_json(body)
        return EXIT_OK
    envfile.append(
        args.env,
        [
            f"# instapg copy {body['id']} of {database_id} (reset it to its source: instapg reset {body['id']})",
            f"{name}={body['connection_string']}",
            f"{name}_DIRECT={body['direct_connection_string']}",
        ],
    )
    print(f"Copied {database_id} to {body['id']}{_in_region(body)}; wrote {name} and {name}_DIRECT to {args.env}.")
    print(f"The source's sessions were ended for the copy. `instapg reset {body['id']}` copies it again.")
    return EXIT_OK


def reset(args) -> int:
    try:
        copy_id = check_id(args.id)
    except ApiError as exc:
        raise Failure(str(exc), EXIT_USAGE) from None
    key = _api_key(args)
    if not args.yes and not _confirm(f"Reset copy {copy_id} to its source? Its own changes are lost."):
        print("Nothing reset.")
        return EXIT_FAILED
    body = Client(_base_url(args), api_key=key).reset(copy_id)
    if args.json:
        _print_json(body)
    else:
        print(f"Reset {copy_id} to a fresh copy of {body.get('source_id')}; its connection string is unchanged.")
    return EXIT_OK


def usage(args) -> int:
    """The owner's usage per day over the last 30 days (size, peak connections, transfer)."""
    base, database_id = _target(args)
    owner = Client(base, api_key=_api_key(args)).owned(database_id)
    days = owner.get("usage") or []
    if args.json:
        _print_json({"id": database_id, "usage": days, "transfer": (owner.get("quota") or {}).get("transfer")})
        return EXIT_OK
    print(f"database {database_id}: usage per UTC day (size: last sample; connections: peak of per-minute samples)")
    print(f"{'DAY':10}  {'SIZE':>10}  {'CONNS':>5}  {'IN':>10}  {'OUT':>10}")
    for day in days:
        size = _size(day["size_bytes"]) if isinstance(day.get("size_bytes"), int) else "-"
        conns = day["connections_peak"] if isinstance(day.get("connections_peak"), int) else "-"
        moved_in, moved_out = _size(day.get("transfer_in_bytes") or 0), _size(day.get("transfer_out_bytes") or 0)
        print(f"{day['day']:10}  {size:>10}  {conns!s:>5}  {moved_in:>10}  {moved_out:>10}")
    print(f"this month   {_transfer((owner.get('quota') or {}).get('transfer'))}")
    return EXIT_OK


def _transfer(transfer: dict | None) -> str:
    if not isinstance(transfer, dict):
        return "not metered by this server"
    limit = transfer.get("limit_bytes")
    shown = f" (limit {_size(limit)})" if isinstance(limit, int) else ""
    return (
        f"{_size(transfer.get('in_bytes') or 0)} in, {_size(transfer.get('out_bytes') or 0)} out "
        f"in {transfer.get('period')}{shown}, through the pooler"
    )


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
