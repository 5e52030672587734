"""``PeftType.MALORA_DIST``: the mixture method's member of PEFT's enum of methods.

PEFT 0.21's ``register_peft_method`` accepts only names that ``PeftType`` (a closed ``str`` enum)
already lists, and PEFT reads ``peft_type.value`` in several places, so a package outside PEFT adds
its member to the enum before registering. The member compares and hashes as its string
(``"MALORA_DIST"``), which is how ``adapter_config.json`` names it.
"""

from __future__ import annotations

from peft.utils import PeftType

from malora_dist.adapters.file_format import PEFT_TYPE


def mixture_peft_type() -> PeftType:
    """``PeftType.MALORA_DIST``, added to the enum on first use."""
    if PEFT_TYPE not in PeftType.__members__:
        _add_enum_member(PeftType, PEFT_TYPE)
    return PeftType[PEFT_TYPE]


def _add_enum_member(enum_cls, name: str) -> None:
    """What ``enum`` does for a member listed in the class body (Python 3.11 to 3.13 keep members
    in these three tables and as class attributes)."""
    member = str.__new__(enum_cls, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = enum_cls
    type.__setattr__(enum_cls, name, member)  # EnumType.__setattr__ refuses new names once the class exists
    enum_cls._member_names_.append(name)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[name] = member
