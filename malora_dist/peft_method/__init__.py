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

try:
    import peft  # noqa: F401
except ImportError as err:  # PEFT is an extra: say which
    raise ImportError("malora_dist.peft_method needs PEFT: pip install 'malora_dist[peft]'") from err

from malora_dist.peft_method.config import MaloraDistConfig  # noqa: E402
from malora_dist.peft_method.layer import MaloraDistLayer  # noqa: E402
from malora_dist.peft_method.model import MaloraDistModel  # noqa: E402
from malora_dist.peft_method.registration import register  # noqa: E402

register()

__all__ = ["MaloraDistConfig", "MaloraDistLayer", "MaloraDistModel", "register"]
