"""Transfer experiment: FISH mask vs random mask vs BitFit vs full fine-tuning on sklearn digits.

An MLP is pre-trained on digits 0-4, then transferred to digits 5-9 with a new 5-way head
(always trainable) from a few labelled examples per class. Every method trains with
SparseAdamW; only the mask differs. Keep ratios are fractions of the *body* (the pre-trained
layers); the head is added on top, so every sparse method trains the same head plus
k = round(ratio x body) body entries. The learning rate is picked per run from a small grid on a
held-out validation split, and test accuracy of that choice is reported.

    python experiments/transfer_digits.py                       # the tables in docs/experiments.md
    python experiments/transfer_digits.py --seeds 5 --shots 10  # more seeds, one data size
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from sklearn.datasets import load_digits
from torch import nn

from fishckpt import Mask, SparseAdamW, bitfit_mask, fish_mask, fisher_scores, random_mask

SOURCE_CLASSES = (0, 1, 2, 3, 4)
TARGET_CLASSES = (5, 6, 7, 8, 9)
HIDDEN = 256
LEARNING_RATES = (3e-3, 1e-2, 3e-2)


class MLP(nn.Module):
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU())
        self.head = nn.Linear(HIDDEN, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@dataclass
class Split:
    x: torch.Tensor
    y: torch.Tensor


@dataclass
class TargetData:
    train: Split
    valid: Split
    test: Split


def load(classes: tuple[int, ...]) -> Split:
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    keep = torch.isin(y, torch.tensor(classes))
    return Split(x[keep], y[keep] - min(classes))


def target_split(shots: int, valid_per_class: int, seed: int) -> TargetData:
    """``shots`` training and ``valid_per_class`` validation examples per class; the rest is the test set."""
    data = load(TARGET_CLASSES)
    generator = torch.Generator().manual_seed(seed)
    parts: dict[str, list[torch.Tensor]] = {"train": [], "valid": [], "test": []}
    for label in range(len(TARGET_CLASSES)):
        members = torch.nonzero(data.y == label).reshape(-1)
        members = members[torch.randperm(members.numel(), generator=generator)]
        parts["train"].append(members[:shots])
        parts["valid"].append(members[shots : shots + valid_per_class])
        parts["test"].append(members[shots + valid_per_class :])
    pick = {name: torch.cat(index) for name, index in parts.items()}
    return TargetData(*(Split(data.x[pick[name]], data.y[pick[name]]) for name in ("train", "valid", "test")))


def train(
    model: nn.Module, optimizer: torch.optim.Optimizer, data: Split, *, epochs: int, batch: int, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(data.y.numel(), generator=generator)
        for start in range(0, order.numel(), batch):
            index = order[start : start + batch]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(data.x[index]), data.y[index]).backward()
            optimizer.step()


@torch.no_grad()
def accuracy(model: nn.Module, data: Split) -> float:
    model.eval()
    return float((model(data.x).argmax(1) == data.y).float().mean())


def pretrain(seed: int) -> MLP:
    torch.manual_seed(seed)
    model = MLP(len(SOURCE_CLASSES))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train(model, optimizer, load(SOURCE_CLASSES), epochs=40, batch=64, seed=seed)
    return model


def transferred(pretrained: MLP, seed: int) -> MLP:
    torch.manual_seed(1000 + seed)  # the new head's initialisation
    model = MLP(len(TARGET_CLASSES))
    model.body.load_state_dict(pretrained.body.state_dict())
    return model


MaskMaker = Callable[[MLP, TargetData, int], Mask]


def body_k(model: MLP, ratio: float) -> int:
    """The head (always trainable) plus ``ratio`` of the body's entries."""
    body = sum(p.numel() for p in model.body.parameters())
    head = sum(p.numel() for p in model.head.parameters())
    return head + round(ratio * body)


def full_mask(model: MLP, data: TargetData, seed: int) -> Mask:
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    return Mask.from_indices({name: torch.arange(math.prod(shape)) for name, shape in shapes.items()}, shapes)


def head_mask(model: MLP, data: TargetData, seed: int) -> Mask:
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    return Mask.from_indices(
        {n: torch.arange(math.prod(s)) for n, s in shapes.items() if n.startswith("head.")}, shapes
    )


def bitfit(model: MLP, data: TargetData, seed: int) -> Mask:
    biases = bitfit_mask(model)
    head = head_mask(model, data, seed)
    return Mask.from_indices(
        {name: torch.cat([biases[name], head[name]]).unique() for name in biases.names},
        {name: biases.shape(name) for name in biases.names},
    )


def fish(ratio: float) -> MaskMaker:
    def make(model: MLP, data: TargetData, seed: int) -> Mask:
        scores = fisher_scores(model, [(data.train.x, data.train.y)], num_samples=data.train.y.numel(), progress=False)
        return fish_mask(scores, k=body_k(model, ratio), always_trainable=["head.*"])

    return make


def random(ratio: float) -> MaskMaker:
    def make(model: MLP, data: TargetData, seed: int) -> Mask:
        total = sum(p.numel() for p in model.parameters())
        # random_mask takes a ratio of all entries; this one gives the same k as FISH.
        return random_mask(model, body_k(model, ratio) / total, seed=seed, always_trainable=["head.*"])

    return make


def run_method(make_mask: MaskMaker, pretrained: MLP, data: TargetData, seed: int, epochs: int) -> tuple[float, int]:
    """Test accuracy at the learning rate with the best validation accuracy, and the mask's k."""
    best = (-1.0, 0.0)
    k = 0
    for lr in LEARNING_RATES:
        model = transferred(pretrained, seed)
        mask = make_mask(model, data, seed)
        k = mask.k
        optimizer = SparseAdamW(model, mask, lr=lr, weight_decay=0.01)
        train(model, optimizer, data.train, epochs=epochs, batch=25, seed=seed)
        valid = accuracy(model, data.valid)
        if valid > best[0]:  # strictly: ties keep the smaller rate, never look at the test set
            best = (valid, accuracy(model, data.test))
    return best[1], k


def concentration(shots: int, ratio: float, seed: int = 0) -> list[str]:
    """Why FISH concentrates here: per body layer, how close the Fisher is to rank 1, and what the masks touch.

    The empirical Fisher of a linear layer's weight is E[δ_i² x_j²] (δ: the gradient at output
    i, x: input j). If it were E[δ_i²]·E[x_j²], it would be exactly the outer product of its row
    and column sums divided by its total; the Pearson correlation with that product says how
    close it is. A global top-k of a near rank-1 matrix takes a dense block: few rows (output
    units) and few columns (inputs).
    """
    pretrained, data = pretrain(seed), target_split(shots, 20, seed)
    model = transferred(pretrained, seed)
    scores = fisher_scores(model, [(data.train.x, data.train.y)], num_samples=data.train.y.numel(), progress=False)
    masks = {"FISH": fish(ratio)(model, data, seed), "random": random(ratio)(model, data, seed)}
    lines = []
    for name in ("body.0.weight", "body.2.weight"):
        fisher = scores[name].double()
        product = torch.outer(fisher.sum(1), fisher.sum(0)) / fisher.sum()
        correlation = float(torch.corrcoef(torch.stack([fisher.reshape(-1), product.reshape(-1)]))[0, 1])
        touched = []
        # Pixels that are 0 in every training image: their weights get no gradient at all.
        dead = torch.nonzero(data.train.x.abs().sum(0) == 0).reshape(-1) if name == "body.0.weight" else None
        for method, mask in masks.items():
            rows, columns = mask[name] // fisher.shape[1], mask[name] % fisher.shape[1]
            wasted = "" if dead is None else f" ({int(torch.isin(columns, dead).sum())} on always-0 pixels)"
            touched.append(
                f"{method} {mask[name].numel()} entries in {rows.unique().numel()} of {fisher.shape[0]} rows "
                f"x {columns.unique().numel()} of {fisher.shape[1]} columns{wasted}"
            )
        lines.append(
            f"- {name}: correlation with the row-sum x column-sum product {correlation:.3f}; " + "; ".join(touched)
        )
    return lines


def methods_for(ratios: list[float]) -> list[tuple[str, str, MaskMaker]]:
    methods: list[tuple[str, str, MaskMaker]] = [
        ("full fine-tuning", "100%", full_mask),
        ("head only", "0%", head_mask),
    ]
    methods.append(("BitFit (biases + head)", "biases", bitfit))
    for ratio in ratios:
        methods.append(("FISH mask", f"{ratio:.1%}", fish(ratio)))
        methods.append(("random mask", f"{ratio:.1%}", random(ratio)))
    return methods


def table(shots: int, seeds: int, ratios: list[float], epochs: int) -> list[str]:
    methods = methods_for(ratios)
    results: dict[tuple[str, str], list[float]] = {(name, ratio): [] for name, ratio, _ in methods}
    ks: dict[tuple[str, str], int] = {}
    for seed in range(seeds):
        pretrained = pretrain(seed)
        data = target_split(shots, 20, seed)
        for name, ratio, make_mask in methods:
            test, k = run_method(make_mask, pretrained, data, seed, epochs)
            results[(name, ratio)].append(test)
            ks[(name, ratio)] = k
    lines = [
        f"**{shots} training examples per class** ({seeds} seeds; test set: the other target digits, "
        f"~{int(load(TARGET_CLASSES).y.numel()) - 5 * (shots + 20)} images)",
        "",
        "| method | body keep ratio | k (trainable entries) | test accuracy (mean ± std) |",
        "|---|---|---|---|",
    ]
    for name, ratio, _ in methods:
        values = results[(name, ratio)]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        lines.append(f"| {name} | {ratio} | {ks[(name, ratio)]:,} | {statistics.mean(values):.3f} ± {spread:.3f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--shots", type=int, nargs="+", default=[10, 50], help="training examples per target class")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.005, 0.02, 0.10])
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny matrices: threads cost more than they give, and leave a core free
    started = time.perf_counter()
    total = sum(p.numel() for p in MLP(len(TARGET_CLASSES)).parameters())
    source = statistics.mean(accuracy(pretrain(seed), load(SOURCE_CLASSES)) for seed in range(args.seeds))
    print(
        f"digits {SOURCE_CLASSES[0]}-{SOURCE_CLASSES[-1]} -> {TARGET_CLASSES[0]}-{TARGET_CLASSES[-1]}, MLP "
        f"64-{HIDDEN}-{HIDDEN}-5 ({total:,} parameters; source-task train accuracy {source:.3f})\n"
    )
    for shots in args.shots:
        print(f"Fisher concentration (seed 0, {shots} shots, masks at {min(args.ratios):.1%} of the body):")
        print("\n".join(concentration(shots, min(args.ratios))) + "\n")
    for shots in args.shots:
        print("\n".join(table(shots, args.seeds, args.ratios, args.epochs)) + "\n")
    print(f"(total {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
