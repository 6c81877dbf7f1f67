"""A tiny randomly initialised BERT, synthetic token data and FishTrainer set-ups, shared by tests/test_hf.py.

Offline: the config is built in code, nothing is fetched. Run as a script, it trains a run that
crashes (``os._exit``) right after a given step, for the fresh-process resume test::

    python tests/_hf_cases.py OUT_DIR CRASH_STEP
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification, TrainerCallback, TrainingArguments

from fishckpt.hf import FishTrainer

VOCAB = 120
LABELS = 3
# 2 epochs of 12 steps (48 examples, batch 4): saves at 4, 8, ..., 24.
EXAMPLES = 48
BATCH = 4


def tiny_config(**overrides: Any) -> BertConfig:
    """A 2-layer BERT of hidden size 16: ~9,600 parameters, a few ms a step on a CPU."""
    settings: dict[str, Any] = {
        "vocab_size": VOCAB,
        "hidden_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 32,
        "max_position_embeddings": 32,
        "num_labels": LABELS,
    }
    settings.update(overrides)
    return BertConfig(**settings)


def classifier(seed: int = 0, **overrides: Any) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_config(**overrides))


def masked_lm(seed: int = 0) -> BertForMaskedLM:
    """A model with tied weights: the decoder shares the word embeddings (and its bias the head's bias)."""
    torch.manual_seed(seed)
    return BertForMaskedLM(tiny_config())


class Sequences(torch.utils.data.Dataset[dict[str, Any]]):
    """Random token sequences of 3 to 11 tokens; the label is the first token's residue mod 3, so it can be learnt."""

    def __init__(self, count: int = EXAMPLES, *, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(count):
            length = int(torch.randint(3, 12, (1,), generator=generator))
            ids = torch.randint(5, VOCAB, (length,), generator=generator).tolist()
            self.items.append({"input_ids": ids, "labels": ids[0] % LABELS})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


def collate(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Pads to the longest example (id 0) with an attention mask; draws no random numbers."""
    width = max(len(example["input_ids"]) for example in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.int64)
    attention = torch.zeros_like(ids)
    for row, example in enumerate(examples):
        ids[row, : len(example["input_ids"])] = torch.tensor(example["input_ids"])
        attention[row, : len(example["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": attention, "labels": torch.tensor([e["labels"] for e in examples])}


def collate_lm(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """For the masked LM: every token is its own target (no random masking, so resumes stay exact)."""
    batch = collate(examples)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch


def arguments(out: Path | str, **overrides: Any) -> TrainingArguments:
    settings: dict[str, Any] = {
        "per_device_train_batch_size": BATCH,
        "num_train_epochs": 2,
        "learning_rate": 1e-2,
        "warmup_steps": 3,
        "save_steps": 4,
        "logging_steps": 1,
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 1,
        "dataloader_num_workers": 0,
    }
    settings.update(overrides)
    return TrainingArguments(str(out), **settings)


class StopAt(TrainerCallback):  # type: ignore[misc]
    """Ends training after ``step`` (its save, if due, still happens): a clean stop."""

    def __init__(self, step: int) -> None:
        self.at = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if state.global_step == self.at:
            control.should_training_stop = True
        return control


class CrashAt(TrainerCallback):  # type: ignore[misc]
    """Kills the process after ``step``, once the saves before it are on disk: a crash, with no clean-up run."""

    def __init__(self, step: int) -> None:
        self.at = step
        self.trainer: FishTrainer | None = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if state.global_step == self.at:
            assert self.trainer is not None and self.trainer.checkpointer is not None
            self.trainer.checkpointer.wait()
            sys.stdout.flush()
            os._exit(17)
        return control


def trainer(
    out: Path | str,
    *,
    model: torch.nn.Module | None = None,
    callbacks: list[Any] | None = None,
    keep_ratio: float = 0.05,
    dataset: torch.utils.data.Dataset[Any] | None = None,
    data_collator: Any = collate,
    fish: dict[str, Any] | None = None,
    **overrides: Any,
) -> FishTrainer:
    """A FishTrainer on the tiny classifier and the synthetic sequences, with the given TrainingArguments changes."""
    return FishTrainer(
        model=classifier() if model is None else model,
        args=arguments(out, **overrides),
        train_dataset=Sequences() if dataset is None else dataset,
        data_collator=data_collator,
        callbacks=callbacks,
        keep_ratio=keep_ratio,
        **(fish or {}),
    )


def main() -> None:
    out, crash = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)  # as tests/test_hf.py runs: the same reductions, so the same bits
    crasher = CrashAt(crash)
    run = trainer(out, callbacks=[crasher])
    crasher.trainer = run
    run.train()
    raise SystemExit("the run finished without reaching the crash step")


if __name__ == "__main__":
    main()
