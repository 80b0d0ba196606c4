"""Harmless standard-library values in checkpoint metadata (issue 25): datetimes, dates, Counter, Fraction,
Decimal, UUID are allowed by exact name, and do not open a door: the modules around them stay refused."""

from __future__ import annotations

import collections
import datetime
import decimal
import fractions
import pickle
import uuid

import torch
from click.testing import CliRunner

from ckpttools.cli import main as ckpt
from ckpttools.commands.verify import verify


def test_metadata_values_torch_saves_are_no_error(tmp_path):
    path = tmp_path / "meta.pt"
    torch.save(
        {
            "model": {"w": torch.ones(3)},
            "meta": {
                "started": datetime.datetime(2026, 12, 4, 15, 0, tzinfo=datetime.timezone.utc),
                "day": datetime.date(2026, 12, 4),
                "at": datetime.time(15, 4),
                "took": datetime.timedelta(hours=3),
                "labels": collections.Counter(car=3, person=5),
                "ratio": fractions.Fraction(1, 3),
                "lr": decimal.Decimal("0.001"),
                "run_id": uuid.UUID(int=42),
            },
        },
        path,
    )
    report = verify(path)
    assert not report.errors and not [f for f in report.findings if f.code.startswith("safety.")], [
        (f.code, f.message) for f in report.findings
    ]
    assert CliRunner().invoke(ckpt, ["inspect", str(path)]).exit_code == 0


class _Evil:
    def __reduce__(self):
        import uuid as module

        return (module._get_command_stdout, ("echo", "pwned"))  # a uuid helper that starts a process


def test_the_rest_of_uuid_is_still_refused(tmp_path):
    path = tmp_path / "evil.pt"
    data = pickle.dumps({"id": uuid.UUID(int=1), "x": _Evil()}, protocol=2)
    assert pickle.loads(data)["x"].getvalue() == b"pwned\n"  # live: plain pickle runs the process
    path.write_bytes(data)
    codes = {f.code for f in verify(path).errors}
    assert "safety.dangerous-reference" in codes, codes
