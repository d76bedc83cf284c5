"""Flax NNX models for the SPAM pretraining script."""

from models.llama import (
    BATCH_AXES,
    CONFIGS,
    DTYPES,
    MESH_AXES,
    Llama,
    LlamaConfig,
    abstract_model,
    count_params,
    get_config,
    layers_stacked,
    make_model,
    param_shardings,
    partition_specs,
    stack_layers,
    unstack_layers,
)
from models.hf import UnsupportedCheckpoint, from_pretrained, to_pretrained

__all__ = [
    "BATCH_AXES",
    "CONFIGS",
    "DTYPES",
    "MESH_AXES",
    "Llama",
    "LlamaConfig",
    "abstract_model",
    "count_params",
    "get_config",
    "layers_stacked",
    "make_model",
    "param_shardings",
    "partition_specs",
    "stack_layers",
    "unstack_layers",
    "from_pretrained",
    "to_pretrained",
    "UnsupportedCheckpoint",
]
