"""What every evaluator shares: the registry, the settings base class (its fields = `conf/eval/<name>.yaml`) and
the result an evaluator returns.

An evaluator scores one loaded model (`peft_lab.eval.load.LoadedModel`) on its tasks and returns per-task metrics,
their average over tasks and one headline number, the *score* (`EvalResult.score`, the average of the evaluator's
`metric`). The score is what a sweep summary ranks and what an Optuna search optimises; `higher_is_better` says
which way. Before any model is loaded (or merged), `check_model` looks at the model's `config.json` only, so a model
type the evaluator does not support, or a head too small for a task's labels, is refused in a second.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar

from peft_lab.errors import UserError
from peft_lab.params import Checked, build, param
from peft_lab.registry import Registry

__all__ = ["EVALUATORS", "Evaluator", "EvalResult", "ModelInfo", "build_evaluator", "evaluator_node"]

EVALUATORS: Registry[type[Evaluator]] = Registry("evaluator", package="peft_lab.eval.evaluators")


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What `config.json` says about a model, read before its weights are loaded.

    Attributes:
        path: the dir the config came from (the model dir, or the base of an adapter dir).
        architectures: the class names transformers saved (`BertForSequenceClassification`, `LlamaForCausalLM`).
        model_type: `bert`, `llama`, ...
        num_labels: the size of a classification head (None for other architectures).
        id2label: the head's class names by index, as saved.
        max_positions: the longest input the model takes (`max_position_embeddings`), if it says.
    """

    path: str
    architectures: tuple[str, ...]
    model_type: str
    num_labels: int | None = None
    id2label: Mapping[int, str] = dataclasses.field(default_factory=dict)
    max_positions: int | None = None

    @property
    def is_classifier(self) -> bool:
        return any(a.endswith("ForSequenceClassification") for a in self.architectures)

    @property
    def is_causal_lm(self) -> bool:
        return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in self.architectures)

    def describe(self) -> str:
        return f"{', '.join(self.architectures) or 'no architecture'} (model_type {self.model_type!r})"


@dataclasses.dataclass
class EvalResult:
    """What an evaluator found.

    Attributes:
        tasks: task name -> its metrics (e.g. {"accuracy": 0.9, "loss": 0.3, "examples": 426}).
        average: each metric averaged over the tasks (unweighted: every task counts the same).
        metric: the headline metric; `score` is `average[metric]`.
        higher_is_better: the direction of `metric`.
    """

    tasks: dict[str, dict[str, float]]
    average: dict[str, float]
    metric: str
    higher_is_better: bool = True

    @property
    def score(self) -> float:
        return float(self.average[self.metric])

    @staticmethod
    def averaged(tasks: dict[str, dict[str, float]], metric: str, higher_is_better: bool = True) -> EvalResult:
        """A result whose `average` is the unweighted mean over tasks of every metric (counts are summed)."""
        keys = [k for k in next(iter(tasks.values())) if all(k in t for t in tasks.values())]
        average = {
            k: (sum(t[k] for t in tasks.values()) if k in COUNTS else sum(t[k] for t in tasks.values()) / len(tasks))
            for k in keys
        }
        return EvalResult(tasks, average, metric, higher_is_better)

    def flat(self, prefix: str = "eval/") -> dict[str, float]:
        """Scalars for a logger: `eval/score`, `eval/<metric>` (averages) and `eval/<task>/<metric>`."""
        out = {f"{prefix}score": self.score}
        out.update({f"{prefix}{k}": v for k, v in self.average.items()})
        for task, metrics in self.tasks.items():
            out.update({f"{prefix}{task}/{k}": v for k, v in metrics.items()})
        return {k: float(v) for k, v in out.items() if isinstance(v, (int, float)) and math.isfinite(v)}


COUNTS = ("examples", "tokens")  # summed, not averaged, over tasks


@dataclasses.dataclass(frozen=True)
class Evaluator(Checked):
    """An evaluator's settings; subclasses add their own fields and implement `run`.

    Attributes:
        batch_size: examples (or windows) per forward pass.
        device: `auto` (CUDA when available, else CPU), `cpu`, `cuda` or `cuda:N`.
    """

    name: ClassVar[str]
    kind: ClassVar[str]  # the auto class its models load as: sequence_classification | encoder | causal_lm

    batch_size: int = param(32, within="[1, inf)")
    device: str = "auto"

    def headline(self) -> tuple[str, bool]:
        """(the metric whose average is the score, higher is better)."""
        raise NotImplementedError

    def model_kind(self) -> str:
        """How the model is loaded: `sequence_classification`, `encoder` (the bare transformer) or `causal_lm`."""
        return self.kind

    def prepare(self) -> None:
        """Read and check the evaluator's data (files, datasets) before any model is loaded; none by default."""
        return None

    def check_model(self, info: ModelInfo, where: str) -> None:
        """UserError if the model (known from its config only) cannot be scored by this evaluator."""
        return None

    def run(self, model) -> EvalResult:
        """Score a `peft_lab.eval.load.LoadedModel`."""
        raise NotImplementedError

    def torch_device(self):
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            return torch.device(self.device)
        except RuntimeError:
            raise UserError(f"eval.device={self.device!r} is not a device (auto, cpu, cuda or cuda:N).") from None

    def to_dict(self) -> dict[str, Any]:
        """{"name": ..., **fields}: the evaluator as a config node (what eval.json and recipes record)."""
        return {"name": self.name, **_plain(dataclasses.asdict(self))}


def _container(value: Any) -> Any:
    """OmegaConf nodes (what Hydra hands over) as plain dicts and lists."""
    if type(value).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(value, resolve=True)
    return value


def _plain(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def evaluator_node(node: Any, where: str) -> tuple[str, dict[str, Any]]:
    """(registry name, parameters) of an evaluator config node `{name: NAME, ...fields}` (a Hydra `eval` group
    node or a recipe's `eval:` block; a bare string is a name with default settings)."""
    node = _container(node)
    if isinstance(node, str):
        node = {"name": node}
    if not isinstance(node, Mapping):
        raise UserError(
            f"{where}: an evaluator is a mapping {{name: classification | perplexity | lm_eval, ...its settings}}, "
            f"got {node!r}."
        )
    params = {k: v for k, v in node.items() if not (str(k).startswith("_") and str(k).endswith("_"))}
    name = params.pop("name", None)
    if not name:
        raise UserError(
            f"{where}: the evaluator config names no evaluator; add `name:` (one of: {', '.join(EVALUATORS.names())})."
        )
    return str(name), params


def build_evaluator(node: Any, where: str = "eval") -> Evaluator:
    """The evaluator of a config node (see `evaluator_node`), its fields checked against its schema."""
    if isinstance(node, Evaluator):
        return node
    name, params = evaluator_node(node, where)
    if name not in EVALUATORS:
        raise UserError(
            f"{where}: unknown evaluator {name!r}. Available: {', '.join(EVALUATORS.names())} "
            "(conf/eval/<name>.yaml; choose one with eval=NAME)."
        )
    return build(EVALUATORS.get(name), params, where=f"{where}={name}" if where == "eval" else where, prefix="eval.")
