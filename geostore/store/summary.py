"""A human-readable description of a store, for `geostore info`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from geostore.store import schema

if TYPE_CHECKING:
    from geostore.store.reader import Store


def _size(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return f"{nbytes:.1f} TB"


def _describe_settings(analysis: str, settings: dict) -> str:
    """One line of an analysis's settings."""
    if analysis == "flatness":
        return f"{settings['n_directions']} directions, epsilon {settings['epsilon']}, seed {settings['seed']}"
    if analysis == "antithetic":
        return f"curvature and slope at +-epsilon {settings['epsilon']} along the flatness directions"
    if analysis == "profile":
        scale = " x the weight norm" if settings["relative"] else ""
        values = ", ".join(f"{e:g}" for e in settings["epsilons"])
        return f"epsilon {values}{scale}, {settings['n_directions']} directions"
    return (f"Hutchinson trace ({settings['n_probes']} probes), top eigenvalue ({settings['iterations']} Lanczos "
            f"steps), seed {settings['seed']}")


def describe(store: Store) -> str:
    """Epochs, model, parameters and shapes, size on disk, sources and stored analyses of a store."""
    cfg, task, epochs = store.config, store.task, store.epochs
    span = f"{epochs[0]}..{epochs[-1]}" if epochs.size else "none"
    lines = [
        f"store       {store.path}  (geostore format {store.attrs['geostore']['version']}, "
        f"{_size(store.nbytes_on_disk())} on disk, {store.chunk_epochs} epochs per chunk)",
        f"model       {task.get('family', 'unknown family')} p={task.get('p', '?')}: "
        + " ".join(f"{k}={cfg[k]}" for k in ("n_layers", "d_model", "n_heads", "d_head", "d_mlp", "act_fn")),
        f"epochs      {epochs.size} stored, {span}",
    ]
    if store.interrupted:
        lines.append("            (an interrupted ingest left staged work: re-run ingest to finish it)")
    lines.append("parameters  (per epoch, float32)")
    shapes = store.param_shapes()
    for name, shape in shapes.items():
        dims = ", ".join(f"{d}={s}" for d, s in zip(schema.PARAMETERS[name][1], shape, strict=True))
        lines.append(f"  {name:<6} {shape!s:<16} {dims}")
    weights = sum(int(np.prod(shapes[n])) for n in schema.GROUPS["all"])
    lines.append(f"  the 9 weight matrices hold {weights:,} numbers per epoch")
    metrics = store.metrics()
    lines.append(f"metrics     {', '.join(metrics) if metrics else 'none recorded'}")
    mask = store.train_mask()
    if mask is not None:
        lines.append(f"split       {mask.sum()} of {mask.size} pairs for training ({mask.mean():.0%})")
    for source in store.sources:
        lines.append(f"source      {source['kind']}: {source['path']}")
    analyses = store.analyses()
    for name in analyses:
        settings = store.analysis_settings(name)
        done = f"{store.analysis_epochs(name).size} of {store.epochs.size} epochs complete"
        lines.append(f"{name:<11} {_describe_settings(name, settings)}: {done}")
    lines.append(f"analyses    {', '.join(analyses) if analyses else 'none stored yet'}")
    return "\n".join(lines)
