"""Resuming inside a distillation job (quantlib.stats.progress.StepProgress through quantlib.runner.training.train):
the training's state is kept every few steps; a job killed after step k, started again, goes on at step k+1 (mid
epoch, or at an epoch's start) and writes the same bytes as an uninterrupted run (all but the timing fields).
Foreign progress (another spec, other inputs) is discarded, saying why."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import REPO, assert_same_output, calib_tokens, tiny_model

from quantlib.artifacts.integrity import seal_file
from quantlib.catalog.spec import QuantSpec
from quantlib.checkpoint.writer import save_quantized
from quantlib.jobs.steps import distill
from quantlib.stats import progress as progress_module
from quantlib.stats.progress import KILL_AFTER_STEP, StepProgress, partial_dir
from quantlib.runner.walk import quantize_model

NAME = "tiny.rtn.w3g32.kd.c4.n8.L32.bs2.ep2.lr0p001"  # 4 steps an epoch, 8 in all
COMPUTE = {"device": "cpu", "dtype": "float32", "seed": 0}


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_dir):
    """An RTN w3g32 checkpoint of the tiny Llama and 8 windows (and 8 others) to distil on."""
    root = tmp_path_factory.mktemp("kd-resume")
    spec = QuantSpec.parse("tiny.rtn.w3g32")
    model = tiny_model("llama")
    save_quantized(model, spec, quantize_model(model, spec, None, progress=False), root / "base", tiny_dir)
    for name, seed in (("windows.pt", 4), ("other.pt", 5)):
        torch.save(calib_tokens(8, 32, seed=seed), root / name)
        seal_file(root / name, root / name)
    return root


def run(base, tiny_dir, out, name=NAME, windows="windows.pt", **kw):
    distill(name, tiny_dir, {"base": base / "base", "calib": base / windows}, out, COMPUTE, **kw)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, base, tiny_dir):
    out = tmp_path_factory.mktemp("kd-reference") / NAME
    run(base, tiny_dir, out)
    return out






def fail_after(monkeypatch, k: int) -> None:
    """The job fails right after step k is done (and recorded, when it is a step that keeps the state)."""
    original = StepProgress.step_finished

    def step_finished(self, step, snapshot):
        original(self, step, snapshot)
        if step == k:
            raise Killed(f"killed after step {k}")
    monkeypatch.setattr(StepProgress, "step_finished", step_finished)


def test_a_job_killed_after_step_3_resumes_at_step_4_to_the_same_bytes(base, tiny_dir, reference, tmp_path,
                                                                      monkeypatch, caplog):
    # A real SIGKILL (the job's own test hook) mid epoch, once step 3's state is kept (every 3 steps); both processes
    # take the same code version (an edit of quantlib's sources in between would rightly make the progress foreign).
    monkeypatch.setattr(progress_module, "code_version", lambda: "pinned")
    out = tmp_path / NAME
    script = textwrap.dedent(f"""
        import quantlib.stats.progress
        from quantlib.jobs.steps import distill
        quantlib.stats.progress.code_version = lambda: "pinned"
        distill({NAME!r}, {str(tiny_dir)!r}, {{"base": {str(base / "base")!r}, "calib": {str(base / "windows.pt")!r}}},
                {str(out)!r}, {COMPUTE!r}, save_every=3)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, KILL_AFTER_STEP: "3"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert not out.exists()
    record = json.loads((partial_dir(out) / "progress.json").read_text())
    assert record["identity"]["spec"] == NAME and record["n_steps"] == 8 and record["last_finished_step"] == 3
    assert sorted(p.name for p in (partial_dir(out) / "state-3").iterdir()) == ["state.json", "training.pt"]
    with caplog.at_level(logging.INFO, logger="quantlib"):
        run(base, tiny_dir, out)  # kept every 8 steps now: how often is no part of what the run computes
    assert "resuming at step 4 of 8" in caplog.text and "discarding" not in caplog.text
    assert_same_output(out, reference)
    assert not partial_dir(out).exists()


@pytest.mark.parametrize("k", [4, 8])
def test_a_job_failed_at_an_epochs_end_or_after_training_resumes_to_the_same_bytes(base, tiny_dir, reference, k,
                                                                                   tmp_path, monkeypatch, caplog):
    out = tmp_path / NAME
    fail_after(monkeypatch, k)
    with pytest.raises(Killed):
        run(base, tiny_dir, out, save_every=4)
    monkeypatch.undo()
    with caplog.at_level(logging.INFO, logger="quantlib"):
        run(base, tiny_dir, out)
    assert ("all 8 steps were finished by an earlier attempt" if k == 8 else "resuming at step 5 of 8") in caplog.text
    assert_same_output(out, reference)


def test_progress_of_another_spec_or_other_inputs_is_discarded(base, tiny_dir, reference, tmp_path, monkeypatch,
                                                               caplog):
    out = tmp_path / "out"
    other = "tiny.rtn.w3g32.kd.c4.n8.L32.bs2.ep2.lr0p0001"
    fail_after(monkeypatch, 2)
    with pytest.raises(Killed):
        run(base, tiny_dir, out, name=other, save_every=1)
    monkeypatch.undo()
    with caplog.at_level(logging.INFO, logger="quantlib"):
        run(base, tiny_dir, out)
    assert "resuming" not in caplog.text
    (line,) = [r.getMessage() for r in caplog.records if "discarding the progress" in r.getMessage()]
    assert f"it was made for another spec ({other}, not {NAME})" in line and line.endswith("at step 1 of 8")
    assert_same_output(out, reference)
    assert not partial_dir(out).exists()

    out = tmp_path / "other-inputs"
    fail_after(monkeypatch, 2)
    with pytest.raises(Killed):
        run(base, tiny_dir, out, windows="other.pt", save_every=1)
    monkeypatch.undo()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="quantlib"):
        run(base, tiny_dir, out)
    assert "discarding the progress" in caplog.text and "other inputs (calib)" in caplog.text
    assert "resuming" not in caplog.text
    assert_same_output(out, reference)
