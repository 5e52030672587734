"""Register the mixture method with PEFT through ``peft.utils.register_peft_method``."""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType, register_peft_method

from malora_dist.adapters.file_format import PEFT_METHOD, PEFT_PREFIX
from malora_dist.peft_method.config import MaloraDistConfig
from malora_dist.peft_method.model import MaloraDistModel
from malora_dist.peft_method.peft_type import mixture_peft_type


def register() -> PeftType:
    """Make ``PeftModel.from_pretrained`` load the adapters of ``peft_type: MALORA_DIST``. Idempotent."""
    peft_type = mixture_peft_type()
    if peft_type not in PEFT_TYPE_TO_TUNER_MAPPING:
        register_peft_method(name=PEFT_METHOD, config_cls=MaloraDistConfig, model_cls=MaloraDistModel,
                             prefix=PEFT_PREFIX)
    return peft_type
