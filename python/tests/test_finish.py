"""``Monitor.finish()`` and ``finish_on_exit`` against the real daemon (keyword
arguments only, so the test reads the same for every Monitor signature): a
finished run refuses pushes, an open epoch blocks finishing, and leaving a
``with`` block by an exception never finishes the run."""

from __future__ import annotations

import numpy as np
import pytest

import vcid


def data(seed: int, k: int = 3, d: int = 4, rows: int = 30):
    rng = np.random.default_rng(seed)
    y = np.arange(rows) % k
    return (np.eye(k, d)[y] * 5 + rng.standard_normal((rows, d))).astype(np.float32), y


def test_finish_marks_the_run_and_refuses_later_pushes(daemon, run_id):
    x, y = data(1)
    with vcid.Monitor(address=daemon.address, run=run_id, num_classes=3, feature_dim=4) as mon:
        mon.push(x, y, epoch=0)
        mon.flush()
        with pytest.raises(vcid.VcidError) as err:
            mon.finish()
        assert err.value.code == "FAILED_PRECONDITION"
        assert "train/penultimate epoch 0" in err.value.message
        assert not mon.run_info().finished
        mon.close_epoch(0)
        info = mon.finish()
        assert info.finished and info.finished_unix_ms > 0 and info.closed_epochs == 1
        assert mon.finish().finished_unix_ms == info.finished_unix_ms
        with pytest.raises(vcid.VcidError) as err:
            mon.push(x, y, epoch=1)
            mon.flush()
        assert err.value.code == "FAILED_PRECONDITION"
        assert "finished" in err.value.message
        assert [r.epoch for r in mon.history()] == [0]


def test_finish_on_exit_only_after_a_clean_exit(daemon, run_id):
    x, y = data(2)
    with pytest.raises(RuntimeError):
        with vcid.Monitor(address=daemon.address, run=run_id + "-crash", num_classes=3, feature_dim=4, finish_on_exit=True) as mon:
            mon.push(x, y, epoch=0)
            mon.close_epoch(0)
            raise RuntimeError("training crashed")
    with vcid.Monitor(address=daemon.address, run=run_id + "-crash", num_classes=3, feature_dim=4) as check:
        assert not check.run_info().finished

    with vcid.Monitor(address=daemon.address, run=run_id, num_classes=3, feature_dim=4, finish_on_exit=True) as mon:
        mon.push(x, y, epoch=0)
        mon.close_epoch(0)
        assert not mon.run_info().finished
    with vcid.Monitor(address=daemon.address, run=run_id, num_classes=3, feature_dim=4) as check:
        info = check.run_info()
    assert info.finished and info.closed_epochs == 1
