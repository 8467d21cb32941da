"""The statistical layer: a logistic regression over word and affix features, in pure Python.

One featuriser serves training (``scripts/train_prompt_injection.py`` builds its
sparse matrix with :func:`features`) and scoring (:class:`LinearModel`), so the
shipped weights mean the same thing in both places. Features of a skeleton
(see :func:`~bastion.guard._injection._normalise.skeleton`), split on spaces into
tokens; each token is stripped of edge punctuation and cut to 32 characters (its
*word*), and a non-empty word gives one feature per family:

- ``w``: the word itself;
- ``p4``: its first 4 characters (a stem: "igno" is shared by ignore, ignored,
  ignoring, ignoriere);
- ``s4``: its last 4 characters (an inflection or suffix: "-ions", "-eren").

A word shorter than an affix gives the whole word for that family. The text (or
window) is counted by *distinct* token: a token seen ``c`` times weighs ``v = 1 +
ln(c)`` (sublinear term frequency), and its word's features count ``v * scale`` with

    scale = sqrt(n / (n + 16)) / sqrt(sum of v**2 over the distinct tokens)

``n`` the number of distinct tokens (a token of edge punctuation alone included; it
has no features). The vector is L2-normalised over the distinct tokens, then shrunk
by ``sqrt(n / (n + 16))``; when every token occurs once, ``scale`` is
``1/sqrt(n + 16)``. Repeating a text, or a single word, leaves its score (nearly)
unchanged: repeating every token ``k`` times only makes the ``v`` more alike, and a
text of one repeated token scores exactly as the token alone. (Format /2 counted
every occurrence over ``sqrt(n_tokens + 8)``, so a feature grew like the square root
of its count: a benign sentence repeated 36 times scored 0.99.) Tokens that differ
only by edge punctuation ("ignore" and "ignore,") are distinct tokens of the same
word; a feature shared by two words (``p4:igno`` of "ignore" and "ignored") counts
for each. The 16 (``length_prior``; 8 in format /2) keeps one loaded word of a short
question ("installation instructions for the printer") from weighing as much as a
whole sentence. The score is ``sigmoid(b + w·x)``. Features are kept by name (a
vocabulary of the weighted ones), not hashed: no collisions, and a feature the model
has no weight for costs one failed dict look-up.

Why affixes and not character n-grams: a 4 KB text has about 16,000 character
n-grams of 2 to 5 characters, and building that many strings in Python costs
milliseconds however it is done (the previous featuriser: 4.6 ms per 4 KB of new
words). Three features per word, computed for all new words at once with C-level
``map`` calls, cost well under 1 µs per new word, so the per-word cache saves time
but is no longer what makes the bound reachable. The model alone recalls less
(cross-validated 0.75 instead of 0.82); the detector, rules included, recalls more
at a threshold chosen without the reported corpus (bench/prompt_injection.py).

Because every feature belongs to one token, ``w·x`` is ``scale`` times the sum over the
distinct tokens of ``v`` times the token's summed weights; the per-token sums are
cached, and each window is counted with a C-level ``Counter``.
"""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from operator import add, itemgetter, mul
from pathlib import Path
from typing import Any, Final

__all__ = [
    "DEFAULT_MODEL_PATH",
    "FORMAT",
    "FeatureSpec",
    "LinearModel",
    "features",
]

FORMAT: Final = "bastion-prompt-injection-logreg/3"
"""/3: sublinear counts of distinct tokens, L2-normalised (/2 counted every occurrence)."""
DEFAULT_MODEL_PATH: Final = Path(__file__).with_name("model.json")
_EDGE: Final = "\"'`.,;:!?()[]{}<>*_~|/\\-"
_CACHE_MAX: Final = 65_536
WINDOW_TOKENS: Final = 128
"""A longer text is scored in windows of this many tokens (half overlapping), max taken."""
_SEPARATOR: Final = ":"


@dataclass(frozen=True, slots=True)
class FeatureSpec:
    """The featuriser's parameters, stored with the weights.

    Attributes:
        prefixes: lengths of the word prefixes used as features.
        suffixes: lengths of the word suffixes used as features.
        max_token_chars: a word is cut to this many characters first.
        length_prior: the shrinkage ``sqrt(n / (n + length_prior))`` of the
            L2-normalised vector, ``n`` the number of distinct tokens, so that one
            word of a short text weighs less.
    """

    prefixes: tuple[int, ...] = (4,)
    suffixes: tuple[int, ...] = (4,)
    max_token_chars: int = 32
    length_prior: int = 16

    def families(self) -> list[tuple[str, slice]]:
        """Each feature family's name and the slice of the word it takes."""
        return [
            ("w", slice(None)),
            *((f"p{n}", slice(None, n)) for n in self.prefixes),
            *((f"s{n}", slice(-n, None)) for n in self.suffixes),
        ]


def _word(token: str, spec: FeatureSpec) -> str:
    return token.strip(_EDGE)[: spec.max_token_chars]


def features(folded: str, spec: FeatureSpec) -> dict[str, float]:
    """The sparse feature vector of a skeleton: ``{"family:text": value}``.

    This is the definition; :class:`LinearModel` computes ``w·x`` from the same
    parts without building the vector.
    """
    counts = Counter(folded.split())
    if not counts:
        return {}
    weight = {token: 1 + math.log(count) for token, count in counts.items()}
    scale = _scale(len(weight), sum(v * v for v in weight.values()), spec.length_prior)
    vector: dict[str, float] = {}
    families = spec.families()
    for token, value in weight.items():
        word = _word(token, spec)
        if not word:
            continue
        for name, cut in families:
            key = name + _SEPARATOR + word[cut]
            vector[key] = vector.get(key, 0.0) + value * scale
    return vector


_TF: Final = tuple(1 + math.log(c) if c else 0.0 for c in range(WINDOW_TOKENS + 1))
"""``1 + ln(c)`` by count ``c``, for counts up to a window's length."""
_TF2: Final = tuple(v * v for v in _TF)
"""Its squares."""


def _scale(distinct: int, squares: float, prior: int) -> float:
    """``sqrt(n / (n + prior)) / sqrt(squares)``: L2 over distinct tokens, then shrunk."""
    return math.sqrt(distinct / ((distinct + prior) * squares))


@dataclass(slots=True)
class LinearModel:
    """Logistic regression weights over :func:`features`, scored without numpy.

    Attributes:
        spec: the featuriser's parameters.
        intercept: the bias term.
        weights: the non-zero weights by feature name (``"family:text"``).
        meta: what the file says about its training (rows, date, source).
    """

    spec: FeatureSpec
    intercept: float
    weights: dict[str, float]
    meta: dict[str, Any] = field(default_factory=dict)
    # One weight table per family, keyed by the feature's text, with the slice it takes.
    _tables: list[tuple[slice, dict[str, float]]] = field(default_factory=list, repr=False)
    # Per token: the sum of its word's features' weights.
    _token_sum: dict[str, float] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        tables: dict[str, dict[str, float]] = {}
        for key, weight in self.weights.items():
            family, _, text = key.partition(_SEPARATOR)
            tables.setdefault(family, {})[text] = weight
        self._tables = [(cut, tables.get(name, {})) for name, cut in self.spec.families()]

    @classmethod
    def from_mapping(cls, document: Mapping[str, Any]) -> LinearModel:
        """Read a model from its JSON document.

        Raises:
            ValueError: not a model of this format.
        """
        if document.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} document")
        spec_doc = document["features"]
        spec = FeatureSpec(
            prefixes=tuple(int(n) for n in spec_doc["prefixes"]),
            suffixes=tuple(int(n) for n in spec_doc["suffixes"]),
            max_token_chars=int(spec_doc["max_token_chars"]),
            length_prior=int(spec_doc.get("length_prior", 0)),
        )
        weights = {str(key): float(weight) for key, weight in document["weights"].items()}
        return cls(spec, float(document["intercept"]), weights, dict(document.get("meta", {})))

    @classmethod
    def load(cls, path: Path | str = DEFAULT_MODEL_PATH) -> LinearModel:
        """Read a model from a JSON file (the shipped one by default)."""
        with Path(path).open(encoding="utf-8") as file:
            return cls.from_mapping(json.load(file))

    def to_mapping(self, *, digits: int = 7) -> dict[str, Any]:
        """The JSON document of this model, weights rounded to ``digits`` decimals."""
        return {
            "format": FORMAT,
            "features": {
                "families": [name for name, _ in self.spec.families()],
                "prefixes": list(self.spec.prefixes),
                "suffixes": list(self.spec.suffixes),
                "max_token_chars": self.spec.max_token_chars,
                "length_prior": self.spec.length_prior,
                "edge_punctuation": _EDGE,
            },
            "intercept": round(self.intercept, digits),
            "meta": self.meta,
            "weights": {
                key: round(weight, digits)
                for key, weight in sorted(self.weights.items())
                if round(weight, digits) != 0
            },
        }

    def clear_cache(self) -> None:
        """Forget the per-token sums (they are recomputed on demand)."""
        self._token_sum.clear()

    def _learn(self, tokens: list[str]) -> None:
        token_sum = self._token_sum
        # Usually every token is known: a C-level pass, no set to build.
        if all(map(token_sum.__contains__, tokens)):
            return
        missing = set(tokens).difference(token_sum)
        if len(token_sum) + len(missing) > _CACHE_MAX:
            # Adversarial text of unique tokens must not grow memory: start over.
            self.clear_cache()
            missing = set(tokens)
        new = list(missing)
        # All new tokens at once, one C-level pass per family: no Python loop per token.
        words = list(map(str.strip, new, itertools.repeat(_EDGE)))
        cut_at = self.spec.max_token_chars
        if max(map(len, words)) > cut_at:
            words = list(map(itemgetter(slice(cut_at)), words))
        zeros = itertools.repeat(0.0)
        (_, word_table), *affixes = self._tables
        # Lazy maps chained: one pass, no list per family. (``itemgetter(slice)`` cuts
        # a quarter faster than ``str.__getitem__`` with a repeated slice.)
        totals: Iterator[float] = map(word_table.get, words, zeros)
        for cut, table in affixes:
            totals = map(add, totals, map(table.get, map(itemgetter(cut), words), zeros))
        token_sum.update(zip(new, totals, strict=True))

    def _window_logit(self, tokens: list[str]) -> float:
        # Every token must be in the cache (``_learn`` first).
        if not tokens:
            return self.intercept
        counts = Counter(tokens)
        distinct = len(counts)
        sums = map(self._token_sum.__getitem__, counts)
        prior = self.spec.length_prior
        if distinct == len(tokens):
            # Every token once: v = 1 everywhere.
            return self.intercept + sum(sums) / math.sqrt(distinct + prior)
        if len(tokens) <= WINDOW_TOKENS:
            # v = 1 + ln(c) and v**2, looked up by count: C-level maps, no Python loop.
            total: float = sum(map(mul, sums, map(_TF.__getitem__, counts.values())))
            squares = sum(map(_TF2.__getitem__, counts.values()))
        else:  # a whole text (``logit``, as in training): counts may exceed the table
            values = [1 + math.log(count) for count in counts.values()]
            total = sum(map(mul, sums, values))
            squares = sum(map(mul, values, values))
        return self.intercept + total * _scale(distinct, squares, prior)

    def logit(self, folded: str) -> float:
        """``b + w·x`` of a whole skeleton (what training saw), without windows."""
        tokens = folded.split()
        self._learn(tokens)
        return self._window_logit(tokens)

    def score(self, folded: str) -> float:
        """Probability that ``folded`` (a skeleton) is an injection, in [0, 1].

        A text longer than :data:`WINDOW_TOKENS` tokens is scored per window (half
        overlapping) and the highest window counts, so an injection in a long
        document is not diluted by the benign text around it.
        """
        return self.score_tokens(folded.split())

    def score_tokens(self, tokens: list[str]) -> float:
        """:meth:`score` of a skeleton already split on spaces (``folded.split()``)."""
        self._learn(tokens)
        if len(tokens) <= WINDOW_TOKENS:
            return _sigmoid(self._window_logit(tokens))
        step = WINDOW_TOKENS // 2
        starts = list(range(0, len(tokens) - WINDOW_TOKENS + 1, step))
        # The last window is shorter when the windows do not end on the last token.
        tail = len(tokens) % step
        if tail:
            starts.append(len(tokens) - tail - step)
        window = self._window_logit
        best = max(window(tokens[start : start + WINDOW_TOKENS]) for start in starts)
        return _sigmoid(best)


def _sigmoid(logit: float) -> float:
    if logit >= 0:
        return 1 / (1 + math.exp(-logit))
    exp = math.exp(logit)
    return exp / (1 + exp)
