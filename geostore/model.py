"""Build TransformerLens models from a store's model config and a set of named parameters.

Importing this module imports torch and TransformerLens (~5 s): keep it off start-up paths.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import numpy as np
import torch

from geostore.store.schema import CONFIG_FIELDS, PARAMETERS, short_name

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # TransformerLens 3.x warns that HookedTransformer is deprecated
    from transformer_lens import HookedTransformer, HookedTransformerConfig


def hooked_config(config: Mapping[str, object], *, seed: int | None = None) -> HookedTransformerConfig:
    """A HookedTransformerConfig from a store config (only the fields geostore records)."""
    fields = {k: config[k] for k in CONFIG_FIELDS}
    return HookedTransformerConfig(**fields, seed=seed, device="cpu")


def build_model(config: Mapping[str, object], *, seed: int | None = None) -> HookedTransformer:
    """A freshly initialised HookedTransformer of `config` (seeded when `seed` is given)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedTransformer(hooked_config(config, seed=seed))
    model.eval()
    return model


def named_parameters(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Every stored parameter of `model` as float32 numpy arrays keyed by short name."""
    out = {}
    for key, value in model.state_dict().items():
        name = short_name(key)
        if name is not None:
            out[name] = value.detach().cpu().numpy().astype(np.float32, copy=True)
    return out


def load_parameters(model: torch.nn.Module, params: Mapping[str, np.ndarray]) -> None:
    """Copy named parameters (short names) into `model` in place; every stored name must be given."""
    state = {PARAMETERS[name][0]: torch.as_tensor(np.asarray(params[name])) for name in PARAMETERS}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith(("attn.mask", "attn.IGNORE"))]
    if missing or unexpected:
        raise ValueError(f"parameters do not fit the model: missing {missing}, unexpected {unexpected}")
