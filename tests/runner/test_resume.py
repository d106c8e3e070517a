"""Resuming inside a quantize job (quantlib.stats.progress): a job that fails or is killed after block k keeps its
progress beside its output; started again, it goes on at block k+1 and writes the same bytes as an uninterrupted
run (all but the timing fields). Foreign or damaged progress is discarded, saying why."""

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
from conftest import REPO, assert_same_output, build_tokenizer, sealed_windows, tiny_model

from quantlib.artifacts.integrity import seal_dir
from quantlib.jobs.steps import quantize
from quantlib.stats import progress as progress_module
from quantlib.runner.group import QuantizedModelReport
from quantlib.stats.progress import BlockProgress, partial_dir

LDLQ = "tiny.toy.n8.L32.ldlq.w3g32"
RTN = "tiny.rtn.w4g32"
LSQ = "tiny.toy.n8.L32.lsq.w3g32.ep1"
# (name, compute): layer-wise in one pass and in chunks with disk streams, data-free, block-wise (both streams)
CASES = {
    "ldlq": (LDLQ, {}),
    "ldlq-chunks-disk": (LDLQ, {"calib_chunk_tokens": 64, "block_streams": "disk"}),
    "rtn": (RTN, {}),
    "lsq-disk": (LSQ, {"block_streams": "disk"}),
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama of four blocks with its tokenizer, sealed like a fetched model."""
    d = tmp_path_factory.mktemp("tiny-4")
    build_tokenizer(d)
    model = tiny_model("llama")
    model.config.num_hidden_layers = 4
    type(model)(model.config).eval().save_pretrained(d)
    seal_dir(d)
    return d


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    return sealed_windows(tmp_path_factory.mktemp("calib"))


def run(name, model_dir, calib, out, compute: dict | None = None) -> None:
    inputs = {"calib": calib} if ".n8." in name else {}
    quantize(name, model_dir, inputs, out, {"device": "cpu", "dtype": "float32", **(compute or {})})


@pytest.fixture(scope="module")
def references(tmp_path_factory, model_dir, calib):
    """Each case's output, quantized without interruption (made on first use)."""
    made = {}

    def get(case):
        if case not in made:
            name, compute = CASES[case]
            made[case] = tmp_path_factory.mktemp("reference") / name
            run(name, model_dir, calib, made[case], compute)
        return made[case]
    return get


class Killed(Exception):
    pass


def fail_after(monkeypatch, k: int) -> None:
    """The job fails right after block k's progress is recorded."""
    original = BlockProgress.finished

    def finished(self, i, report, streams=None):
        original(self, i, report, streams)
        if i + 1 == k:
            raise Killed(f"killed after block {k}")
    monkeypatch.setattr(BlockProgress, "finished", finished)






@pytest.mark.parametrize("case", list(CASES))
def test_a_job_failed_after_block_2_resumes_at_block_3_to_the_same_bytes(case, model_dir, calib, references,
                                                                        tmp_path, monkeypatch, caplog):
    name, compute = CASES[case]
    out = tmp_path / name
    fail_after(monkeypatch, 2)
    with pytest.raises(Killed):
        run(name, model_dir, calib, out, compute)
    monkeypatch.undo()
    assert not out.exists()
    record = json.loads((partial_dir(out) / "progress.json").read_text())
    assert record["identity"]["spec"] == name and record["n_blocks"] == 4 and record["last_finished_block"] == 2
    assert sorted(p.name for p in (partial_dir(out) / "checkpoint").iterdir()) == [
        "model-00001-of-00005.safetensors", "model-00002-of-00005.safetensors"]
    with caplog.at_level(logging.INFO, logger="quantlib"):
        run(name, model_dir, calib, out, compute)
    assert "resuming at block 3 of 4" in caplog.text
    assert "discarding" not in caplog.text
    assert_same_output(out, references(case))
    assert not partial_dir(out).exists()


def test_a_job_failed_after_its_last_block_writes_only_the_output(model_dir, calib, references, tmp_path, monkeypatch,
                                                                  caplog):
    out = tmp_path / LDLQ
    fail_after(monkeypatch, 4)
    with pytest.raises(Killed):
        run(LDLQ, model_dir, calib, out)
    monkeypatch.undo()
    with caplog.at_level(logging.INFO, logger="quantlib"):
        run(LDLQ, model_dir, calib, out)
    assert "all 4 blocks were finished by an earlier attempt" in caplog.text
    assert_same_output(out, references("ldlq"))


def test_a_job_killed_in_block_3_resumes_there(model_dir, calib, references, tmp_path, monkeypatch, caplog):
    # A real SIGKILL, while block 3 is being finished: its shard is written, its progress not yet recorded. Both
    # processes take the same code version (an edit of quantlib's sources in between, by a colleague working in
    # the same checkout, would rightly make the progress foreign).
    monkeypatch.setattr(progress_module, "code_version", lambda: "pinned")
    out = tmp_path / LDLQ
    script = textwrap.dedent(f"""
        import os, signal
        import quantlib.stats.progress
        from quantlib.checkpoint.writer import CheckpointWriter
        from quantlib.jobs.steps import quantize
        quantlib.stats.progress.code_version = lambda: "pinned"
        original = CheckpointWriter.write_block

        def write_block(self, i, prefix, state):
            original(self, i, prefix, state)
            if i == 2:
                os.kill(os.getpid(), signal.SIGKILL)

        CheckpointWriter.write_block = write_block
        quantize({LDLQ!r}, {str(model_dir)!r}, {{"calib": {str(calib)!r}}}, {str(out)!r},
                 {{"device": "cpu", "dtype": "float32"}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert not out.exists()
    assert (partial_dir(out) / "checkpoint" / "model-00003-of-00005.safetensors").exists()  # written, unrecorded
    with caplog.at_level(logging.INFO, logger="quantlib"):
        run(LDLQ, model_dir, calib, out)
    assert "resuming at block 3 of 4" in caplog.text
    assert_same_output(out, references("ldlq"))
    assert not partial_dir(out).exists()


def _discarded(model_dir, calib, out, caplog, name=LDLQ) -> str:
    with caplog.at_level(logging.INFO, logger="quantlib"):
        run(name, model_dir, calib, out)
    assert "resuming" not in caplog.text
    (line,) = [r.getMessage() for r in caplog.records if "discarding the progress" in r.getMessage()]
    assert line.endswith("starting at block 1 of 4")
    return line


def test_progress_of_another_spec_is_discarded(model_dir, calib, references, tmp_path, monkeypatch, caplog):
    out = tmp_path / "output"
    fail_after(monkeypatch, 2)
    with pytest.raises(Killed):
        run(RTN, model_dir, calib, out)  # another spec's progress at this output path
    monkeypatch.undo()
    line = _discarded(model_dir, calib, out, caplog)
    assert f"it was made for another spec ({RTN}, not {LDLQ})" in line
    assert_same_output(out, references("ldlq"))
    assert not partial_dir(out).exists()


def test_progress_of_another_code_version_is_discarded(model_dir, calib, references, tmp_path, monkeypatch, caplog):
    out = tmp_path / LDLQ
    fail_after(monkeypatch, 2)
    with pytest.raises(Killed):
        run(LDLQ, model_dir, calib, out)
    monkeypatch.undo()
    monkeypatch.setattr(progress_module, "code_version", lambda: "edited-code")
    assert "another version of the code" in _discarded(model_dir, calib, out, caplog)
    assert_same_output(out, references("ldlq"))


def test_progress_of_other_settings_or_damaged_is_discarded(model_dir, calib, references, tmp_path, monkeypatch,
                                                            caplog):
    out = tmp_path / LDLQ
    fail_after(monkeypatch, 2)
    with pytest.raises(Killed):
        run(LDLQ, model_dir, calib, out, {"seed": 7})
    monkeypatch.undo()
    assert "it was made from other compute settings (seed)" in _discarded(model_dir, calib, out, caplog)
    assert_same_output(out, references("ldlq"))

    out = tmp_path / "damaged"
    fail_after(monkeypatch, 2)
    with pytest.raises(Killed):
        run(LDLQ, model_dir, calib, out)
    monkeypatch.undo()
    (stream,) = (partial_dir(out) / "state-2").glob("hidden-*.pt")
    stream.write_bytes(stream.read_bytes()[:-8] + b"damaged!")
    caplog.clear()
    assert "state-2/hidden-00000.pt does not match its checksum" in _discarded(model_dir, calib, out, caplog)
    assert_same_output(out, references("ldlq"))


def test_a_job_failing_before_any_block_is_finished_leaves_nothing(model_dir, calib, tmp_path, monkeypatch):
    out = tmp_path / LDLQ
    def begin(self, n_blocks, report):
        raise Killed("before block 1")
    monkeypatch.setattr(BlockProgress, "begin", begin)
    with pytest.raises(Killed):
        run(LDLQ, model_dir, calib, out)
    assert sorted(os.listdir(tmp_path)) == []


def test_the_random_generators_go_on_as_if_uninterrupted(tmp_path):
    report = QuantizedModelReport()
    first = BlockProgress(tmp_path / "out", "spec")
    first.checkpoint.mkdir(parents=True)
    assert first.begin(3, report) == 0
    torch.manual_seed(3)
    first.finished(0, report)
    want = torch.rand(4), torch.randint(0, 100, (3,))
    torch.manual_seed(99)  # another process, another state
    again = BlockProgress(tmp_path / "out", "spec")
    assert again.begin(3, QuantizedModelReport()) == 1
    assert again.restore("memory", None, "cpu") == {}
    got = torch.rand(4), torch.randint(0, 100, (3,))
    assert all(torch.equal(a, b) for a, b in zip(got, want))
