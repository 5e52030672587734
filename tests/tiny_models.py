"""Tiny random LLaMA-style Hugging Face models for fast tests."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(seed=0, tie=False, **overrides):
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=tie,
        **overrides,
    )
    return LlamaForCausalLM(config).eval()
