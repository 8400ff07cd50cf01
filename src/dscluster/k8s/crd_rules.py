"""The rules a CRD's schema carries beyond JSON Schema, checked the way an API server checks them on
create: CEL rules (`x-kubernetes-validations`) and the uniqueness of list entries
(`x-kubernetes-list-type: map` keyed by `x-kubernetes-list-map-keys`, and `set`).

CEL is evaluated with cel-python (a maintained implementation of the Common Expression Language).
A rule is evaluated at its schema node with `self` bound to the value there, only where the value
is present, once per list item or map value below `items` / `additionalProperties`, as Kubernetes
does. Not evaluated:
- transition rules (they name `oldSelf`): an API server evaluates them only on update;
- rules that call functions of Kubernetes' own CEL libraries (`isQuantity`, `lowerAscii`, `url`,
  ...), which cel-python does not have: `skipped_rules` lists them.
A failing rule reports its own `message` (or `messageExpression`), at its `fieldPath` when set.
"""

from __future__ import annotations

import datetime
import json
from typing import Any, Iterator

Problem = tuple[str, str]  # (field path, message), as validate.py reports them

_ENV = None
_PROGRAMS: dict[str, Any] = {}
# Rules cel-python cannot run (a function of Kubernetes' CEL libraries): rule -> the reason.
skipped_rules: dict[str, str] = {}


def _environment():
    global _ENV
    if _ENV is None:
        import celpy

        _ENV = celpy.Environment()
    return _ENV


def _program(expression: str):
    """The compiled program of one expression (compiled once per process); None if it cannot be."""
    if expression not in _PROGRAMS:
        import celpy

        env = _environment()
        try:
            _PROGRAMS[expression] = env.program(env.compile(expression))
        except celpy.CELParseError as exc:
            skipped_rules[expression] = f"not parsed: {str(exc).splitlines()[0]}"
            _PROGRAMS[expression] = None
    return _PROGRAMS[expression]


def _json_ready(value: Any) -> Any:
    """YAML gives dates and timestamps for unquoted ones; the API server sees strings."""
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_ready(v) for v in value]
    if isinstance(value, (datetime.date, datetime.datetime)):
        return value.isoformat()
    return value


def _evaluate(expression: str, value: Any) -> tuple[Any, str | None]:
    """(result, None), or (None, error text) when evaluation failed on this value, or
    (None, "") when the expression is one cel-python cannot run."""
    import celpy

    program = _program(expression)
    if program is None:
        return None, ""
    try:
        return program.evaluate({"self": celpy.json_to_cel(_json_ready(value))}), None
    except celpy.CELEvalError as exc:
        text = str(exc.args[0]) if exc.args else str(exc)
        if text.startswith("undeclared reference"):
            name = text.split("'")[1] if "'" in text else text
            skipped_rules[expression] = f"uses {name}, a function of Kubernetes' CEL libraries"
            return None, ""
        return None, text


def _field_path(base: list, field_path: str | None) -> list:
    """A rule's fieldPath ('.spec.replicas', ".labels['a']") relative to its node."""
    if not field_path:
        return base
    parts = field_path.replace("['", ".").replace("']", "").strip(".").split(".")
    return base + [p for p in parts if p]


def _rule_problems(rules: list, value: Any, path: list) -> Iterator[tuple[list, str]]:
    for rule in rules:
        expression = rule.get("rule") if isinstance(rule, dict) else None
        if not isinstance(expression, str) or "oldSelf" in expression:
            continue
        result, error = _evaluate(expression, value)
        if error == "":
            continue
        where = _field_path(path, rule.get("fieldPath"))
        if error is not None:
            yield where, f"rule {expression!r} could not be evaluated: {error}"
        elif not _passed(result):
            yield where, _rule_message(rule, value, expression)


def _passed(result: Any) -> bool:
    from celpy import celtypes

    return isinstance(result, celtypes.BoolType) and bool(result)


def _rule_message(rule: dict, value: Any, expression: str) -> str:
    if isinstance(rule.get("messageExpression"), str):
        message, error = _evaluate(rule["messageExpression"], value)
        if error is None and isinstance(message, str) and message.strip():
            return str(message)
    if isinstance(rule.get("message"), str) and rule["message"]:
        return rule["message"]
    return f"failed rule: {expression}"


def _key_of(item: Any, keys: list[str], item_schema: dict) -> tuple | None:
    """The list-map key of one entry; a key the entry omits takes the schema's default."""
    if not isinstance(item, dict):
        return None
    props = item_schema.get("properties", {}) if isinstance(item_schema, dict) else {}
    return tuple(item.get(k, (props.get(k) or {}).get("default")) for k in keys)


def _list_problems(schema: dict, value: list, path: list) -> Iterator[tuple[list, str]]:
    list_type = schema.get("x-kubernetes-list-type")
    if list_type == "map":
        keys = list(schema.get("x-kubernetes-list-map-keys") or [])
        first: dict[tuple, int] = {}
        for i, item in enumerate(value):
            key = _key_of(item, keys, schema.get("items") or {})
            if key is None:
                continue
            if key in first:
                shown = ", ".join(f"{k}={v!r}" for k, v in zip(keys, key))
                yield path + [i], f"duplicate of entry {first[key]} ({shown}): entries of this list are " \
                                  f"keyed by {', '.join(keys)}, which must be unique"
            else:
                first[key] = i
    elif list_type == "set":
        seen: dict[str, int] = {}
        for i, item in enumerate(value):
            token = json.dumps(_json_ready(item), sort_keys=True)
            if token in seen:
                yield path + [i], f"duplicate of entry {seen[token]} ({item!r}): this list is a set"
            else:
                seen[token] = i


def _walk(schema: Any, value: Any, path: list) -> Iterator[tuple[list, str]]:
    if not isinstance(schema, dict) or value is None:
        return
    rules = schema.get("x-kubernetes-validations")
    if rules:
        yield from _rule_problems(rules, value, path)
    if isinstance(value, list):
        yield from _list_problems(schema, value, path)
        for i, item in enumerate(value):
            yield from _walk(schema.get("items"), item, path + [i])
    elif isinstance(value, dict):
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        for key, child in value.items():
            if key in props:
                yield from _walk(props[key], child, path + [key])
            elif isinstance(extra, dict):
                yield from _walk(extra, child, path + [key])


def schema_rule_problems(openapi: dict, doc: dict, render_path) -> list[Problem]:
    """Every CEL and list-uniqueness problem of `doc` under the CRD version's `openapi` schema;
    `render_path` turns a path list into the report's field text."""
    return [(render_path(path), message) for path, message in _walk(openapi, doc, [])]
