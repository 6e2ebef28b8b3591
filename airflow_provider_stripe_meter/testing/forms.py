"""Decode Stripe's form encoding (``payload[value]=5&expand[0]=x``) into nested data."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl

_KEY_PART = re.compile(r"\[([^\]]*)\]")


def decode_form(body: str) -> dict[str, Any]:
    """Return the nested dict a form body encodes; ``a[0]``/``a[]`` keys become lists."""
    root: dict[str, Any] = {}
    for raw_key, value in parse_qsl(body, keep_blank_values=True):
        head, _, rest = raw_key.partition("[")
        parts = [head, *_KEY_PART.findall("[" + rest)] if rest else [head]
        node: Any = root
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list) and (part == "" or part.isdigit()):
                if last:
                    node.append(value)
                    break
                node.append({})
                node = node[-1]
                continue
            if last:
                node[part] = value
                break
            nxt = parts[i + 1]
            default: Any = [] if (nxt == "" or nxt.isdigit()) else {}
            node = node.setdefault(part, default)
    return root
