"""malora_dist: distributed training of mixture-of-LoRA-experts adapters (MALoRA, MoLoRA, LoRA)."""

import warnings

# megatron-core warns on import that Transformer Engine/Apex are absent; we use neither (only its
# tensor-parallel layers and mappings), so the warning says nothing useful to our users.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

__version__ = "0.1.0"
