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
    if "flatness" in analyses:
        settings = store.flatness_settings
        lines.append(f"flatness    {settings['n_directions']} directions, epsilon {settings['epsilon']}, "
                     f"seed {settings['seed']}: {store.flatness_epochs().size} of {store.epochs.size} epochs complete")
    lines.append(f"analyses    {', '.join(analyses) if analyses else 'none stored yet'}")
    return "\n".join(lines)
