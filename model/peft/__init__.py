"""Parameter-efficient adapters for `model.Llama`: PARA, (IA)³ and LoRA behind one interface.

from model.peft import PARAConfig, IA3Config, LoRAConfig, create_adapter
adapter = create_adapter(model, PARAConfig(r=12))
logits = model(tokens, adapter=adapter, prompt_lens=prompt_lens)
from weights import save_adapter, load_adapter  # files are weights/' job
save_adapter(adapter, "my-adapter"); adapter = load_adapter("my-adapter", model)
"""

from model.peft.adapters import create_adapter, model_fingerprint
from model.peft.base import Adapter, AdapterError
from model.peft.ia3 import IA3Adapter, IA3Config
from model.peft.lora import LoRAAdapter, LoRAConfig
from model.peft.para import PARAAdapter, PARAConfig

__all__ = [
    "Adapter",
    "AdapterError",
    "IA3Adapter",
    "IA3Config",
    "LoRAAdapter",
    "LoRAConfig",
    "PARAAdapter",
    "PARAConfig",
    "create_adapter",
    "model_fingerprint",
]
