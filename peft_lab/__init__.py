"""peft-lab: parameter-efficient fine-tuning and model merging over one parameter-tree abstraction."""

__version__ = "0.1.0"

__all__ = ["__version__"]
