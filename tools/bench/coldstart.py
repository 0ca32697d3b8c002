"""`make bench`'s cold start and memory figures, each from fresh API processes invoked as Lambda invokes them.

Cold start: a new interpreter runs `import app` and then the app's handler
on one API Gateway event, a POST /api/v1/database; the figure is the time
from before `import app` to the handler's answer, which includes the first
DynamoDB call (moto's server in the bench process, over local HTTP: a child
process cannot share the in-process mock) and the first Postgres session
(the kept admin session the take's ALTER ROLE opens). The pool is full, so
the create is a pooled one, as on a warm deployment.

Memory: one such process then answers 5,000 more requests (a GET of its
database, a GET of an unknown id, a POST with a bad body, in turn) and
reports its RSS after 1,000 and after 5,000.

    python -m tools.bench.coldstart child '<json>'   # what the bench runs in each child
"""

from __future__ import annotations

import json
import os
import sys
import time

COLD_RUNS = 7
MEMORY_REQUESTS = (1000, 5000)


def _event(method: str, path: str, resource: str, params: dict | None, body: str | None) -> dict:
    return {
        "requestContext": {
            "httpMethod": method,
            "resourcePath": resource,
            "identity": {"sourceIp": "198.51.100.77"},
            "path": path,
            "requestId": "bench",
            "stage": "api",
        },
        "headers": {"content-type": "application/json", "host": "bench.invalid"},
        "pathParameters": params,
        "stageVariables": {},
        "multiValueQueryStringParameters": None,
        "body": body,
    }


class _Context:
    """What the handler reads of Lambda's context object."""

    function_name = "instapg-bench-api"
    function_version = "$LATEST"
    invoked_function_arn = ""
    memory_limit_in_mb = 512
    aws_request_id = "bench"
    log_group_name = ""
    log_stream_name = ""

    @staticmethod
    def get_remaining_time_in_millis() -> int:
        return 30_000


def _rss_kb() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def child(spec: dict) -> dict:
    """Runs in the fresh process: import, one create, then (if asked) the memory run."""
    create = _event("POST", "/api/v1/database", "/api/v1/database", None, json.dumps({"ref": "cold"}))
    t = time.perf_counter()
    import app

    imported = time.perf_counter()
    answer = app.app(create, _Context())
    done = time.perf_counter()
    result = {
        "import_s": imported - t,
        "first_request_s": done - t,
        "status": answer["statusCode"],
        "rss_kb_first": _rss_kb(),
    }
    if spec.get("memory") and answer["statusCode"] == 201:
        database_id = json.loads(answer["body"])["id"]
        route = "/api/v1/database/{database_id}"
        events = [
            _event("GET", f"/api/v1/database/{database_id}", route, {"database_id": database_id}, None),
            _event(
                "GET",
                "/api/v1/database/0190c0de-0000-7000-8000-000000000000",
                route,
                {"database_id": "0190c0de-0000-7000-8000-000000000000"},
                None,
            ),
            _event("POST", "/api/v1/database", "/api/v1/database", None, "{not json"),
        ]
        statuses: dict[int, int] = {}
        for i in range(1, MEMORY_REQUESTS[-1] + 1):
            code = app.app(events[i % len(events)], _Context())["statusCode"]
            statuses[code] = statuses.get(code, 0) + 1
            if i in MEMORY_REQUESTS:
                result[f"rss_kb_{i}"] = _rss_kb()
        result["statuses"] = statuses
    return result


class ColdStartFigures:
    """Part of `performance.Bench`: needs its `add`, `refill` and the stack's environment."""

    def _moto_server(self):
        import logging

        from moto.server import ThreadedMotoServer

        from tools.dev.pgserver import free_port

        # In this process, moto's server and the in-process mock share one
        # set of tables: the children see the bench's hosts and pool.
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log line per request
        port = free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        return server, f"http://127.0.0.1:{port}"

    def _run_child(self, endpoint: str, memory: bool) -> dict:
        import subprocess
        from pathlib import Path

        env = {**os.environ, "INSTAPG_DYNAMODB_ENDPOINT": endpoint}
        out = subprocess.run(
            [sys.executable, "-m", "tools.bench.coldstart", "child", json.dumps({"memory": memory})],
            cwd=Path(__file__).resolve().parents[2],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        if out.returncode != 0:
            raise RuntimeError(f"cold start child failed: {out.stderr.strip()[-2000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    def cold_start(self) -> None:
        import statistics

        from tools.bench.common import ms

        server, endpoint = self._moto_server()
        try:
            self.refill(COLD_RUNS + 2)
            runs = [self._run_child(endpoint, memory=False) for _ in range(COLD_RUNS)]
            memory = self._run_child(endpoint, memory=True)
        finally:
            server.stop()
        ok = sum(1 for r in runs if r["status"] == 201)
        self.add(
            "cold_start_first_request_p50",
            ms(statistics.median(r["first_request_s"] for r in runs)),
            "ms",
            len(runs),
            "fresh process: `import app` + the handler answering a pooled POST /api/v1/database (first DynamoDB "
            f"calls to moto's server over local HTTP, first Postgres admin session); {ok} answered 201",
        )
        self.add(
            "cold_start_import_p50",
            ms(statistics.median(r["import_s"] for r in runs)),
            "ms",
            len(runs),
            "the `import app` part of the cold start above",
        )
        first, after = MEMORY_REQUESTS
        self.add(
            f"rss_after_{first}_requests",
            round(memory[f"rss_kb_{first}"] / 1024, 1),
            "MB",
            first,
            "RSS of one API process (handler invoked in-process, as Lambda does) after a create and "
            f"{first} requests: GET found, GET unknown id, POST bad body, in turn; statuses {memory['statuses']}",
        )
        self.add(
            f"rss_growth_{first}_to_{after}",
            round((memory[f"rss_kb_{after}"] - memory[f"rss_kb_{first}"]) / 1024, 1),
            "MB",
            after - first,
            f"RSS after {after} requests minus RSS after {first}, same process",
        )


if __name__ == "__main__" and sys.argv[1:2] == ["child"]:
    print(json.dumps(child(json.loads(sys.argv[2]))))
