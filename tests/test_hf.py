"""fishckpt.hf: FishTrainer (FISH training inside Hugging Face's Trainer, sparse checkpoints, exact resume) and export.

Offline, on a tiny randomly initialised BERT built from a config in code (tests/_hf_cases.py).
One slow test runs the real all-MiniLM-L6-v2 weights.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import _hf_cases as cases
import torch
from click.testing import CliRunner
from conftest import assert_bits_equal, bits
from transformers import AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification

from fishckpt import (
    CheckpointStore,
    HeadNotTrainableWarning,
    InvalidArgumentError,
    MaskMismatchError,
    StepExistsError,
    random_mask,
)
from fishckpt.hf import FishTrainer, export_hf
from fishckpt_cli.main import cli

ROOT = Path(__file__).resolve().parent.parent
CASES = Path(__file__).resolve().parent / "_hf_cases.py"
LABELS = cases.LABELS


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One torch thread, as in the crash subprocess: results then match bit for bit across processes,
    and a tiny model runs ~7x faster than with 2 threads on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _losses(run: FishTrainer) -> list[tuple[int, float]]:
    return [(entry["step"], entry["loss"]) for entry in run.state.log_history if "loss" in entry]


def _assert_tree_bits_equal(actual: Any, expected: Any, where: str = "state") -> None:
    """Nested dicts/lists of tensors and numbers: tensors by bit pattern, the rest by equality."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), where
        assert_bits_equal(actual, expected, key=where)
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and sorted(map(str, actual)) == sorted(map(str, expected)), where
        by_text = {str(key): value for key, value in actual.items()}
        for key, value in expected.items():
            _assert_tree_bits_equal(by_text[str(key)], value, f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)) and len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            _assert_tree_bits_equal(a, e, f"{where}[{i}]")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def _assert_same_run(resumed: FishTrainer, straight: FishTrainer) -> None:
    """Weights, optimizer, scheduler, the Trainer's own state and every logged loss, exactly."""
    expected, actual = _weights(straight.model), _weights(resumed.model)
    assert list(actual) == list(expected)
    for name in expected:
        assert_bits_equal(actual[name], expected[name], key=name)
    _assert_tree_bits_equal(resumed.optimizer.state_dict(), straight.optimizer.state_dict(), "optimizer")
    _assert_tree_bits_equal(resumed.lr_scheduler.state_dict(), straight.lr_scheduler.state_dict(), "scheduler")
    assert (resumed.state.global_step, resumed.state.epoch) == (straight.state.global_step, straight.state.epoch)
    assert _losses(resumed) == _losses(straight)  # every step logged: same batches, dropout and updates


# Resume -----------------------------------------------------------------------------------------


def test_a_run_killed_and_resumed_in_a_fresh_process_ends_bit_identical(tmp_path: Path) -> None:
    straight = cases.trainer(tmp_path / "straight")
    straight.train()
    base = CheckpointStore.open(tmp_path / "straight" / "fishckpt").load(4)

    # Killed after step 10, mid-epoch: steps 9 and 10 are lost, the latest save is step 8.
    out = tmp_path / "crashed"
    crashed = subprocess.run(
        [sys.executable, str(CASES), str(out), "10"], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert crashed.returncode == 17, crashed.stdout + crashed.stderr
    assert CheckpointStore.open(out / "fishckpt").steps == [4, 8]

    resumed = cases.trainer(out)
    assert resumed.latest_step() == 8
    resumed.train(resume_from_checkpoint=True)
    _assert_same_run(resumed, straight)
    assert resumed.store is not None and resumed.store.steps == [4, 8, 12, 16, 20, 24]
    # The steps saved after the resume are those of the uninterrupted run, bit for bit.
    reference = CheckpointStore.open(tmp_path / "straight" / "fishckpt")
    for step in (12, 24):
        again, first = resumed.store.load(step), reference.load(step)
        for name in first:
            assert_bits_equal(again[name], first[name], key=f"step {step} {name}")
    assert not torch.equal(bits(base["classifier.weight"]), bits(reference.load(24)["classifier.weight"]))


def test_resume_at_an_epoch_end_with_gradient_accumulation_and_epoch_saves(tmp_path: Path) -> None:
    settings = {"gradient_accumulation_steps": 2, "save_strategy": "epoch", "num_train_epochs": 3, "logging_steps": 2}
    straight = cases.trainer(tmp_path / "straight", **settings)
    straight.train()
    assert straight.store is not None and straight.store.steps == [6, 12, 18]  # 12 batches, 6 updates an epoch

    first = cases.trainer(tmp_path / "run", callbacks=[cases.StopAt(9)], **settings)
    first.train()  # stopping mid-epoch 2 ends the epoch, and the Trainer saves at an epoch's end
    assert first.store is not None and first.store.steps == [6, 9]
    resumed = cases.trainer(tmp_path / "run", **settings)
    resumed.train(resume_from_checkpoint=6)  # the end of epoch 1: the Trainer restores the RNG before the epoch
    _assert_same_run(resumed, straight)


def test_save_total_limit_keeps_the_newest_steps(tmp_path: Path) -> None:
    run = cases.trainer(tmp_path, save_total_limit=2)
    run.train()
    assert run.store is not None and run.store.steps == [20, 24]


# What lands on disk -------------------------------------------------------------------------------


def test_no_dense_checkpoint_is_written_and_each_save_is_small(tmp_path: Path) -> None:
    run = cases.trainer(tmp_path)
    run.train()
    assert sorted(os.listdir(tmp_path)) == ["fishckpt"]  # no checkpoint-N folders
    store = CheckpointStore.open(tmp_path / "fishckpt")
    report = store.report()
    assert [info.step for info in report.steps] == [4, 8, 12, 16, 20, 24]
    # O(k) per save: ~2.7 bytes per masked value, 8 for its two AdamW moments, and a fixed part (the
    # RNG states, the Trainer's state and the model config). A Trainer checkpoint holds the weights
    # and two dense moments: three times the dense weights.
    for info in report.steps:
        assert info.bytes < 12 * store.mask.k + 16_384, (info.step, info.bytes, store.mask.k)
        assert info.bytes < 3 * store.dense_bytes / 4, (info.step, info.bytes, store.dense_bytes)
    base_files = [path for path in (tmp_path / "fishckpt").iterdir() if "base" in path.name]
    assert len(base_files) == 1 and base_files[0].stat().st_size >= store.dense_bytes


def test_only_the_masked_entries_move_and_the_head_is_trained_whole(tmp_path: Path) -> None:
    run = cases.trainer(tmp_path, bf16=True)  # bf16 autocast on the CPU: weights and updates stay fp32
    start = _weights(run.model)
    run.train()
    assert run.mask is not None and run.store is not None
    total = sum(p.numel() for p in run.model.parameters())
    assert run.mask.k == round(0.05 * total)
    assert run.mask["classifier.weight"].numel() == run.model.classifier.weight.numel()
    assert run.mask["classifier.bias"].numel() == LABELS
    after = _weights(run.model)
    moved = 0
    for name, before in start.items():
        changed = (bits(after[name]) != bits(before)).reshape(-1)
        outside = torch.ones_like(changed)
        if name in run.mask:
            outside[run.mask[name]] = False
            moved += int(changed.sum())
        assert not bool((changed & outside).any()), f"{name} changed outside the mask"
    assert moved > run.mask.k // 2  # training did move the masked entries


def test_the_clip_measures_the_masked_gradient_only(tmp_path: Path) -> None:
    """The first logged grad_norm is the norm of the masked entries of the first batch's gradient."""
    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    run = cases.trainer(tmp_path, model=cases.classifier(**no_dropout), max_steps=1, max_grad_norm=1e-3)
    reference = cases.classifier(**no_dropout)
    run.train()
    assert run.mask is not None
    logged = next(entry["grad_norm"] for entry in run.state.log_history if "grad_norm" in entry)
    first = next(iter(run.get_train_dataloader()))
    reference.train()
    reference(**first).loss.backward()
    masked = torch.linalg.vector_norm(
        torch.cat([p.grad.reshape(-1)[run.mask[n]] for n, p in reference.named_parameters() if n in run.mask])
    )
    full = torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in reference.parameters()]))
    assert math.isclose(logged, float(masked), rel_tol=1e-5)
    assert not math.isclose(float(full), float(masked), rel_tol=1e-3)  # so the check tells the two norms apart


# Export -------------------------------------------------------------------------------------------


def test_export_loads_with_from_pretrained_bit_for_bit(tmp_path: Path) -> None:
    run = cases.trainer(tmp_path / "run", max_steps=8)
    run.train()
    assert run.store is not None
    step = run.store.load(4)
    files = export_hf(run.store, 4, tmp_path / "export")
    assert sorted(path.name for path in files) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "export" / "config.json").read_text())["architectures"] == [
        "BertForSequenceClassification"
    ]

    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "export")
    for name, tensor in loaded.state_dict().items():
        assert_bits_equal(tensor, step[name], key=name)
    encoder = AutoModel.from_pretrained(tmp_path / "export")  # the encoder alone: the head is dropped
    for name, tensor in encoder.state_dict().items():
        assert_bits_equal(tensor, step[f"bert.{name}"], key=name)


def test_export_of_tied_weights_reties_them(tmp_path: Path) -> None:
    run = cases.trainer(
        tmp_path / "run", model=cases.masked_lm(), data_collator=cases.collate_lm, max_steps=4, keep_ratio=0.15
    )
    run.train()
    assert run.store is not None
    step = run.store.load(4)
    export_hf(run.store, 4, tmp_path / "export")
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "export")
    assert loaded.cls.predictions.decoder.weight is loaded.bert.embeddings.word_embeddings.weight
    for name, tensor in loaded.state_dict().items():
        assert_bits_equal(tensor, step[name], key=name)


def test_the_cli_exports_and_takes_a_config_for_steps_saved_without_one(tmp_path: Path) -> None:
    run = cases.trainer(tmp_path / "run", max_steps=4)
    run.train()
    assert run.store is not None
    store = str(run.store.path)
    runner = CliRunner()
    done = runner.invoke(cli, ["export", store, "4", str(tmp_path / "a"), "--hf"])
    assert done.exit_code == 0, done.output
    assert "Exported step 4" in done.output and "from_pretrained" in done.output
    again = runner.invoke(cli, ["export", store, "4", str(tmp_path / "a"), "--hf"])
    assert again.exit_code == 1 and "already exists; pass --force" in again.output
    assert runner.invoke(cli, ["export", store, "4", str(tmp_path / "a"), "--hf", "--force"]).exit_code == 0
    without = runner.invoke(cli, ["export", store, "4", str(tmp_path / "b")])
    assert without.exit_code == 2 and "--hf" in without.output

    # A store made by hand (no Trainer) has no config with its steps: --config supplies it.
    model = cases.classifier()
    plain = CheckpointStore.create(tmp_path / "plain", model, random_mask(model, 0.1, seed=0, exclude=["classifier.*"]))
    plain.save(model, 1)
    missing = runner.invoke(cli, ["export", str(tmp_path / "plain"), "1", str(tmp_path / "c"), "--hf"])
    assert missing.exit_code == 1 and "--config" in missing.output
    assert not (tmp_path / "c" / "model.safetensors").exists()
    model.config.save_pretrained(tmp_path / "config")
    given = runner.invoke(
        cli, ["export", str(tmp_path / "plain"), "1", str(tmp_path / "c"), "--hf", "--config", str(tmp_path / "config")]
    )
    assert given.exit_code == 0, given.output
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "c")
    for name, tensor in loaded.state_dict().items():
        assert_bits_equal(tensor, model.state_dict()[name], key=name)


# Edge cases ------------------------------------------------------------------------------------------


def test_load_best_model_at_end_loads_the_best_step_and_keeps_it(tmp_path: Path) -> None:
    run = FishTrainer(
        model=cases.classifier(),
        args=cases.arguments(
            tmp_path,
            eval_strategy="steps",
            eval_steps=4,
            load_best_model_at_end=True,
            metric_for_best_model="loss",
            save_total_limit=1,
            learning_rate=0.3,  # large enough that the eval loss goes up again after its best
        ),
        train_dataset=cases.Sequences(),
        eval_dataset=cases.Sequences(16, seed=5),
        data_collator=cases.collate,
        keep_ratio=0.05,
    )
    run.train()
    assert run.store is not None
    best = run.state.best_global_step
    evals = {entry["step"]: entry["eval_loss"] for entry in run.state.log_history if "eval_loss" in entry}
    assert best == min(evals, key=lambda step: (evals[step], step))
    assert best != 24, "the test needs a best step before the last; raise the learning rate"
    assert run.store.steps == sorted({best, 24})  # the newest (limit 1) and the best
    kept = run.store.load(best)
    for name, tensor in run.model.state_dict().items():
        assert_bits_equal(tensor, kept[name], key=name)


def test_resuming_with_nothing_to_resume_says_so(tmp_path: Path) -> None:
    run = cases.trainer(tmp_path)
    assert run.latest_step() is None
    with pytest.raises(InvalidArgumentError, match=r"fishckpt holds no step to resume from .*latest_step\(\)"):
        run.train(resume_from_checkpoint=True)
    with pytest.raises(InvalidArgumentError, match=r"not from a checkpoint folder; pass True"):
        run.train(resume_from_checkpoint=str(tmp_path / "checkpoint-8"))


def test_a_new_run_refuses_a_store_with_steps_and_train_twice_refuses_too(tmp_path: Path) -> None:
    run = cases.trainer(tmp_path, max_steps=4)
    run.train()
    with pytest.raises(StepExistsError, match=r"already trained into .*resume_from_checkpoint=True"):
        run.train()
    with pytest.raises(StepExistsError, match=r"holds steps \[4\] of an earlier run"):
        cases.trainer(tmp_path, max_steps=4).train()


def test_a_given_mask_is_trained_and_must_match_on_resume(tmp_path: Path) -> None:
    model = cases.classifier()
    mask = random_mask(model, 0.05, seed=3, always_trainable=["classifier.*"])
    run = cases.trainer(tmp_path, model=model, fish={"mask": mask}, max_steps=4)
    run.train()
    assert run.store is not None and run.store.mask == mask
    other = random_mask(model, 0.05, seed=4, always_trainable=["classifier.*"])
    with pytest.raises(MaskMismatchError, match="not the mask of"):
        cases.trainer(tmp_path, model=cases.classifier(), fish={"mask": other}, max_steps=8).train(
            resume_from_checkpoint=True
        )


def test_a_head_left_out_is_warned_about(tmp_path: Path) -> None:
    with pytest.warns(HeadNotTrainableWarning, match="classifier"):
        cases.trainer(tmp_path, fish={"head": []}, max_steps=1).train()


def test_a_head_larger_than_the_budget_is_refused_before_the_fisher_pass(tmp_path: Path) -> None:
    # The masked LM's head, outside "bert": the output bias (one per token), the 16x16 transform, its
    # bias and its LayerNorm; more than 0.5% of the model.
    head = cases.VOCAB + 16 * 16 + 3 * 16
    run = cases.trainer(tmp_path, model=cases.masked_lm(), data_collator=cases.collate_lm, keep_ratio=0.005)
    with pytest.raises(InvalidArgumentError, match=rf"the head FishTrainer detected .* has {head} entries .*head=\["):
        run.train()
    assert not (tmp_path / "fishckpt").exists()


def test_options_the_trainer_cannot_honour_are_refused(tmp_path: Path) -> None:
    model = cases.classifier()
    with pytest.raises(InvalidArgumentError, match="optim='sgd'"):
        cases.trainer(tmp_path, optim="sgd")
    with pytest.raises(InvalidArgumentError, match="drop the optimizer"):
        FishTrainer(model=model, args=cases.arguments(tmp_path), optimizers=(torch.optim.SGD(model.parameters()), None))
    with pytest.raises(InvalidArgumentError, match="keep_ratio"):
        cases.trainer(tmp_path, keep_ratio=0.0)
    with pytest.raises(InvalidArgumentError, match="a list of name patterns"):
        cases.trainer(tmp_path, fish={"head": "classifier.*"})
    with pytest.raises(NotImplementedError, match="model_init"):
        FishTrainer(model_init=lambda: cases.classifier(), args=cases.arguments(tmp_path))


def test_a_run_saved_with_save_only_model_cannot_resume_exactly(tmp_path: Path) -> None:
    cases.trainer(tmp_path, save_only_model=True, max_steps=4).train()
    with pytest.raises(InvalidArgumentError, match="save_only_model"):
        cases.trainer(tmp_path, save_only_model=True, max_steps=8).train(resume_from_checkpoint=True)


def test_importing_fishckpt_hf_needs_no_transformers_until_fishtrainer() -> None:
    script = textwrap.dedent(
        """
        import sys
        import fishckpt, fishckpt.hf
        from fishckpt.hf import export_hf
        assert "transformers" not in sys.modules and "accelerate" not in sys.modules, "imported too early"
        sys.modules["transformers"] = None  # as if it were not installed
        try:
            from fishckpt.hf import FishTrainer
        except fishckpt.MissingDependencyError as error:
            assert isinstance(error, ImportError)
            print(error)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "pip install 'fishckpt[hf]'" in done.stdout


# The real model -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_minilm_trains_saves_resumes_and_exports_bit_for_bit(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "experiments"))
    from drugreviews import load_drug_reviews
    from minilm import minilm_classifier, minilm_tokenizer

    reviews = load_drug_reviews(validation=0)
    tokenizer = minilm_tokenizer()
    encoded = tokenizer(list(reviews.train.texts[:64]), truncation=True, max_length=32)
    dataset = [
        {"input_ids": ids, "labels": label}
        for ids, label in zip(encoded["input_ids"], reviews.train.labels, strict=False)
    ]
    settings = {"max_steps": 6, "save_steps": 2, "learning_rate": 2e-3, "per_device_train_batch_size": 8}

    def make(out: Path, callbacks: list[Any] | None = None) -> FishTrainer:
        return FishTrainer(
            model=minilm_classifier(num_labels=3, seed=0),
            args=cases.arguments(out, **settings),
            train_dataset=dataset,
            data_collator=cases.collate,
            callbacks=callbacks,
            keep_ratio=0.005,
            fisher_samples=32,
        )

    straight = make(tmp_path / "straight")
    straight.train()
    assert straight.mask is not None
    total = sum(p.numel() for p in straight.model.parameters())
    assert straight.mask.k == round(0.005 * total)
    assert straight.mask["classifier.weight"].numel() == 3 * 384
    first = make(tmp_path / "run", callbacks=[cases.StopAt(3)])
    first.train()
    resumed = make(tmp_path / "run")
    resumed.train(resume_from_checkpoint=True)
    _assert_same_run(resumed, straight)
    assert resumed.store is not None
    export_hf(resumed.store, 4, tmp_path / "export")
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "export")
    step = resumed.store.load(4)
    for name, tensor in loaded.state_dict().items():
        assert_bits_equal(tensor, step[name], key=name)
