"""Resuming inside a `gradients` job (quantlib.stats.progress, a walk from the last block to the first): a job
killed once the backward has gone through blocks 4 and 3 of 4, started again, recomputes the forward up to block 2,
takes the saved gradients flowing into block 2's output and goes on there, to the same bytes as an uninterrupted run
(the manifest's `seconds` aside); foreign progress is discarded, saying why."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO, sealed_model_dir, sealed_windows, statistic_files

from quantlib.artifacts.integrity import verify
from quantlib.jobs.steps import statistic
from quantlib.stats import progress as progress_module
from quantlib.stats.progress import KILL_AFTER_BLOCK, BlockProgress, partial_dir

CALIB = "tiny.c4.n6.L16"
STAT = "gradients.G2"
COMPUTE = {"device": "cpu", "dtype": "float32"}
STREAMS = {"memory": COMPUTE, "disk": {**COMPUTE, "block_streams": "disk"}}


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Llama of four blocks and its calibration windows, sealed like the workflow's."""
    root = tmp_path_factory.mktemp("grad-resume")
    model_dir = sealed_model_dir(root / "model")
    return model_dir, sealed_windows(root, 6, 16)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, setup):
    """The artifact computed without interruption, per stream placement (made on first use)."""
    made = {}

    def get(streams):
        if streams not in made:
            made[streams] = tmp_path_factory.mktemp("reference") / STAT
            statistic(STAT, CALIB, *setup, made[streams], STREAMS[streams])
        return made[streams]
    return get




def fail_after(monkeypatch, block: int) -> None:
    """The job fails right after block `block`'s (numbered from 1) progress is recorded."""
    original = BlockProgress.finished

    def finished(self, i, report, streams=None, extra=None):
        original(self, i, report, streams, extra)
        if i + 1 == block:
            raise Killed(f"killed after block {block}")
    monkeypatch.setattr(BlockProgress, "finished", finished)


@pytest.mark.parametrize("streams", list(STREAMS))
def test_a_job_killed_after_blocks_4_and_3_resumes_at_block_2_to_the_same_bytes(setup, reference, streams, tmp_path,
                                                                                 monkeypatch, caplog):
    # A real SIGKILL (the job's own test hook) once block 3's progress is recorded; both processes take the same
    # code version (an edit of quantlib's sources in between would rightly make the progress foreign).
    monkeypatch.setattr(progress_module, "code_version", lambda: "pinned")
    model_dir, calib = setup
    out = tmp_path / STAT
    script = textwrap.dedent(f"""
        import quantlib.stats.progress
        from quantlib.jobs.steps import statistic
        quantlib.stats.progress.code_version = lambda: "pinned"
        statistic({STAT!r}, {CALIB!r}, {str(model_dir)!r}, {str(calib)!r}, {str(out)!r}, {STREAMS[streams]!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, KILL_AFTER_BLOCK: "3"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert not out.exists()
    record = json.loads((partial_dir(out) / "progress.json").read_text())
    assert record["last_finished_block"] == 2 and record["n_blocks"] == 4 and record["order"] == "backward"
    assert sorted(p.name for p in (partial_dir(out) / "checkpoint").iterdir()) == [
        "block0002.safetensors", "block0003.safetensors"]
    assert [p.name for p in (partial_dir(out) / "state-2").glob("grad-*.pt")]  # block 2's output gradients
    with caplog.at_level(logging.INFO, logger="quantlib"):
        statistic(STAT, CALIB, model_dir, calib, out, STREAMS[streams])
    assert "resuming at block 2 of 4" in caplog.text and "discarding" not in caplog.text
    assert statistic_files(out) == statistic_files(reference(streams))
    verify(out)
    assert not partial_dir(out).exists()


def test_a_job_failed_after_its_last_block_writes_only_the_manifest(setup, reference, tmp_path, monkeypatch, caplog):
    out = tmp_path / STAT
    fail_after(monkeypatch, 1)  # the backward's last block
    with pytest.raises(Killed):
        statistic(STAT, CALIB, *setup, out, COMPUTE)
    monkeypatch.undo()
    with caplog.at_level(logging.INFO, logger="quantlib"):
        statistic(STAT, CALIB, *setup, out, COMPUTE)
    assert "all 4 blocks were finished by an earlier attempt" in caplog.text
    assert statistic_files(out) == statistic_files(reference("memory"))


def test_progress_of_another_spec_or_other_inputs_is_discarded(setup, reference, tmp_path, monkeypatch, caplog):
    model_dir, calib = setup
    out = tmp_path / "out"
    fail_after(monkeypatch, 2)
    with pytest.raises(Killed):
        statistic("fp_hessian", CALIB, model_dir, calib, out, COMPUTE)  # a forward walk's progress at this path
    monkeypatch.undo()
    with caplog.at_level(logging.INFO, logger="quantlib"):
        statistic(STAT, CALIB, model_dir, calib, out, COMPUTE)
    assert "resuming" not in caplog.text
    (line,) = [r.getMessage() for r in caplog.records if "discarding the progress" in r.getMessage()]
    assert f"another spec (fp_hessian:{CALIB}, not {STAT}:{CALIB})" in line and line.endswith("at block 4 of 4")
    assert statistic_files(out) == statistic_files(reference("memory"))
    assert not partial_dir(out).exists()

    out = tmp_path / "other-inputs"
    fail_after(monkeypatch, 3)
    with pytest.raises(Killed):
        statistic(STAT, CALIB, model_dir, calib, out, COMPUTE)
    monkeypatch.undo()
    caplog.clear()
    other = sealed_windows(tmp_path, 6, 16, seed=1)
    with caplog.at_level(logging.INFO, logger="quantlib"):
        statistic(STAT, CALIB, model_dir, other, out, COMPUTE)
    assert "discarding the progress" in caplog.text and "other inputs (calib)" in caplog.text
    assert "resuming" not in caplog.text
