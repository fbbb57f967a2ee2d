"""A third-party model family, as a user would write one: a small tanh regressor on a fixed synthetic task.

Registered through the `geostore.families` entry point (see the dist-info beside this file); geostore knows
nothing of it. Runs are state-dict folders with a `config.json` saying `"architecture": "toy_regressor"`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from geostore.errors import SourceError
from geostore.family.base import Parameter, ParameterTable, RunInfo

N_EXAMPLES = 64


def module(d_in: int, d_hidden: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(d_in, d_hidden), torch.nn.Tanh(), torch.nn.Linear(d_hidden, 1))


def task_data(d_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets of the task: fixed by the input width alone."""
    generator = torch.Generator().manual_seed(1234)
    x = torch.randn(N_EXAMPLES, d_in, generator=generator)
    return x, torch.sin(x.sum(dim=1, keepdim=True))


@dataclass(frozen=True)
class ToyModel:
    config: dict
    table: ParameterTable
    family: str = "toy_regressor"
    needs_probe: bool = False

    def build(self, params=None):
        net = module(int(self.config["d_in"]), int(self.config["d_hidden"]))
        if params is not None:
            net.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in self.table.state_dict(params).items()})
        return net.eval()

    def probe(self, stored=None):
        return task_data(int(self.config["d_in"]))

    def losses(self, forward, probe):
        x, y = probe
        return ((forward(x) - y) ** 2).mean(dim=1)


class ToyFamily:
    """A tanh regressor on a synthetic task (test plug-in)."""

    name = "toy_regressor"

    def recognise(self, run: RunInfo) -> bool:
        return bool(run.config) and run.config.get("architecture") == "toy_regressor"

    def from_run(self, run: RunInfo) -> ToyModel:
        model = self.model(run.config)
        if dict(run.shapes()) != {k: p.key_shape for p in model.table.parameters for k in p.keys}:
            raise SourceError(f"{run.origin}: checkpoints do not fit the configured toy regressor")
        return model

    def model(self, config) -> ToyModel:
        d_in, d_hidden = int(config["d_in"]), int(config["d_hidden"])
        parameters = (Parameter("0.weight", (d_hidden, d_in), ("hidden", "input"), ("0.weight",)),
                      Parameter("0.bias", (d_hidden,), ("hidden",), ("0.bias",)),
                      Parameter("2.weight", (1, d_hidden), ("output", "hidden"), ("2.weight",)),
                      Parameter("2.bias", (1,), ("output",), ("2.bias",), trainable=False))
        table = ParameterTable(parameters, {"hidden": ("0.weight", "0.bias"), "readout": ("2.weight",)})
        return ToyModel({"architecture": "toy_regressor", "d_in": d_in, "d_hidden": d_hidden}, table)

    def task(self, run: RunInfo) -> dict:
        return {"family": self.name}

    def split(self, model, train_indices):
        return None


FAMILY = ToyFamily()
