"""The registry of model families: the built-in ones and users' own, registered as Python entry points.

A third-party package makes its family known to geostore with an entry point in the group
`geostore.families` whose object is a `Family` (or a class that makes one without arguments)::

    [project.entry-points."geostore.families"]
    my_family = "my_package.geostore_family:FAMILY"

Detection asks users' families first (they know their own runs best), then the built-in ones from
the most specific to the most general: the reference project's MLPs, modular addition on
HookedTransformers, any HookedTransformer language model, any Hugging Face `transformers` causal language model
(recognised by its config.json's `model_type`).
"""

from __future__ import annotations

import functools
from importlib.metadata import entry_points

from geostore.errors import GeostoreError, SourceError
from geostore.family.base import Family, RunInfo

ENTRY_POINT_GROUP = "geostore.families"


def _builtin() -> list[Family]:
    from geostore.family.hf import TRANSFORMERS
    from geostore.family.mlp import LEARNED_EMB_MLP, TWO_LAYER_MLP
    from geostore.family.modular_addition import MODULAR_ADDITION
    from geostore.family.transformer import HOOKED_TRANSFORMER

    return [TWO_LAYER_MLP, LEARNED_EMB_MLP, MODULAR_ADDITION, HOOKED_TRANSFORMER, TRANSFORMERS]


@functools.cache
def _plugins() -> tuple[Family, ...]:
    found = []
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            family = entry.load()
            family = family() if isinstance(family, type) else family
        except Exception as exc:  # a broken plug-in must not break geostore: name it in one line
            raise GeostoreError(f"family plug-in {entry.name!r} ({entry.value}) cannot be loaded: "
                                f"{type(exc).__name__}: {exc}") from None
        if not isinstance(family, Family):
            raise GeostoreError(f"family plug-in {entry.name!r} ({entry.value}) is not a geostore Family "
                                "(needs name, recognise, from_run, model, task, split)")
        found.append(family)
    return tuple(found)


def families() -> dict[str, Family]:
    """Every known family by name, in detection order: plug-ins, then the built-in ones."""
    out: dict[str, Family] = {}
    for family in (*_plugins(), *_builtin()):
        out.setdefault(family.name, family)
    return out


def get(name: str) -> Family:
    """The family named `name`; GeostoreError naming the installed ones when it is unknown."""
    known = families()
    if name not in known:
        raise GeostoreError(f"unknown model family {name!r} (installed: {', '.join(known)}); a plug-in family "
                            f"registers under the entry-point group {ENTRY_POINT_GROUP!r}")
    return known[name]


def detect(run: RunInfo, family: str | None = None) -> Family:
    """The family of a run: `family` when named (it must recognise the run), else the first that recognises it."""
    if family is not None:
        chosen = get(family)
        if not chosen.recognise(run):
            raise SourceError(f"{run.origin}: not a run of the {family} family")
        return chosen
    for candidate in families().values():
        if candidate.recognise(run):
            return candidate
    raise SourceError(f"{run.origin}: no model family recognises this run (families: {', '.join(families())}); "
                      "add a config.json naming the architecture, or install the family's plug-in")
