"""Adapters: config, the MALoRA/MoLoRA/LoRA layer, routing, injection into a model, save and load."""
