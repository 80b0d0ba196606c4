"""No false alarm on what genuine trainers write: checksums switched off, inf in callback state, frozen
parameters; the real problems next to them are still errors."""

from __future__ import annotations

import torch

from ckpttools.commands.convert import convert
from ckpttools.commands.diff import diff_checkpoints
from ckpttools.commands.verify import verify


def _codes(report, severity=None):
    return [f.code for f in report.findings if severity is None or f.severity == severity]


def test_checksums_switched_off_are_a_warning_and_every_command_works(tmp_path):
    from torch.utils.serialization import config

    path = tmp_path / "nocrc.pt"
    old = config.save.compute_crc32
    config.save.compute_crc32 = False
    try:
        torch.save({"state_dict": {"w": torch.randn(4, 4)}}, path)
    finally:
        config.save.compute_crc32 = old
    report = verify(path)
    assert not report.errors and "zip.crc-not-computed" in _codes(report, "warning")
    convert(path, tmp_path / "w.safetensors")
    assert diff_checkpoints(path, tmp_path / "w.safetensors").verdict == "identical"
    data = bytearray(path.read_bytes())  # the digest-less bytes are still checked for structure and values
    at = bytes(data).find(torch.load(path)["state_dict"]["w"].numpy().tobytes()[:16])
    data[at + 3] = 0x7F
    data[at + 2] = 0xC0  # a NaN in the weights
    path.write_bytes(bytes(data))
    assert "values.nonfinite" in _codes(verify(path), "error")


def _lightning(tmp_path, weights, kth=float("inf")):
    path = tmp_path / "epoch=1.ckpt"
    torch.save(
        {
            "state_dict": weights,
            "epoch": 1,
            "global_step": 10,
            "pytorch-lightning_version": "2.4.0",
            "callbacks": {
                "ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min'}": {
                    "kth_value": torch.tensor(kth),
                    "best_model_score": torch.tensor(kth),
                }
            },
            "optimizer_states": [],
            "lr_schedulers": [],
        },
        path,
    )
    return path


def test_inf_in_callback_state_is_not_an_error_but_in_weights_it_is(tmp_path):
    assert not verify(_lightning(tmp_path, {"w": torch.ones(3)})).errors
    assert "values.nonfinite" in _codes(verify(_lightning(tmp_path, {"w": torch.tensor([1.0, float("inf")])})))


def test_frozen_parameters_are_normal_and_extra_optimizer_state_is_not(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    for p in model[0].parameters():
        p.requires_grad_(False)  # a frozen backbone
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    path = tmp_path / "finetune.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 0, "train_args": {}}, path)
    report = verify(path)
    assert not report.errors and "optimizer.partial" in _codes(report, "info")
    state = opt.state_dict()
    state["param_groups"][0]["params"] = list(range(20))  # more parameters than the model has
    torch.save({"model": model.state_dict(), "optimizer": state, "epoch": 0, "train_args": {}}, path)
    assert "optimizer.param-count" in _codes(verify(path), "error")
