"""Negative controls: genuine files written by torch's own save code (whole modules, namespaces, numpy and
Python RNG states, Lightning-style dicts, every pickle protocol) get no safety error; classes are warnings."""

from __future__ import annotations

import argparse
import collections
import pathlib
import random

import numpy as np
import pytest
import torch

from ckpttools.commands.verify import verify


class TinyNet(torch.nn.Module):  # a user's model class, pickled whole as people do with torch.save(model)
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))

    def forward(self, x):
        return self.head(self.bn(self.conv(x)))


def _trees():
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.rand(2, 3, 3, 3)).sum().backward()
    opt.step()
    yield "state dict", model.state_dict()
    yield "whole module", model
    yield (
        "tutorial dict",
        {"epoch": 3, "model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict(), "loss": 0.5},
    )
    yield (
        "namespace and rng",
        {
            "model": model.state_dict(),
            "args": argparse.Namespace(lr=0.1, name="x"),
            "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
        },
    )
    yield (
        "lightning-style",
        {
            "state_dict": collections.OrderedDict(model.state_dict()),
            "epoch": 1,
            "global_step": 10,
            "pytorch-lightning_version": "2.4.0",
            "callbacks": {
                "ModelCheckpoint": {"dirpath": pathlib.PosixPath("/tmp/x"), "best_model_score": torch.tensor(0.5)}
            },
            "hyper_parameters": {"lr": 0.1},
            "optimizer_states": [opt.state_dict()],
        },
    )
    yield (
        "numpy arrays and scalars",
        {"w": np.arange(4.0), "s": np.float32(1.5), "bf16": torch.ones(2, dtype=torch.bfloat16)},
    )


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
@pytest.mark.parametrize("name,tree", list(_trees()))
def test_genuine_files_have_no_safety_error(tmp_path, name, tree, protocol):
    path = tmp_path / "genuine.pt"
    torch.save(tree, path, pickle_protocol=protocol)
    report = verify(path)
    dangerous = [f for f in report.findings if f.code == "safety.dangerous-reference"]
    assert not dangerous, dangerous
    if name == "whole module":  # a pickled module class is named, as a warning
        assert any(f.code == "safety.code-reference" and "TinyNet" in f.message for f in report.findings)
