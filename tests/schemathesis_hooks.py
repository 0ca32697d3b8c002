"""What openapi.yaml cannot say, told to schemathesis (schemathesis.toml loads this).

OpenAPI describes the body and the query string each on its own, so it cannot
say "`ref` in the body or ?referrer= in the URL" (the API answers 400 "Missing
referrer" without either). A create that schemathesis generates as valid and
that has neither gets ?referrer=. Nor can a pattern say "random-looking bits":
a client-chosen id that matches the document's v4/v7 pattern but that the
server's entropy check refuses (schemathesis draws ids like 00000000-0000-4000-
8000-000000000000) is replaced by a fresh uuid4. Every other valid request is
left as drawn, and invalid ones are never touched.
"""

from __future__ import annotations

import uuid
from typing import Any

import schemathesis

CREATES = {"createDatabase", "createDatabaseWithId"}


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    if case.operation.definition.raw.get("operationId") not in CREATES:
        return
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return
    body = case.body if isinstance(case.body, dict) else {}
    if "ref" not in body and "referrer" not in (case.query or {}):
        case.query = {**(case.query or {}), "referrer": "schemathesis"}
    if case.operation.definition.raw.get("operationId") == "createDatabaseWithId":
        from chalicelib.identifiers import parse_client_id

        if parse_client_id(str(case.path_parameters.get("database_id", ""))) is None:
            case.path_parameters = {**case.path_parameters, "database_id": str(uuid.uuid4())}
