"""MoLoRA, MALoRA and HydraLoRA adapters of malora_dist as a PEFT method (``peft_type: MALORA_DIST``).

Importing this module registers the method with PEFT (``register()``, idempotent), after which
PEFT loads the adapters this package writes into a plain Hugging Face model::

    import malora_dist.peft_method  # registers peft_type MALORA_DIST with PEFT
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), ADAPTER_DIR)

LoRA adapters need no registration: they are written as PEFT's own LoRA. ``import malora_dist``
does not import this module (nor PEFT).
"""

from .config import MaloraDistConfig
from .layer import MaloraDistLayer
from .model import MaloraDistModel
from .registration import register

register()

__all__ = ["MaloraDistConfig", "MaloraDistLayer", "MaloraDistModel", "register"]
