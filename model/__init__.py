"""parallama model: `from model import Llama, ModelArgs`."""

from model.args import ModelArgs
from model.llama import Llama

__all__ = ["Llama", "ModelArgs"]
