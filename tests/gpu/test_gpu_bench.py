"""benchmarks/gpu_bench.py on a machine without a GPU: it says it measured nothing and exits 0; its tables of shapes,
bandwidths and kernels, its records and its plain-text table are right; `--cpu-smoke` runs every part at toy shapes
through the library's entry points (the runner, the checkpoint and pack writers, the packed loader)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from quantlib.catalog.pack_formats import PACK_FORMATS
from quantlib.catalog.spec import QuantSpec

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_bench  # noqa: E402

SCRIPT = REPO / "benchmarks" / "gpu_bench.py"


def test_without_cuda_it_measures_nothing_and_exits_0(tmp_path):
    record = tmp_path / "records.jsonl"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--record", str(record)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == gpu_bench.NO_CUDA == "no CUDA device; nothing measured"
    assert not record.exists()


def test_main_without_cuda(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_bench.main(["--parts", "gemv", "--record", str(tmp_path / "r.jsonl")]) == 0
    assert capsys.readouterr().out.strip() == gpu_bench.NO_CUDA


def test_shapes_are_llama_2s():
    assert [s[1:] for s in gpu_bench.gemv_shapes("7b")] == [(4096, 4096), (11008, 4096), (4096, 11008)]
    assert [s[1:] for s in gpu_bench.gemv_shapes("70b")] == [(8192, 8192), (28672, 8192), (8192, 28672)]
    cfg = gpu_bench.llama_config("70b", 1)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        8192, 28672, 64, 8)


@pytest.mark.parametrize("name,tbps", [("NVIDIA H100 80GB HBM3", 3.35), ("NVIDIA H100 PCIe", 2.0),
                                       ("NVIDIA H100 NVL", 3.9), ("NVIDIA H200", 4.8), ("NVIDIA GH200 480GB", 4.0),
                                       ("NVIDIA A100-SXM4-80GB", 2.039), ("NVIDIA A100 80GB PCIe", 1.935),
                                       ("NVIDIA A100-PCIE-40GB", 1.555), ("NVIDIA A10G", 0.6),
                                       ("NVIDIA L40S", 0.864), ("NVIDIA L4", 0.3), ("Some Future GPU", None)])
def test_peak_bandwidth_by_device_name(name, tbps):
    assert gpu_bench.peak_bandwidth_tbps(name) == tbps


def test_every_pack_format_has_its_kernel():
    assert set(gpu_bench.FORMAT_KERNELS) == set(PACK_FORMATS)
    assert {k for k, _, _ in gpu_bench.FORMAT_KERNELS.values()} <= {"uniform", "lut", "bcq"}
    spec = QuantSpec.parse(gpu_bench.quantize_name(4, 128, 32, 512))
    assert (spec.solver, spec.bits, spec.group_size, spec.calib.nsamples, spec.calib.seqlen) == (
        "ldlq", 4, 128, 32, 512)


def test_copies_beyond_cache_and_bandwidth_row():
    assert gpu_bench.copies_beyond_cache(32 << 20, 50 << 20) == 4  # 7B's 4096x4096 fp16 against an H100's L2
    assert gpu_bench.copies_beyond_cache(470 << 20, 50 << 20) == 2
    assert gpu_bench.copies_beyond_cache(1 << 10, 50 << 20) == 16
    row = gpu_bench.bandwidth_row({}, 1e-5, 3 * 10 ** 7, 3.0, 2.5)
    assert row["us"] == pytest.approx(10) and row["gbps"] == pytest.approx(3000)
    assert row["of_peak"] == pytest.approx(1.0) and row["of_copy"] == pytest.approx(1.2)
    assert gpu_bench.bandwidth_row({}, 1e-5, 1, None, None)["of_peak"] is None


def test_record_and_table():
    rows = [{"format": "ct", "us": 12.3456, "gbps": 1234.5}, {"format": "fp16 cuBLAS", "us": 40.0}]
    info = {"device": "NVIDIA H100 80GB HBM3", "peak_bandwidth_tbps": 3.35}
    record = gpu_bench.make_record("gemv", rows, info, {"models": ["7b"]}, 12.34)
    assert record["benchmark"] == "gpu_gemv" and record["rows"] == rows and record["device"] == info["device"]
    assert {"machine", "threads", "date", "versions", "settings", "seconds"} <= record.keys()
    assert "error" not in record and json.loads(json.dumps(record)) == record
    assert "error" in gpu_bench.make_record("decode", [], info, {}, 0.0, "Traceback ...")
    table = gpu_bench.format_table(rows, ["format", "us", "gbps"]).splitlines()
    assert table[0].split() == ["format", "us", "gbps"] and len(table) == 4
    assert table[2].split() == ["ct", "12.35", "1234"] and table[3].split() == ["fp16", "cuBLAS", "40"]


def test_solve_seconds_count_a_subgroup_once():
    layers = {f"model.layers.0.self_attn.{n}": {"seconds": s} for n, s in (("q_proj", 1.0), ("k_proj", 1.5),
                                                                           ("v_proj", 2.0), ("o_proj", 0.5))}
    layers.update({f"model.layers.0.mlp.{n}": {"seconds": s} for n, s in (("gate_proj", 3.0), ("up_proj", 4.0),
                                                                         ("down_proj", 1.0))})
    assert sum(gpu_bench._solve_seconds(layers).values()) == pytest.approx(2.0 + 0.5 + 4.0 + 1.0)


def test_cpu_smoke_runs_every_part(tmp_path, capsys):
    """Toy shapes, torch kernels: two pack formats (anyprec needs the per-channel source, ct the grouped one)."""
    record = tmp_path / "records.jsonl"
    assert gpu_bench.main(["--cpu-smoke", "--formats", "anyprec", "ct", "--record", str(record)]) == 0
    out = capsys.readouterr().out
    records = [json.loads(line) for line in record.read_text().splitlines()]
    assert [r["benchmark"] for r in records] == ["gpu_gemv", "gpu_quantize", "gpu_decode"]
    assert not any("error" in r for r in records)
    gemv, quantize, decode = (r["rows"] for r in records)
    assert [r["format"] for r in gemv] == ["dense torch", "anyprec", "ct"] * 3
    assert all(r["us"] > 0 and r["gbps"] > 0 for r in gemv)
    assert quantize[0]["seconds_per_block"] > 0 and 0 < quantize[0]["mean_rel_error"] < 0.1
    assert [r["format"] for r in decode] == ["fp16 dense", "anyprec", "ct"]
    assert [r.get("source") for r in decode] == [None, "synthetic.rtn.w4", "synthetic.rtn.w4g128"]
    assert all(r["tokens_per_s"] > 0 for r in decode)
    assert "tokens_per_s" in out and "seconds_per_block" in out
