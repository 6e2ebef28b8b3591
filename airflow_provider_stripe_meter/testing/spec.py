"""Check request and response bodies against Stripe's OpenAPI spec (the billing meter subset).

The spec is OpenAPI 3.0: ``nullable`` is rewritten into JSON Schema, ``$ref`` is inlined and the
few references the subset leaves unresolved (card, source, ...) accept anything.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

SPEC_PATH = Path(__file__).with_name("openapi") / "billing-meters.openapi.json"


@cache
def load_spec() -> dict[str, Any]:
    """Return the parsed OpenAPI document shipped with the package."""
    return json.loads(SPEC_PATH.read_text(encoding="utf-8"))


def _resolve(ref: str, spec: dict[str, Any]) -> Any:
    node: Any = spec
    for part in ref.lstrip("#/").split("/"):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def to_json_schema(node: Any, spec: dict[str, Any] | None = None, seen: tuple[str, ...] = ()) -> Any:
    """Rewrite an OpenAPI 3.0 schema into plain JSON Schema, inlining references."""
    spec = spec if spec is not None else load_spec()
    if isinstance(node, list):
        return [to_json_schema(item, spec, seen) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        ref = node["$ref"]
        target = _resolve(ref, spec)
        if target is None or ref in seen:
            return {}
        return to_json_schema(target, spec, (*seen, ref))
    out = {
        key: to_json_schema(value, spec, seen)
        for key, value in node.items()
        if not key.startswith("x-") and key not in ("nullable", "description", "format")
    }
    if node.get("nullable"):
        if "type" in out:
            out["type"] = [out["type"], "null"]
            if "enum" in out:
                out["enum"] = [*out["enum"], None]
        else:
            out = {"anyOf": [out, {"type": "null"}]}
    return out


def _operation(method: str, path: str) -> dict[str, Any]:
    return load_spec()["paths"][path][method.lower()]


def request_schema(method: str, path: str) -> tuple[str, dict[str, Any]] | None:
    """Return (content type, JSON Schema) of an operation's request body, if it has one."""
    body = _operation(method, path).get("requestBody")
    if not body:
        return None
    content_type, content = next(iter(body["content"].items()))
    return content_type, to_json_schema(content["schema"])


def response_schema(method: str, path: str, status: int) -> dict[str, Any]:
    """Return the JSON Schema of an operation's response for ``status`` (or ``default``)."""
    responses = _operation(method, path)["responses"]
    chosen = responses.get(str(status)) or responses["default"]
    return to_json_schema(chosen["content"]["application/json"]["schema"])


def coerce_form(data: Any, schema: dict[str, Any]) -> Any:
    """Turn form strings into the integers and booleans the schema declares, for validation."""
    types = schema.get("type")
    types = types if isinstance(types, list) else [types]
    if isinstance(data, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        return {
            key: coerce_form(value, props.get(key, extra if isinstance(extra, dict) else {}))
            for key, value in data.items()
        }
    if isinstance(data, list):
        return [coerce_form(item, schema.get("items", {})) for item in data]
    if isinstance(data, str):
        if "integer" in types and data.lstrip("-").isdigit():
            return int(data)
        if "boolean" in types and data in ("true", "false"):
            return data == "true"
    return data


def validate(instance: Any, schema: dict[str, Any]) -> list[str]:
    """Return the schema violations of ``instance`` (empty when it conforms)."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema)
    return [
        f"{'/'.join(map(str, err.absolute_path)) or '<root>'}: {err.message}"
        for err in validator.iter_errors(instance)
    ]
