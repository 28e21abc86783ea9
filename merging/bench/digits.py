"""The default setting of `peft-lab bench merge`: eight 8x8-image tasks from distinct input domains (scikit-learn's
digits and seeded synthetic images), one pretrained residual-MLP encoder shared by all, one head per task.

| task        | input                                             | label                  |
|-------------|---------------------------------------------------|------------------------|
| digits      | scikit-learn digits                               | digit (10)             |
| inv_noisy   | the digits inverted, with uniform noise           | digit (10)             |
| shapes      | a filled/hollow square, plus, diagonal, antidiag.  | shape (5)              |
| count       | 1-5 lit pixels at random places                   | count (5)              |
| stripes     | stripes of period 2, 3, 4 or 8, random phase/axis | period (4)             |
| parity180   | the digits rotated 180 degrees, dimmed            | parity (2)             |
| transposed  | the digits transposed, gamma-brightened           | digit >= 5 (2)         |
| texture     | a blob, a checkerboard, noise or a gradient       | kind (4)               |

The encoder is pretrained without labels (an autoencoder on the training inputs of all tasks: like a foundation
model, it has seen every domain but no task), each head is a logistic-regression probe on the pretrained
features (the counterpart of CLIP's zero-shot head), frozen; fine-tuning trains the whole encoder under the
frozen head. The same routines as the text suite (`merging/bench/text.py`), so `merging/bench/runner.py` runs either.
This is the fast smoke suite; the text suite follows the papers' zero-shot-head protocol.
Everything is seeded; one seed's suite builds in seconds on a CPU.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call

from merging.datadriven.adamerging import entropy, shuffled_batches

__all__ = ["DigitsConfig", "DigitsSuite", "DIGIT_TASKS", "make_tasks", "probe_head"]

Params = dict[str, torch.Tensor]
DIGIT_TASKS = ("digits", "inv_noisy", "shapes", "count", "stripes", "parity180", "transposed", "texture")
NUM_CLASSES = {
    "digits": 10,
    "inv_noisy": 10,
    "shapes": 5,
    "count": 5,
    "stripes": 4,
    "parity180": 2,
    "transposed": 2,
    "texture": 4,
}


@dataclasses.dataclass(frozen=True)
class DigitsConfig:
    tasks: tuple[str, ...] = DIGIT_TASKS
    width: int = 256
    blocks: int = 4
    features: int = 64  # the encoder's output width: a narrow representation the tasks must share
    pretrain_epochs: int = 5
    ft_epochs: int = 10
    ft_lr: float = 3e-4
    ft_batch: int = 32
    probe_c: float = 1.0
    n_train: int = 1077  # of the 1797 examples per task: 60 / 20 / 20 %
    n_val: int = 360
    n_test: int = 360
    seed: int = 0


@dataclasses.dataclass
class TaskData:
    name: str
    num_classes: int
    splits: dict[str, dict[str, torch.Tensor]]  # split -> {x (N, 8, 8), labels (N,)}


def make_tasks(seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (images (N, 8, 8) in [0, 1], labels (N,)), N = 1797 (the digits' count), seeded."""
    from sklearn.datasets import load_digits

    g = torch.Generator().manual_seed(1000 + seed)
    X, y = load_digits(return_X_y=True)
    perm = torch.randperm(len(X), generator=g)
    X = torch.tensor(X / 16.0, dtype=torch.float32).view(-1, 8, 8)[perm]
    y = torch.tensor(y)[perm]
    n = len(X)
    noise = lambda s: torch.rand(s, generator=g)  # noqa: E731
    out = {"digits": (X, y), "inv_noisy": ((1 - X + 0.3 * noise(X.shape)).clamp(0, 1), y)}
    lab = torch.randint(0, 5, (n,), generator=g)
    img = torch.zeros(n, 8, 8)
    for i in range(n):
        s = int(torch.randint(3, 6, (1,), generator=g))
        r0, c0 = (int(v) for v in torch.randint(0, 9 - s, (2,), generator=g))
        k, v, idx = int(lab[i]), img[i], torch.arange(s)
        if k == 0:
            v[r0 : r0 + s, c0 : c0 + s] = 1
        elif k == 1:
            v[r0 : r0 + s, c0 : c0 + s] = 1
            v[r0 + 1 : r0 + s - 1, c0 + 1 : c0 + s - 1] = 0
        elif k == 2:
            v[r0 + s // 2, c0 : c0 + s] = 1
            v[r0 : r0 + s, c0 + s // 2] = 1
        elif k == 3:
            v[r0 + idx, c0 + idx] = 1
        else:
            v[r0 + idx, c0 + s - 1 - idx] = 1
    out["shapes"] = ((img + 0.2 * noise(img.shape)).clamp(0, 1), lab)
    lab = torch.randint(0, 5, (n,), generator=g)
    img = torch.zeros(n, 64)
    for i in range(n):
        img[i, torch.randperm(64, generator=g)[: int(lab[i]) + 1]] = 1
    out["count"] = (img.view(n, 8, 8) * 0.8 + 0.1 * noise((n, 8, 8)), lab)
    lab = torch.randint(0, 4, (n,), generator=g)
    period = torch.tensor([2, 3, 4, 8])[lab]
    phase = torch.randint(0, 8, (n,), generator=g)
    axis = torch.randint(0, 2, (n,), generator=g)
    st = (((torch.arange(8)[None, :] + phase[:, None]) % period[:, None]) < (period[:, None] // 2)).float()
    img = torch.where(axis[:, None, None] == 0, st[:, None, :].expand(n, 8, 8), st[:, :, None].expand(n, 8, 8))
    out["stripes"] = ((img + 0.3 * noise(img.shape)).clamp(0, 1), lab)
    out["parity180"] = (torch.rot90(X, 2, (1, 2)) * 0.7, y % 2)
    out["transposed"] = (X.transpose(1, 2) ** 0.5, (y >= 5).long())
    lab = torch.randint(0, 4, (n,), generator=g)
    xx, yy = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    imgs = []
    for i in range(n):
        k, a = int(lab[i]), float(noise(1)) * 0.5 + 0.5
        if k == 0:
            cx, cy = noise(2) * 7
            im = torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 4)
        elif k == 1:
            im = (xx + yy + int(torch.randint(0, 2, (1,), generator=g))) % 2
        elif k == 2:
            im = noise((8, 8))
        else:
            d = torch.randn(2, generator=g)
            im = xx * d[0] + yy * d[1]
            im = (im - im.min()) / (im.max() - im.min() + 1e-6)
        imgs.append(im * a)
    out["texture"] = (torch.stack(imgs), lab)
    return out


class _Net(torch.nn.Module):
    """Residual MLP encoder (`body`) + a linear head (`classifier`, swapped per task)."""

    def __init__(self, cfg: DigitsConfig):
        super().__init__()
        d = cfg.width
        self.body = torch.nn.ModuleDict({
            "inp": torch.nn.Linear(64, d),
            "blocks": torch.nn.ModuleList(
                torch.nn.Sequential(
                    torch.nn.LayerNorm(d), torch.nn.Linear(d, d), torch.nn.GELU(), torch.nn.Linear(d, d)
                )
                for _ in range(cfg.blocks)
            ),
            "out": torch.nn.Linear(d, cfg.features),
            "norm": torch.nn.LayerNorm(cfg.features),
        })  # fmt: skip
        self.classifier = torch.nn.Linear(cfg.features, 2)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body["inp"](x.reshape(x.shape[0], -1))  # (B, d)
        for b in self.body["blocks"]:
            h = h + b(h)
        return self.body["norm"](self.body["out"](h))  # (B, features)

    def forward(self, x: torch.Tensor, features_only: bool = False) -> torch.Tensor:
        f = self.features(x)
        return f if features_only else self.classifier(f)


def probe_head(lr, num_classes: int) -> Params:
    """A fitted sklearn LogisticRegression as a Linear head over all `num_classes` classes. A binary probe's one
    row becomes two (same softmax probabilities); classes missing from the probe's training data get a very
    low bias (never predicted)."""
    coef, icpt = lr.coef_.astype(np.float32), lr.intercept_.astype(np.float32)
    if coef.shape[0] == 1:
        coef, icpt = np.concatenate([-coef / 2, coef / 2]), np.concatenate([-icpt / 2, icpt / 2])
    W = np.zeros((num_classes, coef.shape[1]), np.float32)
    b = np.full(num_classes, -1e4, np.float32)
    W[lr.classes_], b[lr.classes_] = coef, icpt
    return {"classifier.weight": torch.from_numpy(W), "classifier.bias": torch.from_numpy(b)}


class SuiteBase:
    """What both benchmark suites share: split batches, evaluation and the logistic-regression probe heads."""

    probe_max_iter = 3000
    pretrained_label = "pretrained"  # the θ_0 row of the table
    probe_heads: list[Params] | None = None  # heads of a "linear probe" reference row, when they differ from `heads`

    def eval_order(self, k: int, split: str) -> torch.Tensor:
        return torch.arange(len(self.tasks[k].splits[split]["labels"]))

    @torch.no_grad()
    def evaluate(self, params: Mapping[str, torch.Tensor], k: int, split: str, head: Params | None = None,
                 bs: int = 128) -> tuple[float, float]:  # fmt: skip
        """(accuracy, mean prediction entropy in nats) of task k on a split, with its head (or `head`)."""
        x, y, order = self.inputs(k, split), self.tasks[k].splits[split]["labels"], self.eval_order(k, split)
        correct, ent = 0, 0.0
        for i in range(0, len(order), bs):
            idx = order[i : i + bs]
            lg = self.logits(params, k, {kk: v[idx] for kk, v in x.items()}, head)
            correct += int((lg.argmax(-1) == y[idx]).sum())
            ent += float(entropy(lg)) * len(idx)
        return correct / len(y), ent / len(y)

    def accuracy(self, params: Mapping[str, torch.Tensor], k: int, split: str, head: Params | None = None) -> float:
        return self.evaluate(params, k, split, head)[0]

    def batches(self, k: int, split: str, batch_size: int, n: int | None = None) -> Iterator[dict]:
        s = self.tasks[k].splits[split]
        m = len(s["labels"]) if n is None else min(n, len(s["labels"]))
        for i in range(0, m, batch_size):
            yield {kk: v[i : min(i + batch_size, m)] for kk, v in s.items()}

    def _probe(self, k: int) -> Params:
        """A logistic-regression head on the pretrained features (train split), as a Linear's tensors."""
        from sklearn.linear_model import LogisticRegression

        f = self.features(self.theta0, k, "train").numpy()
        y = self.tasks[k].splits["train"]["labels"].numpy()
        lr = LogisticRegression(C=self.cfg.probe_c, max_iter=self.probe_max_iter).fit(f, y)
        return probe_head(lr, self.tasks[k].num_classes)


class DigitsSuite(SuiteBase):
    """Tasks, the pretrained encoder θ_0 (`names`: every encoder tensor), per-task frozen probe heads."""

    def __init__(self, cfg: DigitsConfig):
        self.cfg = cfg
        n_train, n_val, n_test = cfg.n_train, cfg.n_val, cfg.n_test
        if n_train < 1 or n_val < 1 or n_test < 1 or n_train + n_val + n_test > 1797:
            raise ValueError(
                "digits suite: n_train + n_val + n_test must fit in 1797 examples, each >= 1 "
                f"(got {n_train}/{n_val}/{n_test})"
            )
        torch.manual_seed(cfg.seed)
        raw = make_tasks(cfg.seed)
        cuts = {
            "train": (0, n_train),
            "val": (n_train, n_train + n_val),
            "test": (n_train + n_val, n_train + n_val + n_test),
        }
        self.tasks = [
            TaskData(
                t, NUM_CLASSES[t], {s: {"x": raw[t][0][a:b], "labels": raw[t][1][a:b]} for s, (a, b) in cuts.items()}
            )
            for t in cfg.tasks
        ]
        self.module = _Net(cfg).eval()
        self._pretrain()
        self.module.requires_grad_(False)
        self.names = [n for n, _ in self.module.named_parameters() if n.startswith("body.")]
        self.theta0: Params = {n: p.detach().clone() for n, p in self.module.named_parameters() if n in self.names}
        self.heads: list[Params] = [self._probe(k) for k in range(len(self.tasks))]

    def _pretrain(self) -> None:
        """Autoencoder on the training inputs of every task: no labels, every domain."""
        x = torch.cat([t.splits["train"]["x"] for t in self.tasks]).reshape(-1, 64)
        dec = torch.nn.Linear(self.cfg.features, 64)
        params = [*self.module.body.parameters(), *dec.parameters()]
        opt = torch.optim.Adam(params, lr=1e-3)
        g = torch.Generator().manual_seed(self.cfg.seed)
        for _ in range(self.cfg.pretrain_epochs):
            for idx in torch.randperm(len(x), generator=g).split(64):
                loss = F.mse_loss(dec(self.module.features(x[idx])), x[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

    # -- the interface merging/bench/runner.py uses (same as merging.bench.text.TextSuite) -----------------
    def logits(self, params: Mapping[str, torch.Tensor], k: int, inputs: Mapping[str, torch.Tensor],
               head: Params | None = None) -> torch.Tensor:  # fmt: skip
        head = self.heads[k] if head is None else head
        return functional_call(self.module, {**params, **head}, args=(), kwargs=dict(inputs))

    def inputs(self, k: int, split: str) -> dict[str, torch.Tensor]:
        return {"x": self.tasks[k].splits[split]["x"]}

    @torch.no_grad()
    def features(self, params: Mapping[str, torch.Tensor], k: int, split: str) -> torch.Tensor:
        return functional_call(
            self.module, dict(params), args=(), kwargs={"features_only": True, **self.inputs(k, split)}
        )

    def load(self, params: Mapping[str, torch.Tensor], k: int) -> torch.nn.Module:
        W = self.heads[k]["classifier.weight"]
        self.module.classifier = torch.nn.Linear(W.shape[1], W.shape[0]).requires_grad_(False)
        self.module.load_state_dict({**params, **self.heads[k]}, strict=False)
        return self.module

    def sampler(
        self, k: int, split: str, batch_size: int, gen: torch.Generator, per_step: int = 1
    ) -> Callable[[], dict]:
        return shuffled_batches(self.inputs(k, split), batch_size, per_step, gen)

    def finetune(self, k: int, seed: int) -> Params:
        """The whole encoder fine-tuned on task k under its frozen head (Adam, constant lr, epochs over train)."""
        cfg = self.cfg
        g = torch.Generator().manual_seed(seed * 1000 + k)
        params = {n: t.clone().requires_grad_(True) for n, t in self.theta0.items()}
        opt = torch.optim.Adam(list(params.values()), lr=cfg.ft_lr)
        s = self.tasks[k].splits["train"]
        for _ in range(cfg.ft_epochs):
            for idx in torch.randperm(len(s["labels"]), generator=g).split(cfg.ft_batch):
                loss = F.cross_entropy(self.logits(params, k, {"x": s["x"][idx]}), s["labels"][idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return {n: p.detach() for n, p in params.items()}
