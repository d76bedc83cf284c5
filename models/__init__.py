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
    make_model,
    param_shardings,
    partition_specs,
)

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
    "make_model",
    "param_shardings",
    "partition_specs",
]
