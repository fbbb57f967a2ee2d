"""The store contract: parameter names, dimension names, component groups, format version.

Everything that reads or writes a geostore store takes names from here; the README's
"Store layout" section documents the same contract and a test checks that they agree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

FORMAT_NAME = "geostore"
FORMAT_VERSION = 1

EPOCH_DIM = "epoch"

# TransformerLens short name -> (state_dict key of layer 0, dimension names of one epoch).
PARAMETERS: dict[str, tuple[str, tuple[str, ...]]] = {
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

# State-dict entries that are buffers, not parameters: never stored.
BUFFER_SUFFIXES = ("attn.mask", "attn.IGNORE")

WEIGHT_MATRICES = ("W_E", "W_pos", "W_Q", "W_K", "W_V", "W_O", "W_in", "W_out", "W_U")

GROUPS: dict[str, tuple[str, ...]] = {
    "all": WEIGHT_MATRICES,
    "embedding": ("W_E", "W_pos", "W_U"),
    "attention": ("W_Q", "W_K", "W_V", "W_O"),
    "mlp": ("W_in", "W_out"),
}

# Per-checkpoint training metrics (dims: epoch), NaN where the source did not record them.
METRICS = ("train_loss", "test_loss", "train_accuracy", "test_accuracy")

# The train/test split of the task, when the source records it: dims (a, b).
SPLIT = "train_mask"
SPLIT_DIMS = ("a", "b")

# Model-config fields a store records; the dimension sizes derive from them.
CONFIG_FIELDS = (
    "n_layers", "d_model", "n_heads", "d_head", "d_mlp", "d_vocab", "d_vocab_out", "n_ctx",
    "act_fn", "normalization_type",
)


def dim_sizes(config: Mapping[str, object]) -> dict[str, int]:
    """Size of every named parameter dimension, from a model config."""
    return {name: int(config[name]) for name in
            ("d_vocab", "d_vocab_out", "d_model", "n_heads", "d_head", "d_mlp", "n_ctx")}


def param_shape(name: str, config: Mapping[str, object]) -> tuple[int, ...]:
    """Shape of one epoch of parameter `name` under `config`."""
    sizes = dim_sizes(config)
    return tuple(sizes[d] for d in PARAMETERS[name][1])


def short_name(state_dict_key: str) -> str | None:
    """The short name of a state-dict key, or None for buffers and unknown keys."""
    for short, (key, _) in PARAMETERS.items():
        if key == state_dict_key:
            return short
    return None


def resolve_group(group: str | Sequence[str]) -> tuple[str, ...]:
    """Parameter names of a component group name or an explicit list of names."""
    if isinstance(group, str):
        if group in GROUPS:
            return GROUPS[group]
        if group in PARAMETERS:
            return (group,)
        raise KeyError(f"unknown group {group!r}: use one of {', '.join(GROUPS)} or parameter names")
    names = tuple(group)
    unknown = [n for n in names if n not in PARAMETERS]
    if unknown or not names:
        raise KeyError(f"unknown parameter names {unknown}: use names from {', '.join(PARAMETERS)}")
    return names

DIRECTION_DIM = "direction"
EPSILON_DIM = "epsilon"

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
}

# Analyses a store can hold, by the arrays that make them up. The first array of each is written
# after the others: an epoch's analysis is complete exactly when its row of the first array is finite
# (for flatness, `baseline_loss` is written after `delta_losses`).
ANALYSES: dict[str, tuple[str, ...]] = {
    "flatness": ("baseline_loss", "delta_losses"),
    "antithetic": ("curvature", "slope"),
    "profile": ("profile_curvature", "profile_curvature_stderr", "profile_flatness_ratio", "profile_epsilon"),
    "hessian": ("hessian_trace", "hessian_trace_stderr", "top_eigenvalue", "top_eigenvalue_residual"),
}

# Each analysis's settings live in the root attribute named after it; these keys must agree to extend
# stored values (other keys, such as definitions or the device, are informational).
ANALYSIS_SETTINGS: dict[str, tuple[str, ...]] = {
    "flatness": ("epsilon", "n_directions", "seed"),
    "antithetic": ("epsilon", "n_directions", "seed"),
    "profile": ("epsilons", "relative", "n_directions", "seed", "threshold"),
    "hessian": ("n_probes", "iterations", "seed"),
}

# The settings key giving the size of each non-epoch analysis dimension (a count, or a list's length).
ANALYSIS_DIM_SETTINGS: dict[str, str] = {DIRECTION_DIM: "n_directions", EPSILON_DIM: "epsilons"}
