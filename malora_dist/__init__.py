"""malora_dist: distributed training of mixture-of-LoRA-experts adapters (MALoRA, MoLoRA, LoRA)."""

__version__ = "0.1.0"
