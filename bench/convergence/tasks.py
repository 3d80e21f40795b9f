"""The three training tasks: data, model, minibatch stream and final evaluation.

* ``digits-logreg``: multinomial logistic regression 64→10 on scikit-learn's digits.
* ``digits-mlp``: an MLP 64-128-128-10 (ReLU) on the same data.
* ``char-lm``: a character-level language model on ``bench/data/genesis-kjv.txt``.

Digits: the 1,797 8×8 images are split 80/20, stratified, with a fixed split seed (the same
split for every run); features are standardised with the training split's mean and standard
deviation. Training takes minibatches of 64 from a fresh permutation every epoch (the last
partial batch is dropped so every step sees 64 samples); 40 epochs = 880 steps.

Language model: the text is split by position, the first 90% for training and the last 10%
held out. The model is a fixed-window neural LM (Bengio et al., 2003): the embeddings (16
wide) of the previous 16 characters are concatenated and fed to a 256-128-V MLP that
predicts the next character. A recurrent or attention model with a 64-character context
costs 8-35 ms per step on one CPU thread here (12-50 s per run), too slow for a sweep of
thousands of runs. This model costs about 2 ms per step. Each of the 1,500 steps draws 128
windows at uniformly random positions of the training text (about 1.1 epochs).

Every random choice (initialisation and data order) comes from the run's seed, so one seed
gives the same initial weights and the same batches to every optimizer and learning rate.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

TASKS = ("digits-logreg", "digits-mlp", "char-lm")

TEXT_PATH = Path(__file__).resolve().parents[1] / "data" / "genesis-kjv.txt"
SPLIT_SEED = 0
"""Seed of the digits train/held-out split; fixed so every run sees the same split."""

Metric = Literal["accuracy", "perplexity"]


@dataclass(frozen=True)
class TaskSize:
    """How long one run trains and how much it evaluates."""

    steps: int
    batch_size: int
    train_eval_windows: int = 20_000
    """LM only: training windows (evenly spaced) over which the final train loss is taken."""


@dataclass(frozen=True)
class Evaluation:
    """Metrics of the final model.

    Attributes:
        train_loss: mean cross-entropy over the whole training split (digits) or over
            ``train_eval_windows`` evenly spaced training windows (LM), in nats.
        heldout_loss: mean cross-entropy over the held-out split, in nats.
        heldout_accuracy: digits only: percentage of held-out images classified correctly; an
            image whose logits are not all finite counts as wrong.
        heldout_perplexity: LM only: ``exp(heldout_loss)``, per character.
    """

    train_loss: float
    heldout_loss: float
    heldout_accuracy: float | None
    heldout_perplexity: float | None


class Task:
    """A task's data and model; subclasses define the specifics."""

    name: str
    metric: Metric
    description: str

    def __init__(self, size: TaskSize) -> None:
        self.size = size

    def build_model(self) -> nn.Module:
        """A freshly initialised model, drawn from torch's global generator."""
        raise NotImplementedError

    def batches(self, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
        """The ``size.steps`` minibatches of a run, in an order fixed by ``seed``."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module) -> Evaluation:
        """Metrics of the trained model (see :class:`Evaluation`)."""
        raise NotImplementedError

    @staticmethod
    def loss(logits: Tensor, targets: Tensor) -> Tensor:
        """The training objective: mean cross-entropy."""
        return F.cross_entropy(logits, targets)


@dataclass(frozen=True)
class DigitsData:
    x_train: Tensor
    y_train: Tensor
    x_heldout: Tensor
    y_heldout: Tensor


@functools.lru_cache(maxsize=1)
def digits_data() -> DigitsData:
    """The standardised, stratified 80/20 split of scikit-learn's digits (cached per process)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    x, y = load_digits(return_X_y=True)
    x_train, x_heldout, y_train, y_heldout = train_test_split(x, y, test_size=0.2, stratify=y, random_state=SPLIT_SEED)
    # Statistics from the training split only, so nothing leaks from the held-out images.
    scaler = StandardScaler().fit(x_train)

    def features(a: np.ndarray) -> Tensor:
        return torch.tensor(scaler.transform(a), dtype=torch.float32)

    def labels(a: np.ndarray) -> Tensor:
        return torch.tensor(a, dtype=torch.int64)

    return DigitsData(features(x_train), labels(y_train), features(x_heldout), labels(y_heldout))


class DigitsTask(Task):
    """Digits classification with a linear model (``hidden=()``) or a ReLU MLP."""

    metric: Metric = "accuracy"

    def __init__(self, name: str, hidden: tuple[int, ...], size: TaskSize) -> None:
        super().__init__(size)
        self.name = name
        self.hidden = hidden
        widths = "-".join(str(w) for w in (64, *hidden, 10))
        kind = "MLP (ReLU)" if hidden else "multinomial logistic regression"
        self.description = (
            f"digits {kind} {widths}; batch {size.batch_size}, {size.steps} steps; "
            "held-out accuracy (%) on a stratified 20% split"
        )

    def build_model(self) -> nn.Module:
        layers: list[nn.Module] = []
        width = 64
        for hidden in self.hidden:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, 10))
        return nn.Sequential(*layers)

    def batches(self, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
        data = digits_data()
        generator = torch.Generator().manual_seed(seed)
        n, b = len(data.y_train), self.size.batch_size
        step = 0
        while True:
            order = torch.randperm(n, generator=generator)
            for start in range(0, n - b + 1, b):
                if step == self.size.steps:
                    return
                index = order[start : start + b]
                yield data.x_train[index], data.y_train[index]
                step += 1

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> Evaluation:
        data = digits_data()
        logits = model(data.x_heldout)
        finite = torch.isfinite(logits).all(dim=1)
        correct = (logits.argmax(dim=1) == data.y_heldout) & finite
        return Evaluation(
            train_loss=self.loss(model(data.x_train), data.y_train).item(),
            heldout_loss=self.loss(logits, data.y_heldout).item(),
            heldout_accuracy=100.0 * correct.double().mean().item(),
            heldout_perplexity=None,
        )


@dataclass(frozen=True)
class TextData:
    vocab: str
    train: Tensor
    heldout: Tensor


@functools.lru_cache(maxsize=1)
def text_data() -> TextData:
    """The text as character ids, split 90/10 by position (cached per process)."""
    text = TEXT_PATH.read_text(encoding="utf-8")
    vocab = "".join(sorted(set(text)))
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.int64)
    cut = int(0.9 * len(ids))
    return TextData(vocab, ids[:cut], ids[cut:])


class WindowLM(nn.Module):
    """Next-character model from the concatenated embeddings of a fixed window."""

    def __init__(self, vocab_size: int, context: int, embedding: int, hidden: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding)
        self.hidden = nn.Linear(context * embedding, hidden)
        self.out = nn.Linear(hidden, vocab_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.relu(self.hidden(self.embedding(x).flatten(1))))


class CharLMTask(Task):
    """Character-level language modelling; the held-out metric is perplexity."""

    name = "char-lm"
    metric: Metric = "perplexity"
    context = 16
    embedding = 16
    hidden = 128

    def __init__(self, size: TaskSize) -> None:
        super().__init__(size)
        self.description = (
            f"char LM on Genesis (KJV), window MLP: {self.context} chars × embedding "
            f"{self.embedding} → {self.hidden} ReLU → vocab; batch {size.batch_size}, "
            f"{size.steps} steps; held-out perplexity on the last 10% of the text"
        )

    def _windows(self, ids: Tensor) -> Tensor:
        """Every (context + 1)-character window, as a view: inputs then the target."""
        return ids.unfold(0, self.context + 1, 1)

    def build_model(self) -> nn.Module:
        return WindowLM(len(text_data().vocab), self.context, self.embedding, self.hidden)

    def batches(self, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
        windows = self._windows(text_data().train)
        generator = torch.Generator().manual_seed(seed)
        for _ in range(self.size.steps):
            batch = windows[torch.randint(len(windows), (self.size.batch_size,), generator=generator)]
            yield batch[:, :-1], batch[:, -1]

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> Evaluation:
        data = text_data()
        train = self._windows(data.train)
        # Evenly spaced windows: a deterministic sample, identical for every run.
        train = train[torch.linspace(0, len(train) - 1, self.size.train_eval_windows).long()]
        heldout = self._windows(data.heldout)
        heldout_loss = self.loss(model(heldout[:, :-1]), heldout[:, -1]).item()
        return Evaluation(
            train_loss=self.loss(model(train[:, :-1]), train[:, -1]).item(),
            heldout_loss=heldout_loss,
            heldout_accuracy=None,
            heldout_perplexity=_exp(heldout_loss),
        )


def _exp(x: float) -> float:
    """``exp`` that returns inf instead of raising on overflow and keeps nan."""
    return float(torch.tensor(x, dtype=torch.float64).exp())


SIZES: dict[str, TaskSize] = {
    "digits-logreg": TaskSize(steps=880, batch_size=64),
    "digits-mlp": TaskSize(steps=880, batch_size=64),
    "char-lm": TaskSize(steps=1500, batch_size=128),
}
TINY_SIZES: dict[str, TaskSize] = {
    "digits-logreg": TaskSize(steps=20, batch_size=64),
    "digits-mlp": TaskSize(steps=20, batch_size=64),
    "char-lm": TaskSize(steps=20, batch_size=32, train_eval_windows=2_000),
}
"""``--tiny`` (tests only): a few steps, enough to exercise every code path."""


@functools.cache
def get_task(name: str, tiny: bool = False) -> Task:
    """The task called ``name`` (one of :data:`TASKS`), at full or ``tiny`` size."""
    size = (TINY_SIZES if tiny else SIZES)[name]
    if name == "digits-logreg":
        return DigitsTask(name, (), size)
    if name == "digits-mlp":
        return DigitsTask(name, (128, 128), size)
    if name == "char-lm":
        return CharLMTask(size)
    raise ValueError(f"unknown task {name!r}; expected one of {TASKS}")
