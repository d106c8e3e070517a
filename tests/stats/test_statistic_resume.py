"""Resuming inside a statistics job: a block-by-block statistic (`fp_hessian`, `guided_hessian`) keeps its progress
beside its output (quantlib.stats.progress, as quantize does); a job failed after block k, started again, goes on
at block k+1 and writes the same bytes as an uninterrupted run (the manifest's `seconds` aside)."""

from __future__ import annotations

import json
import logging

import pytest
from conftest import sealed_model_dir, sealed_windows, statistic_files

from quantlib.artifacts.integrity import verify
from quantlib.jobs.steps import statistic
from quantlib.stats.progress import BlockProgress, partial_dir

CALIB = "tiny.c4.n6.L16"
COMPUTE = {"device": "cpu", "dtype": "float32"}


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Llama of four blocks, its calibration windows and its gradients artifact (the guided Hessian's input),
    each sealed like the workflow's."""
    root = tmp_path_factory.mktemp("stat-resume")
    model_dir = sealed_model_dir(root / "model")
    calib = sealed_windows(root, 6, 16)
    grads = root / "gradients"
    statistic("gradients.G2", CALIB, model_dir, calib, grads, COMPUTE)
    return model_dir, calib, {"gradients": grads}


CASES = {"fp_hessian": ("fp_hessian", False), "guided_hessian.g2": ("guided_hessian.g2", True)}


def run(setup, stat, out):
    model_dir, calib, inputs = setup
    statistic(stat, CALIB, model_dir, calib, out, COMPUTE, inputs=inputs if CASES[stat][1] else None)




@pytest.mark.parametrize("stat", list(CASES))
def test_a_statistic_failed_after_block_2_resumes_at_block_3_to_the_same_bytes(setup, stat, tmp_path, monkeypatch,
                                                                              caplog):
    reference = tmp_path / "reference"
    run(setup, stat, reference)
    out = tmp_path / "out"
    original = BlockProgress.finished

    def finished(self, i, report, streams=None):
        original(self, i, report, streams)
        if i + 1 == 2:
            raise Killed("killed after block 2")
    monkeypatch.setattr(BlockProgress, "finished", finished)
    with pytest.raises(Killed):
        run(setup, stat, out)
    monkeypatch.undo()
    assert not out.exists()
    record = json.loads((partial_dir(out) / "progress.json").read_text())
    assert record["last_finished_block"] == 2 and record["n_blocks"] == 4
    assert sorted(p.name for p in (partial_dir(out) / "checkpoint").iterdir()) == [
        "block0000.safetensors", "block0001.safetensors"]
    with caplog.at_level(logging.INFO, logger="quantlib"):
        run(setup, stat, out)
    assert "resuming at block 3 of 4" in caplog.text
    assert statistic_files(out) == statistic_files(reference)
    verify(out)
    assert not partial_dir(out).exists()


def test_progress_from_other_inputs_is_discarded(setup, tmp_path, monkeypatch, caplog):
    model_dir, calib, inputs = setup
    out = tmp_path / "out"
    original = BlockProgress.finished

    def finished(self, i, report, streams=None):
        original(self, i, report, streams)
        raise Killed("killed after block 1")
    monkeypatch.setattr(BlockProgress, "finished", finished)
    with pytest.raises(Killed):
        run(setup, "fp_hessian", out)
    monkeypatch.undo()
    other = sealed_windows(tmp_path, 6, 16, seed=1)
    with caplog.at_level(logging.INFO, logger="quantlib"):
        statistic("fp_hessian", CALIB, model_dir, other, out, COMPUTE)
    assert "discarding the progress" in caplog.text and "other inputs (calib)" in caplog.text
    assert "resuming" not in caplog.text
