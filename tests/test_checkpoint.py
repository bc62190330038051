"""Checkpoints are read with torch's safe loader: a crafted file runs nothing; old files still load."""
from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from clipteacher.checkpoint import FORMAT, load_checkpoint, rng_state, save_checkpoint, set_rng_state

MINIMAL = {"config": {}, "model": {}, "vocabulary": ["a"], "text_cache": {}, "embed_dim": 4, "gamma": 1.0}


class Payload:
    """Unpickling this runs a shell command (the attack a downloaded checkpoint can carry)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_pickle_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"format": FORMAT, **MINIMAL, "extra": Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(ValueError) as err:
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()
    assert "\n" not in str(err.value) and "refuses" in str(err.value) and "system" in str(err.value)


def test_checkpoints_from_before_plain_rng_state_still_load(tmp_path, monkeypatch):
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    torch.save({"format": FORMAT, **MINIMAL, "rng": state}, tmp_path / "old.pt")
    reads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: reads.append(a) or real_load(*a, **k))
    ckpt = load_checkpoint(tmp_path / "old.pt")
    assert len(reads) == 1  # read once, not refused and read again
    expected = np.random.rand()
    set_rng_state(ckpt["rng"])
    assert np.random.rand() == expected


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    save_checkpoint({**MINIMAL, "rng": rng_state()}, tmp_path / "last.pt")
    draws = (torch.rand(1).item(), np.random.rand(), random.random())
    set_rng_state(load_checkpoint(tmp_path / "last.pt")["rng"])
    assert (torch.rand(1).item(), np.random.rand(), random.random()) == draws


@pytest.mark.parametrize("drop", ["config", "model", "gamma"])
def test_an_incomplete_checkpoint_is_one_line(tmp_path, drop):
    save_checkpoint({k: v for k, v in MINIMAL.items() if k != drop}, tmp_path / "part.pt")
    with pytest.raises(ValueError, match=f"incomplete: missing {drop}"):
        load_checkpoint(tmp_path / "part.pt")


def test_temp_files_of_a_killed_write_are_removed(tmp_path):
    (tmp_path / "last.pt.abc123.tmp").write_bytes(b"half a checkpoint")  # what SIGKILL mid-write leaves
    save_checkpoint(MINIMAL, tmp_path / "last.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
