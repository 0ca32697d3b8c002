"""How each pynamodb model becomes a DynamoDB table: one description for both deploy paths.

bootstrap.py creates the tables with it (`chalice deploy`), package.py writes
them into the CloudFormation template (`make package`); neither imports the
other for it.
"""

from __future__ import annotations

from typing import Any


def _hash_first(key_schema: list[dict[str, str]]) -> list[dict[str, str]]:
    return sorted(
        ({"AttributeName": k["AttributeName"], "KeyType": k["KeyType"]} for k in key_schema),
        key=lambda k: k["KeyType"] != "HASH",
    )


def table_spec(model) -> dict[str, Any]:
    """CreateTable arguments (without the name) for a pynamodb model."""
    schema = model._get_schema()
    spec: dict[str, Any] = {
        "AttributeDefinitions": [dict(a) for a in schema["attribute_definitions"]],
        "KeySchema": _hash_first(schema["key_schema"]),
    }
    gsis = [
        {"IndexName": g["index_name"], "KeySchema": _hash_first(g["key_schema"]), "Projection": dict(g["projection"])}
        for g in schema["global_secondary_indexes"]
    ]
    if gsis:
        spec["GlobalSecondaryIndexes"] = gsis
    return spec


def ttl_attribute(model) -> str | None:
    from pynamodb.attributes import TTLAttribute

    for name, attr in model.get_attributes().items():
        if isinstance(attr, TTLAttribute):
            return attr.attr_name or name
    return None
