"""Parameter-efficient adapters for `model.Llama`: `from model.peft import PARAConfig, create_adapter`."""

from model.peft.para import PARAAdapter, PARAConfig, create_adapter

__all__ = ["PARAAdapter", "PARAConfig", "create_adapter"]
