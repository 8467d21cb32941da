"""Train the statistical layer of the prompt-injection detector and write its weights.

Usage::

    .venv/bin/python scripts/train_prompt_injection.py \
        [--data ../shared/conformance/prompt-injection/deepset-train.csv] \
        [--out src/bastion/guard/_injection/model.json] [--c 32]

The CSV has columns ``text`` and ``label`` (1 = injection). Features come from
bastion's own pure-Python featuriser (``bastion.guard._injection._model.features``
over ``skeleton(text)``), the same code that scores at run time; scikit-learn's
``LogisticRegression`` is fitted on that sparse matrix (columns: the features
seen in training, by name, through ``DictVectorizer``). scikit-learn and scipy are
needed here only, never by bastion at run time.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import hashlib
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bastion.guard._injection._model import DEFAULT_MODEL_PATH, FeatureSpec, LinearModel, features
from bastion.guard._injection._normalise import skeleton

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "conformance" / "prompt-injection" / "deepset-train.csv"
DEFAULT_C = 32.0
MIN_WORDS = 8
# Weights under this are dropped: measured, the CV figures do not move, and the file halves.
PRUNE = 2e-3


def load_rows(path: Path) -> tuple[list[str], list[int]]:
    """Read ``text,label`` rows; exits with a clear message when the file is absent."""
    if not path.is_file():
        sys.exit(
            f"labelled data not found: {path}\n"
            "It is not shipped with bastion; pass --data PATH to a CSV with columns text,label "
            "(1 = injection), e.g. ../shared/conformance/prompt-injection/deepset-train.csv."
        )
    texts: list[str] = []
    labels: list[int] = []
    with path.open(encoding="utf-8", newline="") as file:
        for row in csv.DictReader(file):
            texts.append(row["text"])
            labels.append(int(row["label"]))
    return texts, labels


def benign_extra() -> list[str]:
    """Benign technical prose for training only.

    The paragraphs of Python's own reference topics (``pydoc_data.topics``,
    shipped with CPython).

    The labelled data's benign rows are short news questions; without long benign
    prose the model learns "long means injection". These paragraphs come from a
    source the benchmark never evaluates on (it measures false positives on
    bastion's docs and its own prompt corpus).
    """
    from pydoc_data.topics import topics  # noqa: PLC0415 -- only when training

    paragraphs = []
    for text in topics.values():
        for block in re.split(r"\n\s*\n", text):
            if len(block.split()) >= MIN_WORDS:
                paragraphs.append(" ".join(block.split()))
    return paragraphs


def matrix(texts: Sequence[str], spec: FeatureSpec, vocabulary: dict[str, int]) -> Any:
    """The CSR matrix of ``features(skeleton(text))``, one column per known feature.

    Features missing from ``vocabulary`` are dropped, as the run time drops features
    it has no weight for.
    """
    import numpy as np  # noqa: PLC0415 -- training-only dependency
    from scipy.sparse import csr_matrix  # noqa: PLC0415

    data: list[float] = []
    indices: list[int] = []
    indptr = [0]
    for text in texts:
        vector = features(skeleton(text), spec)
        columns = sorted(
            (vocabulary[key], value) for key, value in vector.items() if key in vocabulary
        )
        indices.extend(column for column, _ in columns)
        data.extend(value for _, value in columns)
        indptr.append(len(indices))
    # liblinear takes 32-bit indices only.
    return csr_matrix(
        (np.asarray(data), np.asarray(indices, dtype=np.int32), np.asarray(indptr, dtype=np.int32)),
        shape=(len(texts), len(vocabulary)),
    )


def fit(
    texts: Sequence[str],
    labels: Sequence[int],
    *,
    spec: FeatureSpec | None = None,
    c: float = DEFAULT_C,
    prune: float = PRUNE,
    extra_benign: Sequence[str] = (),
) -> tuple[LinearModel, Any]:
    """Fit the model; return it as bastion scores it, and scikit-learn's estimator.

    The estimator's ``vocabulary_`` (feature name to column) is what :func:`matrix`
    needs to build its input. ``extra_benign`` texts are added to the training rows
    with label 0.
    """
    from sklearn.linear_model import LogisticRegression  # noqa: PLC0415 -- training only

    spec = spec or FeatureSpec()
    texts = [*texts, *extra_benign]
    labels = [*labels, *([0] * len(extra_benign))]
    vocabulary: dict[str, int] = {}
    for text in texts:
        for key in features(skeleton(text), spec):
            vocabulary.setdefault(key, len(vocabulary))
    estimator = LogisticRegression(C=c, max_iter=5000, class_weight="balanced", solver="liblinear")
    estimator.fit(matrix(texts, spec, vocabulary), list(labels))
    estimator.vocabulary_ = vocabulary
    names = list(vocabulary)
    coef = estimator.coef_[0]
    weights = {names[i]: float(coef[i]) for i in coef.nonzero()[0] if abs(coef[i]) >= prune}
    model = LinearModel(spec, float(estimator.intercept_[0]), weights)
    return model, estimator


def main(argv: Sequence[str] | None = None) -> None:
    """Parse arguments, train on the whole file, write the JSON weights."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="labelled CSV (text,label)")
    parser.add_argument("--out", type=Path, default=DEFAULT_MODEL_PATH, help="weights file")
    parser.add_argument("--c", type=float, default=DEFAULT_C, help="inverse regularisation")
    parser.add_argument(
        "--no-extra-benign",
        action="store_true",
        help="train on the CSV alone (without Python's reference prose as benign rows)",
    )
    args = parser.parse_args(argv)
    texts, labels = load_rows(args.data)
    extra = [] if args.no_extra_benign else benign_extra()
    model, _ = fit(texts, labels, c=args.c, extra_benign=extra)
    model.meta = {
        "trained_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"),
        "rows": len(texts),
        "positives": sum(labels),
        "extra_benign_rows": len(extra),
        "extra_benign_source": "pydoc_data.topics (CPython reference topics)" if extra else None,
        "data_sha256": hashlib.sha256(args.data.read_bytes()).hexdigest(),
        "data_name": args.data.name,
        "c": args.c,
        "estimator": "sklearn.linear_model.LogisticRegression(liblinear, balanced)",
    }
    document = model.to_mapping()
    args.out.write_text(json.dumps(document, separators=(",", ":")) + "\n", encoding="utf-8")
    size = args.out.stat().st_size
    print(f"wrote {args.out} ({len(document['weights'])} weights, {size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
