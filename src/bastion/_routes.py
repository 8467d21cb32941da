"""Which route a request will reach, known before the router runs: a table built at start-up.

Rate limiting, request guards, idempotency and versioning sit in the middleware
stack, in front of the router, yet what they do depends on the route. Asking the
router (every route's regex in turn) would cost each request what routing
costs; instead the app's routes are read once, at start-up, into one table per HTTP method:

- an exact dict for the static paths (``/v1/documents``), each entry holding
  the route the router would pick for that path: the first route, in
  declaration order, whose pattern matches it, so a parametrised route
  declared before a static one (``/users/{id}`` before ``/users/me``) wins, as
  it does in the router;
- one compiled alternation of the parametrised routes' patterns, in declaration
  order: Python's ``re`` tries alternatives left to right, so the first that
  matches is the router's first match.

Only routes that accept the method are in its table, so a path that some route
serves for another method (the router's 405) is unmatched here, like a 404.
Mounts are flattened (their routes prefixed); a path under a mount that none
of its routes matches is unmatched too. ``Host`` routes are not resolved: their
routes get the default policy.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

from starlette.routing import BaseRoute, Host, Mount, WebSocketRoute, compile_path
from starlette.types import Scope

__all__ = [
    "ANY_METHOD",
    "RouteEntry",
    "RouteTable",
    "depends_on",
    "flattened_routes",
    "mark_endpoint",
    "name_route",
    "route_entries",
]

Plan = TypeVar("Plan")
E = TypeVar("E")

ANY_METHOD: Final = "*"
_NAMED_GROUP: Final = re.compile(r"\(\?P<[A-Za-z_][A-Za-z0-9_]*>")


@dataclass(frozen=True, slots=True)
class RouteEntry:
    """One HTTP route as the router sees it, flattened out of mounts and included routers.

    Attributes:
        template: the full template (``/v1/documents/{id}``), or ``None`` for the
            rest of a mount that no route of it matched.
        declared: the template as declared, with convertors (``/items/{id:int}``).
        pattern: the full regular expression, without anchors or named groups.
        methods: the methods it accepts; ``None`` for any.
        endpoint: the endpoint function or class, where the decorator's mark is.
        route: the route object itself (a FastAPI ``APIRoute`` knows its body's kind).
    """

    template: str | None
    declared: str | None
    pattern: str
    methods: frozenset[str] | None
    endpoint: Any
    route: Any = None

    @property
    def static(self) -> bool:
        """Whether the route matches exactly one path (its template)."""
        return self.template is not None and "{" not in self.template


def _bare(pattern: str) -> str:
    """Drop a route regex's anchors and parameter names, to nest it in a larger one."""
    if pattern.startswith("^"):
        pattern = pattern[1:]
    if pattern.endswith("$"):
        pattern = pattern[:-1]
    return _NAMED_GROUP.sub("(?:", pattern)


def route_entries(
    routes: Sequence[BaseRoute], prefix: str = "", prefix_pattern: str = ""
) -> Iterator[RouteEntry]:
    """Yield the HTTP routes of ``routes`` in the order the router tries them."""
    for route in routes:
        contexts = getattr(route, "effective_route_contexts", None)
        if callable(contexts):
            # FastAPI >= 0.16x: an included router's routes live where they were
            # declared; the inclusion holds a context per route with the full path.
            for context in contexts():
                copied = getattr(context, "starlette_route", None)
                if copied is not None:
                    yield from route_entries([copied], prefix, prefix_pattern)
                    continue
                regex = getattr(context, "path_regex", None)
                template = getattr(context, "path_format", None)
                if regex is None or not isinstance(template, str):
                    continue
                methods = getattr(context, "methods", None)
                yield RouteEntry(
                    prefix + template,
                    prefix + template,
                    prefix_pattern + _bare(regex.pattern),
                    frozenset(methods) if methods else None,
                    getattr(context, "endpoint", None),
                    context,
                )
        elif isinstance(route, Mount):
            yield from _mount_entries(route, prefix, prefix_pattern)
        elif isinstance(route, (Host, WebSocketRoute)):
            continue
        else:
            regex = getattr(route, "path_regex", None)
            template = getattr(route, "path_format", None)
            if regex is None or not isinstance(template, str):
                continue
            methods = getattr(route, "methods", None)
            declared = getattr(route, "path", template)
            yield RouteEntry(
                prefix + template,
                prefix + (declared if isinstance(declared, str) else template),
                prefix_pattern + _bare(regex.pattern),
                frozenset(methods) if methods else None,
                getattr(route, "endpoint", None),
                route,
            )


def _mount_entries(mount: Mount, prefix: str, prefix_pattern: str) -> Iterator[RouteEntry]:
    inner = getattr(mount.app, "routes", None)
    whole = prefix_pattern + _bare(mount.path_regex.pattern)
    if inner is None:
        # An app of its own (static files): one route for everything under the mount.
        template = prefix + mount.path + "/{path}"
        yield RouteEntry(template, template, whole, None, getattr(mount, "app", None))
        return
    head, _, _ = compile_path(mount.path)
    yield from route_entries(inner, prefix + mount.path, prefix_pattern + _bare(head.pattern))
    # The mount took the path: whatever its routes do not match is the mount's 404.
    yield RouteEntry(None, None, whole, None, None)


class _MethodTable(Generic[Plan]):
    __slots__ = ("every", "pattern", "plans", "static")

    def __init__(
        self,
        static: dict[str, Plan],
        pattern: re.Pattern[str] | None,
        plans: list[Plan],
        every: list[tuple[re.Pattern[str], Plan]],
    ) -> None:
        self.static = static
        self.pattern = pattern
        self.plans = plans
        self.every = every


class RouteTable(Generic[Plan]):
    """Resolves ``(method, path)`` to the plan of the route the router would pick.

    Args:
        entries: the app's routes, in router order (:func:`route_entries`).
        plan: the plan of an entry for a method (``*`` for a method no route names).
        unmatched: the plan of a path no route matches.
        methods: methods to build a table for besides those the routes name.
    """

    __slots__ = ("_any", "_tables", "unmatched")

    def __init__(
        self,
        entries: Sequence[RouteEntry],
        plan: Callable[[RouteEntry, str], Plan],
        unmatched: Plan,
        methods: Sequence[str] = (),
    ) -> None:
        self.unmatched = unmatched
        names = {method for entry in entries for method in entry.methods or ()}
        names.update(methods)
        self._tables = {
            method: self._table(entries, method, plan, unmatched) for method in sorted(names)
        }
        self._any = self._table(entries, ANY_METHOD, plan, unmatched)

    @staticmethod
    def _table(
        entries: Sequence[RouteEntry],
        method: str,
        plan: Callable[[RouteEntry, str], Plan],
        unmatched: Plan,
    ) -> _MethodTable[Plan]:
        accepting = [
            entry
            for entry in entries
            if entry.methods is None or (method != ANY_METHOD and method in entry.methods)
        ]
        plans = [
            unmatched if entry.template is None else plan(entry, method) for entry in accepting
        ]
        compiled = [re.compile(entry.pattern) for entry in accepting]
        static: dict[str, Plan] = {}
        for entry in accepting:
            path = entry.template
            if not entry.static or path is None or path in static:
                continue
            # The router's pick for this exact path: the first route matching it,
            # which may be a parametrised one declared earlier.
            for index, regex in enumerate(compiled):
                if regex.fullmatch(path):
                    static[path] = plans[index]
                    break
        dynamic = [index for index, entry in enumerate(accepting) if not entry.static]
        pattern = None
        if dynamic:
            # One group per alternative and none inside (named groups were made
            # non-capturing), so ``lastindex`` is the matching alternative.
            joined = "|".join(f"({accepting[index].pattern})" for index in dynamic)
            pattern = re.compile(f"^(?:{joined})$")
        every = [(re.compile(f"^{regex.pattern}$"), plans[i]) for i, regex in enumerate(compiled)]
        return _MethodTable(static, pattern, [plans[index] for index in dynamic], every)

    def resolve(self, method: str, path: str) -> Plan:
        """Return the plan of the route a request for ``method`` and ``path`` reaches."""
        table = self._tables.get(method, self._any)
        if path.endswith("\n"):
            # The router's ``$`` also matches before a final newline (``/login%0A``
            # reaches /login): ask every route in turn, as the router does, rather
            # than let such a path miss the exact dict and escape the route's policy.
            return next((plan for regex, plan in table.every if regex.match(path)), self.unmatched)
        found = table.static.get(path)
        if found is not None:
            return found
        pattern = table.pattern
        if pattern is None:
            return self.unmatched
        match = pattern.match(path)
        if match is None:
            return self.unmatched
        return table.plans[match.lastindex - 1]  # type: ignore[operator]  # a group matched


class _Named:
    """Stands in for the route in ``scope["route"]`` of an answer made before routing."""

    __slots__ = ("path",)

    def __init__(self, path: str) -> None:
        self.path = path


def name_route(scope: Scope, template: str | None) -> None:
    """Label an answer a middleware makes before routing with its route's template.

    The request middleware labels metrics, the access line and the span by
    ``scope["route"].path``; the router, which sets it, never ran for this request.
    """
    if template is not None and "route" not in scope:
        scope["route"] = _Named(template)


class PathSet:
    """Paths a layer leaves alone, matched by path segment, not by string prefix.

    An entry ending in ``/`` covers what lies below it; any other entry is the path
    itself and what lies below it, never a longer name. So ``/metrics`` covers
    ``/metrics`` and ``/metrics/x`` but not an app's ``/metrics-exports``, which a
    plain ``startswith`` would exempt from every layer.
    """

    __slots__ = ("below", "exact")

    def __init__(self, entries: Sequence[str]) -> None:
        below: list[str] = []
        exact: set[str] = set()
        for entry in entries:
            if not entry:
                continue
            if entry.endswith("/"):
                below.append(entry)
            else:
                exact.add(entry)
                below.append(entry + "/")
        self.below = tuple(below)
        self.exact = frozenset(exact)

    def __bool__(self) -> bool:
        return bool(self.below)

    def matches(self, path: str) -> bool:
        """Whether ``path`` is one of the set's paths or lies below one."""
        return path.startswith(self.below) or path in self.exact


def flattened_routes(routes: Iterable[Any]) -> Iterator[Any]:
    """Yield ``routes`` with each included router replaced by its routes' contexts.

    For reading an app's operations (``methods``, ``path``, ``dependant``,
    ``endpoint``) when completing its OpenAPI document.
    """
    for route in routes:
        contexts = getattr(route, "effective_route_contexts", None)
        if callable(contexts):
            # FastAPI >= 0.16x keeps an included router as one node; its contexts
            # carry each route's full path, methods and dependencies.
            yield from contexts()
        else:
            yield route


def depends_on(dependant: Any, matches: Callable[[Any], bool]) -> bool:
    """Whether any node of a FastAPI dependency tree has a ``call`` that ``matches``.

    Args:
        dependant: the route's ``dependant`` (the root of its dependency tree).
        matches: tests a node's ``call`` (``None`` for a node without one).
    """
    stack = [dependant]
    while stack:
        node = stack.pop()
        if matches(getattr(node, "call", None)):
            return True
        stack.extend(getattr(node, "dependencies", ()))
    return False


def mark_endpoint(decorator: str, name: str, value: object) -> Callable[[E], E]:
    """Return a decorator setting attribute ``name`` to ``value`` on an endpoint.

    Route tables read the mark from the endpoint at start-up (:attr:`RouteEntry.endpoint`).

    Args:
        decorator: the public decorator's name, for the error (``"idempotent"``).
        name: the attribute holding the mark.
        value: the mark.

    Raises:
        TypeError: (from the returned decorator) the endpoint takes no attributes.
    """

    def decorate(endpoint: E) -> E:
        try:
            setattr(endpoint, name, value)
        except (AttributeError, TypeError):
            raise TypeError(
                f"@{decorator} decorates endpoint functions or classes, not {endpoint!r}"
            ) from None
        return endpoint

    return decorate
