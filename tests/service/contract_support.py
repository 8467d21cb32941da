"""The OpenAPI contract, checked against real responses.

:func:`contract_violations` compares one response with what the app's OpenAPI
document says the operation answers: the status must be documented for the
operation, a problem's ``code`` must be among that status's ``x-error-codes``, and
the body must match the documented schema. :class:`ContractRecorder` applies it to
every response an ``httpx`` client receives and remembers which operations were
driven, so a test can also demand that none was left out.

The same check runs inside schemathesis (:func:`schemathesis_contract_check`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import jsonschema_rs
import orjson

PROBLEM_CONTENT_TYPE = "application/problem+json"
METHODS = frozenset({"get", "put", "post", "delete", "patch", "head", "options", "trace"})


class ContractViolation(AssertionError):
    """A response the OpenAPI document does not allow."""


@dataclass(frozen=True)
class Operation:
    """One operation of the document: its method, path template and description."""

    method: str
    template: str
    spec: Mapping[str, Any]


def operations(document: Mapping[str, Any]) -> Iterator[Operation]:
    """Every operation of an OpenAPI document, in document order."""
    for template, item in document.get("paths", {}).items():
        for method, spec in item.items():
            if method in METHODS:
                yield Operation(method.upper(), template, spec)


def _template_pattern(template: str) -> re.Pattern[str]:
    parts = re.split(r"(\{[^}]+\})", template)
    regex = "".join("[^/]+" if p.startswith("{") else re.escape(p) for p in parts)
    return re.compile(f"^{regex}$")


def match_template(document: Mapping[str, Any], method: str, path: str) -> str | None:
    """The path template of ``document`` an actual request path falls under.

    Static templates win over templated ones (as in the router), so
    ``/v1/tenants/invitations/accept`` is not taken for ``/v1/tenants/{tenant_id}...``.
    """
    paths = document.get("paths", {})
    if path in paths and method.lower() in paths[path]:
        return path
    candidates = [
        template
        for template, item in paths.items()
        if method.lower() in item and _template_pattern(template).match(path)
    ]
    # Fewest parameters first: the most specific template.
    candidates.sort(key=lambda template: template.count("{"))
    return candidates[0] if candidates else None


def _documented_response(responses: Mapping[str, Any], status: int) -> Mapping[str, Any] | None:
    if str(status) in responses:
        return responses[str(status)]
    ranged = f"{str(status)[0]}XX"
    for key in (ranged, ranged.lower()):
        if key in responses:
            return responses[key]
    return responses.get("default")


def _media_schema(
    response: Mapping[str, Any], content_type: str | None
) -> tuple[str | None, Mapping[str, Any] | None]:
    content = response.get("content") or {}
    if not content:
        return None, None
    media = (content_type or "").split(";")[0].strip().lower()
    if media in content:
        return media, content[media].get("schema")
    # A JSON media type documented as another JSON type (problem+json under
    # application/json) still says what the body looks like.
    for documented, spec in content.items():
        if documented.endswith("json") and media.endswith("json"):
            return documented, spec.get("schema")
    return None, None


_VALIDATORS: dict[tuple[int, str], Any] = {}


def _validator(document: Mapping[str, Any], schema: Mapping[str, Any]) -> Any:
    key = (id(document), orjson.dumps(schema, option=orjson.OPT_SORT_KEYS).decode())
    validator = _VALIDATORS.get(key)
    if validator is None:
        # The document's components ride along at the root, so "#/components/..."
        # references resolve as they do in the document itself.
        root = {**schema, "components": document.get("components", {})}
        validator = jsonschema_rs.Draft202012Validator(root)
        _VALIDATORS[key] = validator
    return validator


def _problem_violations(
    where: str, documented: Mapping[str, Any], status: int, problem: Mapping[str, Any]
) -> list[str]:
    codes = documented.get("x-error-codes")
    code = problem.get("code")
    found: list[str] = []
    if codes is None:
        found.append(f"{where}: the status lists no x-error-codes (got {code!r})")
    elif code not in codes:
        found.append(f"{where}: code {code!r} is not documented (documented: {codes})")
    if problem.get("status") != status:
        found.append(f"{where}: the problem says status {problem.get('status')!r}")
    return found


def contract_violations(
    document: Mapping[str, Any],
    *,
    method: str,
    template: str,
    status: int,
    content_type: str | None,
    body: bytes,
) -> list[str]:
    """What is wrong with one response, by the document; empty when it conforms.

    Args:
        document: the app's OpenAPI document.
        method: the request method.
        template: the operation's path template, as in the document.
        status: the response status.
        content_type: the response ``Content-Type``, if any.
        body: the response body.

    Returns:
        One line per violation.
    """
    where = f"{method.upper()} {template} -> {status}"
    operation = document.get("paths", {}).get(template, {}).get(method.lower())
    if operation is None:
        return [f"{where}: the operation is not documented"]
    documented = _documented_response(operation.get("responses", {}), status)
    if documented is None:
        listed = ", ".join(sorted(operation.get("responses", {})))
        return [f"{where}: status {status} is not documented (documented: {listed})"]
    problems: list[str] = []
    media = (content_type or "").split(";")[0].strip().lower()
    is_problem = media == PROBLEM_CONTENT_TYPE
    if status >= 400 and not is_problem:
        problems.append(f"{where}: an error answered as {content_type!r}, not a problem")
    data: Any = None
    if body and media.endswith("json"):
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            return [*problems, f"{where}: the body is not JSON: {body[:200]!r}"]
    if is_problem and isinstance(data, dict):
        problems.extend(_problem_violations(where, documented, status, data))
    if status in (204, 304) or method.upper() == "HEAD":
        if body:
            problems.append(f"{where}: a {status} answer carries a body")
        return problems
    documented_media, schema = _media_schema(documented, content_type)
    if documented.get("content") and documented_media is None:
        listed = ", ".join(documented["content"])
        problems.append(f"{where}: content type {content_type!r} is not documented ({listed})")
    if schema and data is not None:
        errors = list(_validator(document, schema).iter_errors(data))
        problems.extend(
            f"{where}: schema: {error.message} at {list(error.instance_path)}"
            for error in errors[:5]
        )
    return problems


def _raw_path(request: httpx.Request) -> str:
    # Matched still percent-encoded: an encoded "/" inside an id is part of one segment.
    return request.url.raw_path.decode("ascii").split("?", 1)[0]


def check_response(document: Mapping[str, Any], response: httpx.Response) -> None:
    """Raise :class:`ContractViolation` unless ``response`` is what the document allows."""
    request = response.request
    template = match_template(document, request.method, _raw_path(request))
    if template is None:
        raise ContractViolation(f"{request.method} {request.url.path}: no documented operation")
    problems = contract_violations(
        document,
        method=request.method,
        template=template,
        status=response.status_code,
        content_type=response.headers.get("content-type"),
        body=response.content,
    )
    if problems:
        raise ContractViolation("\n".join(problems))


@dataclass
class ContractRecorder:
    """Checks every response of a client against the document and records what it saw.

    Install with ``client.event_hooks["response"].append(recorder.hook)``. With
    ``collect`` off (the default), a violation fails the request that caused it (the
    hook raises), so the failing call is in the traceback; with it on, violations are
    gathered in ``violations`` so that one run lists them all (assert it is empty).
    """

    document: Mapping[str, Any]
    collect: bool = False
    outside: tuple[str, ...] = ("/health/", "/metrics", "/admin/", "/.well-known/", "/api/")
    seen: dict[tuple[str, str], set[int]] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)

    async def hook(self, response: httpx.Response) -> None:
        """The ``httpx`` response hook."""
        await response.aread()
        request = response.request
        template = match_template(self.document, request.method, _raw_path(request))
        if template is None:
            # Operational routes (health, metrics, admin, the docs themselves) are outside
            # the document by design; any other path answered must be documented.
            if request.url.path.startswith(self.outside):
                return
            self._violated(f"{request.method} {request.url.path}: not documented")
            return
        self.seen.setdefault((request.method, template), set()).add(response.status_code)
        try:
            check_response(self.document, response)
        except ContractViolation as violation:
            self._violated(str(violation))

    def _violated(self, message: str) -> None:
        if not self.collect:
            raise ContractViolation(message)
        if message not in self.violations:
            self.violations.append(message)

    def missing(self, document_operations: Iterable[Operation]) -> list[str]:
        """Operations of the document no request reached."""
        return [
            f"{op.method} {op.template}"
            for op in document_operations
            if (op.method, op.template) not in self.seen
        ]


def schemathesis_contract_check(ctx: Any, response: Any, case: Any) -> bool | None:
    """A schemathesis check applying :func:`contract_violations` to each response.

    Pass it in ``checks=`` (it is not registered globally, so other suites'
    ``call_and_validate`` are unaffected).
    """
    document = case.operation.schema.raw_schema
    problems = contract_violations(
        document,
        method=case.method,
        template=case.path,
        status=response.status_code,
        content_type=response.headers.get("content-type", [None])[0]
        if isinstance(response.headers.get("content-type"), list)
        else response.headers.get("content-type"),
        body=response.content or b"",
    )
    if problems:
        raise AssertionError("\n".join(problems))
    return None
