"""Make moto's DynamoDB writes atomic, as DynamoDB's are.

moto checks a write's condition and applies the write as separate Python
steps with no lock, so two threads can both pass `status = POOLED` on the
same item; DynamoDB evaluates the condition and writes atomically. The local
stack, the benchmark and the concurrency tests serve requests from many
threads, so they call `install()`: one lock around every moto write (and
read, so no read sees half a write). An UpdateItem that moto refuses halfway
(an item past its size limit) is put back as it was, as DynamoDB writes all
of it or nothing; a transaction with such an update is cancelled with a
`ValidationError` reason on that item, as DynamoDB's is.

It also replaces moto's TransactWriteItems, which deep-copies every table a
transaction touches to be able to roll back: 100+ ms per transaction with a
thousand records, where DynamoDB's cost does not grow with the table. Under
the lock, `_transact_write_items` checks every condition before writing
anything, so it needs no copy; the answers (cancellation reasons, items on
ALL_OLD) are moto's own. Two pure caches take work moto repeated on every
write: each distinct update expression is parsed once (`_parse_once`), and
the validator's walkers build their node-type tuple once (`_node_types_once`).
"""

from __future__ import annotations

import copy
import functools
import threading
from typing import Any

_lock = threading.RLock()
_METHODS = (
    "put_item",
    "update_item",
    "delete_item",
    "get_item",
    "query",
    "scan",
    "transact_write_items",
    "transact_get_items",
    "batch_get_item",
)


def _transact_write_items(self, transact_items: list[dict[str, Any]]) -> None:
    """moto's DynamoDBBackend.transact_write_items (5.x), all conditions checked before any write."""
    from moto.dynamodb.comparisons import get_filter_expression
    from moto.dynamodb.exceptions import (
        ConditionalCheckFailed,
        ItemSizeTooLarge,
        ItemSizeToUpdateTooLarge,
        MultipleTransactionsException,
        TooManyTransactionsException,
        TransactionCanceledException,
        TransactWriteSingleOpException,
    )

    if len(transact_items) > 100:
        raise TooManyTransactionsException()
    planned = []
    errors: list[tuple[str | None, str | None, dict | None]] = []
    seen: set[tuple[str, str]] = set()
    for entry in transact_items:
        if len(entry) > 1:
            raise TransactWriteSingleOpException
        op_type, op = next(iter(entry.items()))
        if op_type not in {"ConditionCheck", "Put", "Delete", "Update"}:
            raise ValueError("Unsupported transaction operation")
        name = op["TableName"]
        table = self.get_table(name)
        if op_type == "Put":
            key = {table.hash_key_attr: op["Item"][table.hash_key_attr]}
            if table.range_key_attr is not None:
                key[table.range_key_attr] = op["Item"][table.range_key_attr]
        else:
            key = op["Key"]
        ident = (name, str(dict(sorted(key.items()))))
        if ident in seen:
            raise MultipleTransactionsException()
        seen.add(ident)
        current = self.get_item(name, key)
        error: tuple[str | None, str | None, dict | None] = (None, None, None)
        if op.get("ConditionExpression") is not None:
            condition = get_filter_expression(
                op["ConditionExpression"], op.get("ExpressionAttributeNames"), op.get("ExpressionAttributeValues")
            )
            if not condition.expr(current):
                old = None
                if current is not None and op.get("ReturnValuesOnConditionCheckFailure") == "ALL_OLD":
                    old = current.to_json()["Attributes"]
                error = ("ConditionalCheckFailed", ConditionalCheckFailed().message, old)
        errors.append(error)
        # A put or delete replaces the stored Item, an update changes it in place: only that needs a copy.
        planned.append((op_type, op, name, key, copy.deepcopy(current) if op_type == "Update" else current))
    if any(code is not None for code, _, _ in errors):
        raise TransactionCanceledException(errors)
    written = []
    try:
        for op_type, op, name, key, before in planned:
            names, values = op.get("ExpressionAttributeNames"), op.get("ExpressionAttributeValues")
            if op_type == "Put":
                self.put_item(name, op["Item"], expression_attribute_names=names, expression_attribute_values=values)
            elif op_type == "Delete":
                self.delete_item(name, key, expression_attribute_names=names, expression_attribute_values=values)
            elif op_type == "Update":
                self.update_item(
                    name,
                    key,
                    update_expression=op["UpdateExpression"],
                    expression_attribute_names=names,
                    expression_attribute_values=values,
                )
            written.append((name, key, before))
    except Exception as exc:
        # A write moto refused (a malformed expression, an item past 400 KB): put back what came before it.
        for name, key, before in reversed(written):
            if before is None:
                self.delete_item(name, key)
            else:
                self.put_item(name, before.to_json()["Attributes"])
        if isinstance(exc, (ItemSizeTooLarge, ItemSizeToUpdateTooLarge)):
            # DynamoDB cancels the transaction with a ValidationError reason on that item.
            reasons: list[tuple[str | None, str | None, dict | None]] = [(None, None, None)] * len(planned)
            reasons[len(written)] = ("ValidationError", exc.exception_msg, None)
            raise TransactionCanceledException(reasons) from None
        raise


def _all_or_nothing(update_item):
    """moto's update_item applies an update's actions one by one: when a later one is refused
    (the item would pass 400 KB), the earlier ones stay written. DynamoDB's UpdateItem is all
    or nothing, so put the item's attributes back as they were (the executor replaces top-level
    attributes, so a shallow copy of them is the item as it was)."""

    @functools.wraps(update_item)
    def atomic(self, table_name: str, key: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        from moto.dynamodb.exceptions import MockValidationException

        stored = self.get_item(table_name, key)
        before = dict(stored.attrs) if stored is not None else None
        try:
            return update_item(self, table_name, key, *args, **kwargs)
        except MockValidationException:
            after = self.get_item(table_name, key)
            if before is None and after is not None:
                self.delete_item(table_name, key)  # moto created it for the update
            elif after is not None:
                after.attrs.clear()
                for name, value in before.items():
                    dict.__setitem__(after.attrs, name, value)  # as it was: no size check to pass again
            raise

    return atomic


def _parse_once(make):
    """moto parses an update expression twice per write (once to check its names, once to apply
    it), in Python. The tree depends on the expression's text alone (names and values are
    placeholders, resolved later on a deep copy the validator makes), so one parse per
    distinct text serves every write: a pooled take's transaction sends the same four texts
    each time. Errors are not cached: a bad expression is refused every time, as before."""
    cached = functools.lru_cache(maxsize=512)(make)

    def parse(expression_str: str):
        return cached(expression_str)

    parse._instapg_cached = True
    return parse


def _node_types_once(nodes_to_be_processed):
    """moto's validator walks an update's tree ten times and, at every node, rebuilds the tuple of
    node types a walker handles from a dict it also rebuilds ("Cached accessor", says its
    docstring, but it is not). The types are fixed per walker class: build the tuple once."""
    by_class: dict[type, tuple] = {}

    def node_types(self) -> tuple:
        found = by_class.get(type(self))
        if found is None:
            found = by_class[type(self)] = nodes_to_be_processed(self)
        return found

    node_types._instapg_cached = True
    return node_types


def install() -> None:
    """Idempotent; wraps moto's DynamoDB backend methods for this process."""
    from moto.dynamodb.models import DynamoDBBackend
    from moto.dynamodb.parsing.ast_nodes import DepthFirstTraverser
    from moto.dynamodb.parsing.expressions import UpdateExpressionParser

    if not getattr(UpdateExpressionParser.make, "_instapg_cached", False):
        UpdateExpressionParser.make = staticmethod(_parse_once(UpdateExpressionParser.make))
    if not getattr(DepthFirstTraverser.nodes_to_be_processed, "_instapg_cached", False):
        DepthFirstTraverser.nodes_to_be_processed = _node_types_once(DepthFirstTraverser.nodes_to_be_processed)

    if not getattr(DynamoDBBackend.transact_write_items, "_instapg_atomic", False):
        DynamoDBBackend.transact_write_items = _transact_write_items
    for name in _METHODS:
        original = getattr(DynamoDBBackend, name, None)
        if original is None or getattr(original, "_instapg_atomic", False):
            continue

        if name == "update_item":
            original = _all_or_nothing(original)

        def locked(*args, __original=original, **kwargs):
            with _lock:
                return __original(*args, **kwargs)

        functools.update_wrapper(locked, original)
        locked._instapg_atomic = True
        setattr(DynamoDBBackend, name, locked)
