"""Rules from configuration: parsed limits paired with an algorithm, checked once at start-up.

Everything a store would otherwise discover on the first request (a sliding log
too large to keep, a policy without a limit, a cost no burst can hold) is refused
here with a :class:`~bastion.errors.ConfigurationError` that names the setting's
value and says what to change.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final, get_args

from bastion.errors import ConfigurationError
from bastion.ratelimit._expression import Limit, parse_limits
from bastion.ratelimit._store import Algorithm, Rule

ALGORITHMS: Final[tuple[Algorithm, ...]] = get_args(Algorithm)
"""The algorithms a rule may name."""

_SHORT: Final[dict[Algorithm, str]] = {
    "token_bucket": "tb",
    "sliding_window": "sw",
    "sliding_log": "sl",
}


def rule_id(rule: Rule) -> str:
    """A stable name for the state of ``rule``: algorithm, rate, period and burst.

    Stores keep a rule's counts under this id, so reordering the limits of a policy
    or adding one does not mix their counts, and two spellings of the same limit
    (``10/s`` and ``10 per second``) share theirs.

    Example:
        >>> from bastion.ratelimit._expression import parse_limit
        >>> rule_id(Rule(parse_limit("10/second burst 20"), "token_bucket"))
        'tb:10/1/20'
    """
    limit = rule.limit
    period = limit.period
    shown = str(int(period)) if period.is_integer() else repr(period)
    return f"{_SHORT[rule.algorithm]}:{limit.rate}/{shown}/{limit.burst}"


def build_rules(
    limits: Iterable[Limit] | str,
    algorithm: str,
    *,
    max_log_limit: int,
) -> tuple[Rule, ...]:
    """Pair each limit with ``algorithm``, refusing what no store should be asked to run.

    Args:
        limits: parsed limits, or an expression such as ``20/second;1000/hour``.
        algorithm: ``token_bucket``, ``sliding_window`` or ``sliding_log``.
        max_log_limit: the largest burst a ``sliding_log`` may have
            (``ratelimit.max_log_limit``): a log keeps one entry per admitted unit.

    Returns:
        The rules, in the order of the limits.

    Raises:
        ConfigurationError: no limit; an unknown algorithm; a sliding log above
            ``max_log_limit``; the same limit twice; an expression that does not parse.

    Example:
        >>> [rule_id(r) for r in build_rules("10/s;1000/h", "token_bucket", max_log_limit=1000)]
        ['tb:10/1/10', 'tb:1000/3600/1000']
    """
    if isinstance(limits, str):
        try:
            limits = parse_limits(limits)
        except ValueError as exc:
            raise ConfigurationError(f"invalid rate limit: {exc}") from None
    limits = tuple(limits)
    if not limits:
        raise ConfigurationError(
            "a rate-limit policy needs at least one limit, such as 20/second;1000/hour"
        )
    if algorithm not in ALGORITHMS:
        raise ConfigurationError(
            f"unknown rate-limit algorithm {algorithm!r}; use one of {', '.join(ALGORITHMS)}"
        )
    rules = tuple(Rule(limit, algorithm) for limit in limits)
    seen: dict[str, str] = {}
    for rule in rules:
        limit = rule.limit
        if rule.algorithm == "sliding_log" and limit.burst > max_log_limit:
            raise ConfigurationError(
                f"the limit {limit.text!r} is too large for the exact sliding_log algorithm: "
                f"it would keep up to {limit.burst} entries per key and scan them on every "
                f"request, and ratelimit.max_log_limit is {max_log_limit}; use sliding_window "
                "or token_bucket for it (their cost does not grow with the limit), or raise "
                "ratelimit.max_log_limit knowingly"
            )
        key = rule_id(rule)
        if key in seen:
            raise ConfigurationError(
                f"the limits {seen[key]!r} and {limit.text!r} are the same limit; give it once"
            )
        seen[key] = limit.text
    return rules


def check_cost(rules: Sequence[Rule], cost: int) -> None:
    """Refuse a cost that some rule could never admit.

    A request of ``cost`` units against a burst smaller than ``cost`` would be
    rejected forever, with a ``Retry-After`` that lies; configuration says so instead.

    Raises:
        ConfigurationError: ``cost`` is below 1 or above the smallest burst.
    """
    if cost < 1:
        raise ConfigurationError(f"a rate-limit cost must be at least 1, not {cost}")
    for rule in rules:
        if cost > rule.limit.burst:
            raise ConfigurationError(
                f"a cost of {cost} can never pass the limit {rule.limit.text!r}, whose burst "
                f"is {rule.limit.burst}; lower the cost or raise that limit's burst to at "
                f"least {cost}"
            )
