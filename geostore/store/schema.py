"""The store contract: parameter names, dimension names, component groups, format version.

Everything that reads or writes a geostore store takes names from here; the README's
"Store layout" section documents the same contract and a test checks that they agree.
"""

from __future__ import annotations

from collections.abc import Mapping

from geostore.family.base import Parameter, ParameterTable

FORMAT_NAME = "geostore"
# 1: the fixed 1-layer HookedTransformer table below, no table in the metadata. 2: any model family; the
# store's parameter table (`geostore.family.base.ParameterTable`) in the root attribute `parameters`.
FORMAT_VERSION = 2

EPOCH_DIM = "epoch"

# Format 1: TransformerLens short name -> (state_dict key, dimension names of one epoch), every store a
# 1-layer HookedTransformer without normalisation; the 9 weight matrices train, biases are frozen.
FORMAT1_PARAMETERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "W_E": ("embed.W_E", ("d_vocab", "d_model")),
    "W_pos": ("pos_embed.W_pos", ("n_ctx", "d_model")),
    "W_Q": ("blocks.0.attn.W_Q", ("n_heads", "d_model", "d_head")),
    "W_K": ("blocks.0.attn.W_K", ("n_heads", "d_model", "d_head")),
    "W_V": ("blocks.0.attn.W_V", ("n_heads", "d_model", "d_head")),
    "W_O": ("blocks.0.attn.W_O", ("n_heads", "d_head", "d_model")),
    "b_Q": ("blocks.0.attn.b_Q", ("n_heads", "d_head")),
    "b_K": ("blocks.0.attn.b_K", ("n_heads", "d_head")),
    "b_V": ("blocks.0.attn.b_V", ("n_heads", "d_head")),
    "b_O": ("blocks.0.attn.b_O", ("d_model",)),
    "W_in": ("blocks.0.mlp.W_in", ("d_model", "d_mlp")),
    "b_in": ("blocks.0.mlp.b_in", ("d_mlp",)),
    "W_out": ("blocks.0.mlp.W_out", ("d_mlp", "d_model")),
    "b_out": ("blocks.0.mlp.b_out", ("d_model",)),
    "W_U": ("unembed.W_U", ("d_model", "d_vocab_out")),
    "b_U": ("unembed.b_U", ("d_vocab_out",)),
}
FORMAT1_GROUPS: dict[str, tuple[str, ...]] = {
    "embedding": ("W_E", "W_pos", "W_U"),
    "attention": ("W_Q", "W_K", "W_V", "W_O"),
    "mlp": ("W_in", "W_out"),
}
FORMAT1_FAMILY = "modular_addition"

# Per-checkpoint training metrics (dims: epoch), NaN where the source did not record them.
METRICS = ("train_loss", "test_loss", "train_accuracy", "test_accuracy")
# Metrics only some sources record (transformers Trainer runs: the learning rate and the fractional training epoch
# at each checkpoint); their arrays (dims: epoch) exist in a store whose first source recorded them.
OPTIONAL_METRICS = ("learning_rate", "train_epoch")

# Root attribute naming what the `epoch` axis counts: "step" (optimiser steps: transformers runs) or "epoch"
# (absent: every store before it). The array and dimension keep the name `epoch` either way, for compatibility.
INDEX_UNIT = "index_unit"

# The train/test split of the task, when the source records it (dimension names from the family).
SPLIT = "train_mask"
# The probe of the landscape analyses, when the user gave one (`--probe`): token ids.
PROBE = "probe"
PROBE_DIMS = ("probe_example", "probe_position")


def format1_table(config: Mapping[str, object]) -> ParameterTable:
    """The parameter table of a format-1 store, from its model config."""
    sizes = {name: int(config[name]) for name in
             ("d_vocab", "d_vocab_out", "d_model", "n_heads", "d_head", "d_mlp", "n_ctx")}
    parameters = tuple(Parameter(name, tuple(sizes[d] for d in dims), dims, (key,), trainable=name.startswith("W_"))
                       for name, (key, dims) in FORMAT1_PARAMETERS.items())
    return ParameterTable(parameters, FORMAT1_GROUPS)


def table_of(attrs: Mapping[str, object]) -> ParameterTable:
    """A store's parameter table, from its root attributes (format 1: the fixed table)."""
    if int(attrs["geostore"]["version"]) < 2:  # type: ignore[index]
        return format1_table(attrs["model_config"])  # type: ignore[arg-type]
    return ParameterTable.from_json(attrs["parameters"])  # type: ignore[arg-type]


def family_of(attrs: Mapping[str, object]) -> str:
    """The name of the family that wrote a store."""
    if int(attrs["geostore"]["version"]) < 2:  # type: ignore[index]
        return FORMAT1_FAMILY
    return str(attrs["family"])

DIRECTION_DIM = "direction"
EPSILON_DIM = "epsilon"
GROUP_DIM = "group"

# Per-epoch analysis arrays: name -> dimension names (float64, NaN where not computed). They share
# the epoch axis with the weights, so appends and inserts move them along with the weights.
ANALYSIS_ARRAYS: dict[str, tuple[str, ...]] = {
    "delta_losses": (EPOCH_DIM, DIRECTION_DIM),
    "baseline_loss": (EPOCH_DIM,),
    "curvature": (EPOCH_DIM, DIRECTION_DIM),
    "slope": (EPOCH_DIM, DIRECTION_DIM),
    "profile_curvature": (EPOCH_DIM, EPSILON_DIM),
    "profile_curvature_stderr": (EPOCH_DIM, EPSILON_DIM),
    "profile_flatness_ratio": (EPOCH_DIM, EPSILON_DIM),
    "profile_epsilon": (EPOCH_DIM, EPSILON_DIM),
    "hessian_trace": (EPOCH_DIM,),
    "hessian_trace_stderr": (EPOCH_DIM,),
    "top_eigenvalue": (EPOCH_DIM,),
    "top_eigenvalue_residual": (EPOCH_DIM,),
    "group_hessian_trace": (EPOCH_DIM, GROUP_DIM),
    "group_hessian_trace_stderr": (EPOCH_DIM, GROUP_DIM),
    "group_top_eigenvalue": (EPOCH_DIM, GROUP_DIM),
    "group_top_eigenvalue_residual": (EPOCH_DIM, GROUP_DIM),
}

# Analyses a store can hold, by the arrays that make them up (their completion flags: `DONE_ARRAYS`).
ANALYSES: dict[str, tuple[str, ...]] = {
    "flatness": ("baseline_loss", "delta_losses"),
    "antithetic": ("curvature", "slope"),
    "profile": ("profile_curvature", "profile_curvature_stderr", "profile_flatness_ratio", "profile_epsilon"),
    "hessian": ("hessian_trace", "hessian_trace_stderr", "top_eigenvalue", "top_eigenvalue_residual"),
    # The Hessian's four numbers for each component group's block, beside the whole vector's. An analysis of its
    # own (own settings, done flags and arrays, computed whenever the Hessian is): stores written before it hold
    # `hessian` complete without these arrays, and a later run adds them, epoch by epoch, without touching or
    # recomputing the stored totals (the group traces reuse the totals' probe products when both are missing).
    "hessian_groups": ("group_hessian_trace", "group_hessian_trace_stderr", "group_top_eigenvalue",
                       "group_top_eigenvalue_residual"),
}

# Each analysis's completion, recorded apart from its values (so a NaN value, e.g. the loss at NaN weights, is a
# result): a bool per epoch, set after the epoch's values are written. Stores written before these flags
# have none; there an epoch's analysis is complete when its row of the analysis's first array is finite.
DONE_ARRAYS: dict[str, str] = {name: f"{name}_done" for name in ANALYSES}

# Each analysis's settings live in the root attribute named after it; these keys must agree to extend
# stored values (other keys, such as definitions or the device, are informational).
ANALYSIS_SETTINGS: dict[str, tuple[str, ...]] = {
    "flatness": ("epsilon", "n_directions", "seed"),
    "antithetic": ("epsilon", "n_directions", "seed"),
    "profile": ("epsilons", "relative", "n_directions", "seed", "threshold"),
    "hessian": ("n_probes", "iterations", "seed"),
    "hessian_groups": ("n_probes", "iterations", "seed", "groups"),
}

# The settings key giving the size of each non-epoch analysis dimension (a count, or a list's length).
ANALYSIS_DIM_SETTINGS: dict[str, str] = {DIRECTION_DIM: "n_directions", EPSILON_DIM: "epsilons", GROUP_DIM: "groups"}
# Dimensions whose settings list names their positions: `Store.analysis` gives the names as the coordinate.
LABELLED_DIMS = (GROUP_DIM,)
