"""Model builders: registry key = `conf/model/<name>.yaml`'s `name` (minilm, hf, tiny_bert, tiny_llama, tiny_unet,
tiny_unet_cond).

    >>> from peft_lab.train.models import build_model, DataInfo
    >>> built = build_model("minilm", DataInfo(label_names=("a", "b")))   # built.model, built.tokenizer
"""

from peft_lab.train.models.base import MODELS, BuiltModel, DataInfo, ModelConfig, build_model

__all__ = ["MODELS", "BuiltModel", "DataInfo", "ModelConfig", "build_model"]
