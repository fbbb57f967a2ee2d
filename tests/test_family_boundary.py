"""The family layer's boundary, checked on the source: nothing outside `geostore/family/` knows a task."""

from __future__ import annotations

from pathlib import Path

from test_architecture import ROOT, imports_of, modules

TASK_MODULES = ("geostore.family.modular_addition", "geostore.family.modular_addition_fast",
                "geostore.family.train_modular_addition")
# `geostore train` is the embedded demo's trainer: the CLI dispatches to it and knows nothing else of the task.
ALLOWED = {Path("geostore/cli.py")}


def test_nothing_outside_the_family_layer_imports_a_task():
    for path in [*modules("geostore"), *modules("viewer")]:
        relative = path.relative_to(ROOT)
        if relative.parts[:2] == ("geostore", "family") or relative in ALLOWED:
            continue
        known = {m for m in imports_of(path) if m.startswith(TASK_MODULES)}
        assert not known, f"{relative} imports {known}: task knowledge belongs to a family"
        assert "modular_addition" not in path.read_text().replace('FORMAT1_FAMILY = "modular_addition"', ""), relative
