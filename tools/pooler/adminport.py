"""The pooler's admin port: a plain TCP forwarder to PgBouncer's own port on 127.0.0.1.

    python -m tools.pooler.adminport      # INSTAPG_POOLER_ADMIN_PORT (6433) -> 127.0.0.1:INSTAPG_POOLER_PORT (5432)

PgBouncer has one listening port. Its pg_hba.conf lets the admin user into
the `pgbouncer` console only from INSTAPG_POOLER_ADMIN_FROM (127.0.0.1), the
address this forwarder connects from, so only through this forwarder; the security group lets only the service's functions reach this
port, and the NLB does not forward it. TLS passes through untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def serve(listen_host: str, listen_port: int, target_port: int, source: str = "127.0.0.1") -> asyncio.Server:
    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", target_port, local_addr=(source, 0))
        except OSError:
            client_w.close()
            return
        await asyncio.gather(_pipe(client_r, server_w), _pipe(server_r, client_w))

    return await asyncio.start_server(handle, listen_host, listen_port)


async def _main(listen_host: str, listen_port: int, target_port: int, source: str) -> None:
    server = await serve(listen_host, listen_port, target_port, source)
    async with server:
        await server.serve_forever()


def main() -> int:
    env = os.environ
    try:
        asyncio.run(
            _main(
                env.get("INSTAPG_POOLER_ADMIN_LISTEN", "0.0.0.0"),
                int(env.get("INSTAPG_POOLER_ADMIN_PORT", "6433")),
                int(env.get("INSTAPG_POOLER_PORT", "5432")),
                env.get("INSTAPG_POOLER_ADMIN_FROM", "127.0.0.1"),
            )
        )
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
