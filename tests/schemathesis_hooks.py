"""What openapi.yaml cannot say, told to schemathesis (schemathesis.toml loads this).

OpenAPI describes the body and the query string each on its own, so it cannot
say "`ref` in the body or ?referrer= in the URL" (the API answers 400 "Missing
referrer" without either). A create that schemathesis generates as valid and
that has neither gets ?referrer=: every other valid request is left as drawn,
and invalid ones are never touched.
"""

from __future__ import annotations

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
