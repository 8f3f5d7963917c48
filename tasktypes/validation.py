"""How a pydantic ValidationError reads to a client: each failure with the field's path as
the client spells it (`params.operations[2].degrees`) and a short message. The API's 400s
and the processors' `invalid_params` failures both word it so."""

from __future__ import annotations

from typing import Any


def validation_failures(exc, data: Any = None, prefix: str = "") -> list[dict[str, Any]]:
    """A pydantic ValidationError as a list of {"path", "message", "type"}.

    The path is how a client spells the field: `params.operations[2].degrees`. `data` is the
    validated input; segments of an error's location that are not in it (the tag pydantic
    adds for a discriminated union, a validator's name) are left out of the path.
    """
    failures = []
    for error in exc.errors(include_url=False):
        path, node, loc = prefix, data, list(error["loc"])
        for index, segment in enumerate(loc):
            last = index == len(loc) - 1
            if isinstance(segment, int) and isinstance(node, list):
                path += f"[{segment}]"
                node = node[segment] if 0 <= segment < len(node) else None
                continue
            if isinstance(node, dict) and segment not in node and not last:
                continue  # not a key of the input: a union tag or a validator's name
            path += f".{segment}" if path else str(segment)
            node = node.get(segment) if isinstance(node, dict) else None
        failures.append({"path": path, "message": _readable(error), "type": error["type"]})
    return failures


def _readable(error: dict[str, Any]) -> str:
    message = error["msg"]
    for pydantic_says, we_say in (("Input should", "must"), ("Value error, ", ""), ("Assertion failed, ", "")):
        if message.startswith(pydantic_says):
            message = we_say + message[len(pydantic_says):]
    if error["type"] == "missing":
        return "is required"
    if error["type"] == "extra_forbidden":
        return "is not a known option"
    return message
