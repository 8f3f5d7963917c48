"""The contract as code: `@operation(...)` on a responder declares its schemas, validates the
request against them, and is what `/openapi.json` is generated from.

A responder decorated with a `body` or `query` schema receives the validated object as a
keyword argument of that name; a refusal is a 400 in the contract's error shape whose
`error` names the first failing field by its path and whose `details` lists every one.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import falcon
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema

from models.errors import InvalidInput
from tasktypes import TASK_TYPE_SPECS

from . import schemas

# Every status the API can answer besides success, with what it means there.
ERROR_STATUSES = {
    400: "The request is not valid (the error names the field)",
    401: "Missing, expired or invalid bearer token",
    402: "Not enough credits",
    403: "Not allowed (plan or role)",
    404: "Not found (another user's resource is not found too)",
    405: "Method not allowed on this path",
    409: "Conflicts with the current state",
    411: "Length required",
    413: "Body too large",
    415: "Unsupported media type",
    429: "Too many requests (rate_limited, with Retry-After) or tasks in flight",
    502: "Stripe could not be reached or refused the request",
    503: "A dependency (database, broker, token keys, billing) is unavailable",
}
_PATH_PARAM = re.compile(r"{(\w+)}")


@dataclass(frozen=True)
class Operation:
    summary: str
    responses: dict[int, Any] = field(default_factory=dict)  # status -> schema class, or a content dict
    body: type[schemas.RequestSchema] | None = None
    body_required: bool = True
    query: type[schemas.RequestSchema] | None = None
    errors: tuple[int, ...] = ()
    request_content: dict[str, Any] | None = None  # for bodies that are not JSON (uploads)
    headers: tuple[dict[str, Any], ...] = ()
    # OpenAPI links by response status: what a client (and the fuzzer) may call next with it.
    links: dict[int, dict[str, Any]] = field(default_factory=dict)
    # Headers an answer may carry, by response status: {name: OpenAPI header object}.
    response_headers: dict[int, dict[str, Any]] = field(default_factory=dict)
    description: str = ""
    tags: tuple[str, ...] = ()


def operation(summary: str, **details) -> Callable:
    op = Operation(summary, **details)

    def decorate(responder: Callable) -> Callable:
        @functools.wraps(responder)
        def validated(resource, req: falcon.Request, resp: falcon.Response, **params):
            if op.query is not None:
                params["query"] = validate(op.query, _query_dict(req))
            if op.body is not None:
                params["body"] = validate(op.body, _json_object(req, op.body_required))
            return responder(resource, req, resp, **params)

        validated.__openapi__ = op  # type: ignore[attr-defined]
        return validated

    return decorate


def _query_dict(req: falcon.Request) -> dict[str, Any]:
    # A repeated parameter arrives as a list, which no scalar field accepts: a 400, not a guess.
    return dict(req.params)


def _json_object(req: falcon.Request, required: bool) -> dict[str, Any]:
    if not required and not req.content_length:
        return {}
    media_type = (req.content_type or falcon.MEDIA_JSON).split(";", 1)[0].strip().lower()
    if media_type != falcon.MEDIA_JSON and not media_type.endswith("+json"):
        # A form-encoded body would skip every JSON check; only JSON is read here.
        raise falcon.HTTPUnsupportedMediaType(title="Unsupported media type", code="unsupported_media_type",
                                              description="Send the body as application/json")
    body = req.get_media(default_when_empty=None)
    if body is None:
        raise InvalidInput("A JSON body is required", code="body_required")
    if not isinstance(body, dict):
        raise InvalidInput("The JSON body must be an object", code="invalid_body")
    return body


def validate(schema: type[schemas.RequestSchema], data: dict[str, Any]):
    """`data` read by `schema`, or the 400 that names the failing field."""
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]["loc"]
        code = schema.error_codes.get(str(first[0]) if first else "", "invalid_input")
        raise InvalidInput.from_validation(exc, data, code=code) from None


# --- the document ------------------------------------------------------------------------------

def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _content(schema: Any) -> dict[str, Any]:
    if isinstance(schema, dict):
        return schema
    return {"application/json": {"schema": _ref(schema)}}


def _query_parameters(query: type[BaseModel], components: dict[str, Any]) -> list[dict[str, Any]]:
    model_schema = components[query.__name__]
    required = set(model_schema.get("required", ()))
    params = []
    for name, prop in model_schema["properties"].items():
        prop = dict(prop)
        description = prop.pop("description", None)
        prop.pop("title", None)
        if prop.get("default", 0) is None:
            del prop["default"]
        # An absent parameter is the "null" of an optional one; a query string cannot say null.
        variants = [v for v in prop.pop("anyOf", ()) if v != {"type": "null"}]
        if len(variants) == 1:
            prop.update(variants[0])
        elif variants:
            prop["anyOf"] = variants
        param = {"name": name, "in": "query", "required": name in required, "schema": prop}
        if description:
            param["description"] = description
        params.append(param)
    return params


def _operation_object(path: str, method: str, resource: Any, op: Operation,
                      components: dict[str, Any]) -> dict[str, Any]:
    auth = getattr(resource, "auth", "user")
    doc: dict[str, Any] = {
        "operationId": f"{method}_{re.sub(r'[^a-zA-Z0-9]+', '_', path).strip('_')}",
        "summary": op.summary,
        "tags": list(op.tags or (path.split("/")[2] if path.startswith("/api/") else "service",)),
    }
    if op.description:
        doc["description"] = op.description
    parameters = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                  for name in _PATH_PARAM.findall(path)]
    if op.query is not None:
        parameters += _query_parameters(op.query, components)
    parameters += list(op.headers)
    if parameters:
        doc["parameters"] = parameters
    errors = set(op.errors) | {405, 503}
    if getattr(resource, "rate_limited", True):
        errors.add(429)
    if op.body is not None or op.request_content is not None:
        content = op.request_content or {"application/json": {"schema": _ref(op.body)}}
        doc["requestBody"] = {"required": op.body_required, "content": content}
        errors |= {400, 413, 415}
    if op.query is not None or parameters:
        errors.add(400)
    if auth is None:
        doc["security"] = []
    else:
        doc["security"] = [{"bearerAuth": []}]
        errors.add(401)
        if auth == "admin":
            errors.add(403)
            doc["description"] = (doc.get("description", "") + " Operators only (the admin claim).").strip()
    responses: dict[str, Any] = {}
    for status, schema in sorted(op.responses.items()):
        responses[str(status)] = {"description": falcon.code_to_http_status(status)[4:] or "OK",
                                  "content": _content(schema)}
        if status in op.links:
            responses[str(status)]["links"] = op.links[status]
        if status in op.response_headers:
            responses[str(status)]["headers"] = op.response_headers[status]
    for status in sorted(errors):
        responses[str(status)] = {"description": ERROR_STATUSES[status], "content": _content(schemas.ErrorBody)}
    doc["responses"] = responses
    return doc


def responders(resource: Any) -> list[tuple[str, Callable]]:
    return [(method.lower(), getattr(resource, f"on_{method.lower()}"))
            for method in falcon.constants.COMBINED_METHODS if hasattr(resource, f"on_{method.lower()}")]


def build_document(routes: list[tuple[str, Any]], *, title: str = "StudioX API", version: str = "1") -> dict[str, Any]:
    """The OpenAPI 3.1 document of `routes` ((uri template, resource) pairs, as registered)."""
    models: set[type[BaseModel]] = {schemas.ErrorBody}
    # Shapes clients send are documented as they are read, the rest as they are written.
    inputs: set[type[BaseModel]] = {schemas.UploadForm, *(spec.params for spec in TASK_TYPE_SPECS.values())}
    ops = []
    for path, resource in routes:
        for method, responder in responders(resource):
            op = getattr(responder, "__openapi__", None)
            if op is None:
                raise TypeError(f"{type(resource).__name__}.on_{method} has no @operation: it would be undocumented")
            ops.append((path, method, resource, op))
            inputs.update(m for m in (op.body, op.query) if m is not None)
            models.update(s for s in op.responses.values() if isinstance(s, type) and issubclass(s, BaseModel))
    _, top = models_json_schema(
        [(m, "validation") for m in sorted(inputs, key=lambda m: m.__name__)]
        + [(m, "serialization") for m in sorted(models, key=lambda m: m.__name__)],
        by_alias=True, ref_template="#/components/schemas/{model}")
    components = dict(top.get("$defs", {}))
    paths: dict[str, dict[str, Any]] = {}
    for path, method, resource, op in ops:
        paths.setdefault(path, {})[method] = _operation_object(path, method, resource, op, components)
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version,
                 "description": "Credit-metered AI media tasks. Every error has the body ErrorBody."},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
        },
    }
