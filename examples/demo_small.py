"""fishckpt end to end: FISH mask, masked training, cheap checkpoints, verified bit-exact restore.

Real data (scikit-learn's handwritten digits), a small MLP, on CPU in well under a minute:

1. pre-train on digits 0-4;
2. score every parameter by empirical Fisher information on digits 5-9 and keep the top 2%
   (the new classification head is always trainable);
3. train only those entries with SparseAdamW, saving a checkpoint (model + optimizer) each epoch;
4. restore the best epoch into a fresh model and prove it is bit-identical;
5. inspect the store with the `fishckpt` command line.

Run with `make demo-small`; it writes to ./out/demo-small. (`make demo` is the MiniLM demo, examples/demo.py.)
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn

import fishckpt

OUT = Path("out/demo-small")
KEEP_RATIO = 0.02


def digits(classes: range, *, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    data = load_digits()
    inputs = torch.tensor(data.data, dtype=torch.float32) / 16.0
    labels = torch.tensor(data.target)
    keep = (labels >= classes.start) & (labels < classes.stop)
    inputs, labels = inputs[keep], labels[keep] - classes.start
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    inputs, labels = inputs[order], labels[order]
    split = int(0.7 * len(labels))
    return inputs[:split], labels[:split], inputs[split:], labels[split:]


def accuracy(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return (model(inputs).argmax(dim=1) == labels).float().mean().item()


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor, labels: torch.Tensor) -> None:
    model.train()
    for batch in torch.randperm(len(labels)).split(32):
        loss = nn.functional.cross_entropy(model(inputs[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def make_model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 5))


def main() -> None:
    torch.manual_seed(0)
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)

    # 1. Pre-train on digits 0-4.
    model = make_model()
    pre_train = digits(range(0, 5), seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(15):
        train_epoch(model, optimizer, pre_train[0], pre_train[1])
    print(f"pre-trained on digits 0-4: accuracy {accuracy(model, pre_train[2], pre_train[3]):.1%}")

    # 2. New task: digits 5-9, with a fresh head. Score parameters by empirical Fisher information.
    model[4] = nn.Linear(256, 5)
    train_x, train_y, test_x, test_y = digits(range(5, 10), seed=1)
    print(f"before transfer, on digits 5-9: accuracy {accuracy(model, test_x, test_y):.1%}")
    batches = list(zip(train_x.split(64), train_y.split(64), strict=True))
    scores = fishckpt.fisher_scores(model, batches, num_samples=512, progress=False)
    mask = fishckpt.fish_mask(scores, keep_ratio=KEEP_RATIO, always_trainable=["4.*"])
    print(f"FISH mask: {mask.k:,} of {mask.numel:,} parameters trainable ({mask.density:.2%}, head included)")

    # 3. A store holds the dense starting point once; each epoch stores only the masked values.
    store = fishckpt.CheckpointStore.create(OUT / "store", model, mask)
    optimizer = fishckpt.SparseAdamW(model, mask, lr=3e-3, weight_decay=0.01)
    best_step, best_accuracy = 0, 0.0
    epochs = 10
    for epoch in range(1, epochs + 1):
        train_epoch(model, optimizer, train_x, train_y)
        score = accuracy(model, test_x, test_y)
        # The last checkpoint also keeps the optimizer (k values per moment), to resume from.
        resumable = {"optimizer": optimizer, "rng": True} if epoch == epochs else {}
        info = store.save(model, epoch, metadata={"accuracy": score}, **resumable)
        extra = f" + {info.training_state_bytes:,} bytes of optimizer state" if resumable else ""
        model_bytes = info.bytes_written - info.training_state_bytes
        print(
            f"epoch {epoch:2d}: accuracy {score:.1%}; checkpoint {model_bytes:,} bytes{extra} "
            f"(dense: {info.dense_bytes:,}), {info.seconds * 1e3:.1f} ms"
        )
        if score > best_accuracy:
            best_step, best_accuracy = epoch, score

    # 4. Restore the best epoch into a fresh model: verified, and bit-identical.
    final = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    fresh = make_model()
    store.load_into(fresh, best_step)
    print(f"restored epoch {best_step} into a fresh model: accuracy {accuracy(fresh, test_x, test_y):.1%}")
    store.load_into(fresh, epochs)  # switching steps rewrites only the masked entries
    identical = all(  # compare bit patterns, not values: every tensor here is float32
        torch.equal(a.view(torch.int32), b.view(torch.int32))
        for a, b in zip(fresh.state_dict().values(), final.values(), strict=True)
    )
    print(f"epoch {epochs} restored bit-identical to the trained model: {identical}")
    if not identical:
        sys.exit("restore was not bit-exact")

    # 5. The command line sees the same store.
    for command in (["ls"], ["report"], ["verify"]):
        print(f"\n$ fishckpt {command[0]} {OUT / 'store'}")
        subprocess.run([sys.executable, "-m", "fishckpt", *command, str(OUT / "store")], check=True)


if __name__ == "__main__":
    main()
