"""A human-readable description of a store, for `geostore info`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from geostore.store.plane import describe as describe_planes

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
    if analysis == "hessian_groups":
        return f"trace and top eigenvalue of the Hessian block of {', '.join(settings['groups'])}"
    return (f"Hutchinson trace ({settings['n_probes']} probes), top eigenvalue ({settings['iterations']} Lanczos "
            f"steps), seed {settings['seed']}")


def describe(store: Store) -> str:
    """Epochs, model, parameters and shapes, size on disk, sources and stored analyses of a store."""
    cfg, task, epochs, unit = store.config, store.task, store.epochs, store.index_unit
    span = f"{epochs[0]}..{epochs[-1]}" if epochs.size else "none"
    lines = [
        f"store       {store.path}  (geostore format {store.attrs['geostore']['version']}, "
        f"{_size(store.nbytes_on_disk())} on disk, {store.chunk_epochs} epochs per chunk)",
        f"model       {store.family}: " + " ".join(f"{k}={v}" for k, v in cfg.items() if _short_value(v)),
        "task        " + (", ".join(f"{k}={v}" for k, v in task.items() if k != "family" and _short_value(v))
                               or "nothing recorded"),
        f"{unit + 's':<12}{epochs.size} stored, {span}" + ("  (optimiser steps; the store's axis is named epoch)"
                                                           if unit == "step" else ""),
    ]
    if store.interrupted:
        lines.append("            (an interrupted ingest left staged work: re-run ingest to finish it)")
    lines.append("parameters  (per epoch, float32)")
    width = max(len(p.name) for p in store.table.parameters)
    for parameter in store.table.parameters:
        dims = ", ".join(f"{d}={s}" for d, s in zip(parameter.dims, parameter.shape, strict=True))
        frozen = "" if parameter.trainable else "  (frozen)"
        lines.append(f"  {parameter.name:<{width}} {parameter.shape!s:<18} {dims}{frozen}")
    lines.append(f"  {len(store.table.trainable)} trainable parameters hold {store.n_trainable:,} numbers per epoch")
    lines.append("groups      " + "; ".join(f"{g}: {', '.join(m)}" for g, m in store.groups.items()
                                            if not g.startswith("layer")))
    if store.probe() is not None:
        lines.append(f"probe       {store.probe().shape[0]} x {store.probe().shape[1]} tokens")
    metrics = store.metrics()
    lines.append(f"metrics     {', '.join(metrics) if metrics else 'none recorded'}")
    mask = store.train_mask()
    if mask is not None:
        lines.append(f"split       {mask.sum()} of {mask.size} examples for training ({mask.mean():.0%})")
    for source in store.sources:
        lines.append(f"source      {source['kind']}: {source['path']}")
    analyses = store.analyses()
    for name in analyses:
        settings = store.analysis_settings(name)
        done = f"{store.analysis_epochs(name).size} of {store.epochs.size} epochs complete"
        lines.append(f"{name:<11} {_describe_settings(name, settings)}: {done}")
    lines.append(f"analyses    {', '.join(analyses) if analyses else 'none stored yet'}")
    lines.extend(describe_planes(store))
    return "\n".join(lines)


def _short_value(value: object) -> bool:
    """Config values worth a word in the summary: numbers, names and flags that are set."""
    return value not in (None, False) and isinstance(value, int | float | str)
