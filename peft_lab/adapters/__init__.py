"""Parameter-efficient adapters behind one protocol (`base.Adapter`); one module per adapter, found by the
registry: lora, pissa, kronecker (through PEFT), loldu, sparse (ours)."""

from peft_lab.adapters.base import (
    ADAPTER_FILE,
    ADAPTERS,
    Adapter,
    AdapterConfig,
    build_adapter,
    load_adapter,
    read_adapter_config,
)

__all__ = [
    "ADAPTERS",
    "Adapter",
    "AdapterConfig",
    "build_adapter",
    "load_adapter",
    "read_adapter_config",
    "ADAPTER_FILE",
]
