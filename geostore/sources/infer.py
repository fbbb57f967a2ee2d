"""The model config of a run: from a config.json (HookedTransformerConfig fields) or tensor shapes."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from geostore.errors import SourceError
from geostore.sources.state_dict import check_keys
from geostore.store import schema

DIM_FIELDS = ("n_layers", "d_model", "n_heads", "d_head", "d_mlp", "d_vocab", "d_vocab_out", "n_ctx")
# What shapes cannot tell: the modular-addition architecture's values.
DEFAULTS: dict[str, object] = {"n_layers": 1, "act_fn": "relu", "normalization_type": None}


def _shape(shapes: Mapping[str, tuple[int, ...]], short: str, ndim: int, origin: str) -> tuple[int, ...]:
    key = schema.PARAMETERS[short][0]
    if key not in shapes:
        raise SourceError(f"{origin}: cannot infer the model config: no {key}")
    shape = tuple(shapes[key])
    if len(shape) != ndim:
        raise SourceError(f"{origin}: {key} has shape {shape}, expected {ndim} dimensions")
    return shape


def infer_config(shapes: Mapping[str, tuple[int, ...]], origin: str) -> dict[str, object]:
    """A 1-layer config from HookedTransformer-layout shapes (state-dict key -> shape).

    `W_E (d_vocab, d_model)`, `W_Q (n_heads, d_model, d_head)`, `W_in (d_model, d_mlp)`,
    `W_U (d_model, d_vocab_out)`, `W_pos (n_ctx, d_model)`; act_fn "relu", no normalisation.
    """
    check_keys(shapes.keys(), origin)
    d_vocab, d_model = _shape(shapes, "W_E", 2, origin)
    n_heads, _, d_head = _shape(shapes, "W_Q", 3, origin)
    _, d_mlp = _shape(shapes, "W_in", 2, origin)
    _, d_vocab_out = _shape(shapes, "W_U", 2, origin)
    n_ctx, _ = _shape(shapes, "W_pos", 2, origin)
    config = {
        **DEFAULTS,
        "d_model": d_model, "n_heads": n_heads, "d_head": d_head, "d_mlp": d_mlp,
        "d_vocab": d_vocab, "d_vocab_out": d_vocab_out, "n_ctx": n_ctx,
    }
    return normalise_config(config, origin)


def normalise_config(config: Mapping[str, object], origin: str) -> dict[str, object]:
    """The `schema.CONFIG_FIELDS` of `config` with integer dimensions, checked to be storable."""
    missing = [k for k in schema.CONFIG_FIELDS if k not in config]
    if missing:
        raise SourceError(f"{origin}: model config lacks {', '.join(missing)}")
    out: dict[str, object] = {}
    for key in schema.CONFIG_FIELDS:
        value = config[key]
        if key in DIM_FIELDS:
            try:
                value = int(value)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                raise SourceError(f"{origin}: model config {key}={value!r} is not an integer") from None
            if value <= 0:
                raise SourceError(f"{origin}: model config {key}={value} must be positive")
        out[key] = value
    if out["n_layers"] != 1:
        raise SourceError(
            f"{origin}: n_layers={out['n_layers']}: geostore stores 1-layer HookedTransformers "
            "without normalisation"
        )
    if out["normalization_type"] not in (None, "None", "none"):
        raise SourceError(
            f"{origin}: normalization_type={out['normalization_type']!r}: geostore stores 1-layer "
            "HookedTransformers without normalisation"
        )
    out["normalization_type"] = None
    if not isinstance(out["act_fn"], str):
        raise SourceError(f"{origin}: model config act_fn={out['act_fn']!r} is not a name")
    return out


def prime_in(data: Mapping[str, object]) -> int | None:
    """The modulus recorded in a config dict as `p` or `prime`, if any."""
    for key in ("p", "prime"):
        if data.get(key) is not None:
            return int(data[key])  # type: ignore[arg-type]
    return None


def config_from_json(
    data: Mapping[str, object],
    origin: str,
    *,
    shapes: Callable[[], Mapping[str, tuple[int, ...]]] | None = None,
) -> dict[str, object]:
    """A model config from a config.json's HookedTransformerConfig fields (plus `p`/`prime`).

    Fields the file lacks come from `shapes()` (state-dict key -> shape of a checkpoint, called
    only when needed), else from the usual derivations (`d_vocab = p + 1`, `d_head = d_model /
    n_heads`, `d_mlp = 4 d_model`, act_fn relu, no normalisation, 1 layer).
    """
    config: dict[str, object] = {}
    for key in schema.CONFIG_FIELDS:
        if key in data and (data[key] is not None or key == "normalization_type"):
            config[key] = data[key]
    try:
        p = prime_in(data)
    except (TypeError, ValueError):
        raise SourceError(f"{origin}: p={data.get('p', data.get('prime'))!r} is not an integer") from None
    if p is not None:
        if "d_vocab" in config and int(config["d_vocab"]) != p + 1:  # type: ignore[arg-type]
            raise SourceError(f"{origin}: d_vocab={config['d_vocab']} does not fit p={p} (expected {p + 1})")
        config.setdefault("d_vocab", p + 1)
    if config.get("d_vocab_out") in (-1, "-1") and "d_vocab" in config:
        config["d_vocab_out"] = config["d_vocab"]  # TransformerLens: -1 means d_vocab
    missing = [k for k in schema.CONFIG_FIELDS if k not in config]
    if any(k in DIM_FIELDS and k != "n_layers" for k in missing) and shapes is not None:
        inferred = infer_config(shapes(), origin)
        for key in missing:
            config.setdefault(key, inferred[key])
    for key, value in DEFAULTS.items():
        config.setdefault(key, value)
    if "d_head" not in config and "d_model" in config and "n_heads" in config:
        config["d_head"] = int(config["d_model"]) // int(config["n_heads"])  # type: ignore[arg-type]
    if "d_mlp" not in config and "d_model" in config:
        config["d_mlp"] = 4 * int(config["d_model"])  # type: ignore[arg-type]
    if "d_vocab_out" not in config and p is not None:
        config["d_vocab_out"] = p
    return normalise_config(config, origin)


def json_config_dict(data: object) -> dict[str, object]:
    """The config part of a config.json/run.json: the top level, or a dict under model_config/config/cfg."""
    if not isinstance(data, dict):
        return {}
    for key in ("model_config", "config", "cfg"):
        inner = data.get(key)
        if isinstance(inner, dict):
            merged = dict(inner)
            for extra in ("p", "prime"):
                if extra in data and extra not in merged:
                    merged[extra] = data[extra]
            return merged
    return data
