"""The Snakemake workflow end to end on a tiny model, its refusals of bad input, lint and dry runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, build_tokenizer, tiny_model

SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")


def snakemake(workdir: Path, *args, offline: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if offline:
            env[var] = "1"
        else:
            env.pop(var, None)
    cmd = [SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def tiny_config(model_dir: Path, text_files: dict, task_files: dict | None = None) -> dict:
    cfg = {
        "resources": "resources",
        "models": {"tiny": {"source": str(model_dir), "label": "Tiny Llama", "params_b": 0.001}},
        "datasets": {
            "toytest": {"path": "json", "data_files": str(text_files["test"]), "join": "\n\n", "label": "Toy"},
            "toytrain": {"path": "json", "data_files": str(text_files["train"])},
        },
        "run_models": ["tiny"],
        "calibration": {"dataset": "toytrain", "nsamples": 8, "seqlen": 32, "seed": 0},
        "perplexity": {"seqlen": 32, "batch_size": 4, "datasets": {"toytest": {"max_windows": 8}}},
        "methods": [
            {"id": "rtn", "label": "RTN", "solver": "rtn", "bits": [4], "group_size": [32]},
            {"id": "ldlq", "label": "LDLQ", "solver": "ldlq", "bits": [4, 3], "group_size": [32, -1]},
        ],
        "tables": {"main": {"title": "Tiny table"}},
    }
    if task_files:
        # Zero-shot on local copies for two rows only: each lm-eval job costs an import and a model load.
        cfg["lm_eval"] = {"batch_size": 4, "tasks": {
            "piqa": {"limit": 8, "label": "PIQA", "source": {"data_files": str(task_files["piqa"])}},
            "winogrande": {"limit": 6, "source": {"data_files": str(task_files["winogrande"]), "split": "validation"}},
        }}
        cfg["tables"]["zeroshot"] = {
            "title": "Tiny zero-shot", "rows": ["fp", "rtn"], "layout": "wide",
            "metrics": ["toytest", "piqa.acc_norm", "winogrande.acc_norm|acc", "avg"],
            "averages": {"avg": {"label": "Avg", "of": ["piqa.acc", "winogrande.acc"]}},
            "paper": {"tiny": {"fp": {"toytest": 250.0, "avg": 50.0}}},
        }
    return cfg


def write_config(workdir: Path, cfg: dict) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump(cfg))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_dir, text_files, task_files):
    work = tmp_path_factory.mktemp("wf")
    write_config(work, tiny_config(tiny_dir, text_files, task_files))
    proc = snakemake(work, "--cores", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work


def test_end_to_end_tiny(tiny_run):
    work = tiny_run
    table = (work / "results/tables/main.md").read_text()
    for label in ("FP (unquantized)", "RTN", "LDLQ", "per-channel"):
        assert label in table
    rows = [line for line in table.splitlines() if line.startswith("| ") and "Method" not in line]
    assert len(rows) == 1 + 1 + 4  # FP, RTN w4g32, LDLQ x {w4g32, w4, w3g32, w3}
    assert "first 8 of" in table and "of 32 tokens" in table  # the protocol is printed
    csv = (work / "results/tables/main.csv").read_text().splitlines()
    assert csv[0].startswith("model,method,setting,bits,group,metric,value,paper,delta")
    record = json.loads((work / "results/ppl/toytest.L32.nw8/tiny.toytrain.n8.L32.ldlq.w3.json").read_text())
    assert record["protocol"]["windows"] == 8 and record["protocol"]["tokens_scored"] == 8 * 31
    assert record["protocol"]["join"] == "\n\n" and "torch" in record["versions"]
    qdir = work / "results/quantized/tiny.toytrain.n8.L32.ldlq.w3"
    assert {"config.json", "model.safetensors.index.json", "model-00001-of-00003.safetensors", "quant_spec.json",
            "diagnostics.json"} <= {p.name for p in qdir.iterdir()}
    for rule in ("fetch_model", "fetch_dataset", "calibration", "eval_windows", "quantize", "perplexity", "lmeval",
                 "table"):
        assert any((work / "results/logs" / rule).rglob("*.log")), rule
        assert any((work / "results/benchmarks" / rule).rglob("*.tsv")), rule
    for ext in ("md", "csv", "tex", "png"):
        assert (work / f"results/tables/main.{ext}").stat().st_size > 0
    bench = (work / "results/benchmarks/summary.csv").read_text()
    assert bench.startswith("rule,job,s,") and "quantize,tiny.toytrain.n8.L32.ldlq.w3," in bench
    # nothing is left half-written
    assert not list(work.rglob(".*.tmp-*"))


def test_zero_shot_columns(tiny_run):
    work = tiny_run
    # lm-eval ran for the zero-shot table's rows only
    assert sorted(p.name for p in (work / "results/lmeval/piqa.0shot.lim8").iterdir()) == [
        "tiny.fp.json", "tiny.rtn.w4g32.json"]
    record = json.loads((work / "results/lmeval/piqa.0shot.lim8/tiny.rtn.w4g32.json").read_text())
    assert record["limit"] == 8 and record["docs"] == 8 and record["docs_available"] == 12
    assert {"acc", "acc_norm", "acc_stderr", "acc_norm_stderr"} <= set(record) and record["lm_eval"]
    assert record["source"]["origin"] == "local" and record["source"]["eval_split"] == "validation"
    wino = json.loads((work / "results/lmeval/winogrande.0shot.lim6/tiny.fp.json").read_text())
    assert wino["acc_norm"] is None and wino["docs"] == 6
    table = (work / "results/tables/zeroshot.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| Method"))
    assert "w4g32 PIQA acc_norm ↑" in header and "w4g32 winogrande acc ↑" in header and "Avg paper" in header
    fp_row = next(line for line in table.splitlines() if line.startswith("| FP"))
    expected_avg = 100 * (json.loads((work / "results/lmeval/piqa.0shot.lim8/tiny.fp.json").read_text())["acc"]
                          + wino["acc"]) / 2
    assert f"{expected_avg:.2f}" in fp_row.split(" | ")
    assert "first 8 of 12 documents of the validation split, local copy piqa.jsonl" in table
    assert (work / "results/tables/zeroshot.png").read_bytes()[:4] == b"\x89PNG"


def test_report_holds_the_tables(tiny_run, tmp_path):
    import base64
    import re

    report = tmp_path / "report.html"
    proc = snakemake(tiny_run, "--report", str(report))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    html = report.read_text()
    files = {m.group(1): base64.b64decode(m.group(2)) for m in re.finditer(
        r"data:[a-z/.+-]+;charset=[^;]+;filename=([^;]+);base64,([A-Za-z0-9+/=]+)", html)}
    assert {"main.md", "main.csv", "main.png", "zeroshot.md", "zeroshot.png", "summary.csv", "summary.png"} <= set(files)
    assert files["main.md"].decode() == (tiny_run / "results/tables/main.md").read_text()
    assert files["zeroshot.png"][:4] == b"\x89PNG"
    assert "Paper tables" in html and "Benchmarks" in html


def test_report_after_a_one_table_run(tiny_run, tmp_path):
    """With only the main table built, the report of that table and its benchmark summary (README, "Report")."""
    import base64
    import re

    work = tmp_path / "copy"
    shutil.copytree(tiny_run, work, symlinks=True)
    for f in [*(work / "results/tables").glob("zeroshot.*"), *(work / "results/benchmarks").glob("summary*")]:
        f.unlink()
    proc = snakemake(work, "--cores", "1", "results/benchmarks/summary.main.csv")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = tmp_path / "report.html"
    proc = snakemake(work, "--report", str(report), "results/tables/main.md", "results/benchmarks/summary.main.csv")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    files = {m.group(1): base64.b64decode(m.group(2)) for m in re.finditer(
        r"data:[a-z/.+-]+;charset=[^;]+;filename=([^;]+);base64,([A-Za-z0-9+/=]+)", report.read_text())}
    assert {"main.md", "main.png", "summary.main.csv"} <= set(files)
    assert b"quantize," in files["summary.main.csv"]


def test_console_shows_progress_and_results_keep_the_umask(tiny_run, tmp_path):
    """A quantize job prints a line per block on the console (not only in its log), and its files follow the
    umask."""
    work = tmp_path / "copy"
    shutil.copytree(tiny_run, work, symlinks=True)
    proc = snakemake(work, "--cores", "2", "results/quantized/tiny.toytrain.n8.L32.ldlq.w2g32")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-2000:]
    assert "[quantize tiny.toytrain.n8.L32.ldlq.w2g32] block 1/2 quantized" in out
    assert "[quantize tiny.toytrain.n8.L32.ldlq.w2g32] block 2/2 quantized" in out
    qdir = work / "results/quantized/tiny.toytrain.n8.L32.ldlq.w2g32"
    assert (qdir / "model-00001-of-00003.safetensors").stat().st_mode & 0o044 == 0o044  # group and others can read (umask 022)


def test_unreachable_hub_fails_in_seconds_naming_the_offline_overlay(tmp_path):
    """A hub id with no network: before any download, at DAG time, with the ways around it (not after retries)."""
    import time

    shutil.copy(REPO / "config.yaml", tmp_path / "config.yaml")
    env_endpoint = dict(os.environ, HF_ENDPOINT="http://127.0.0.1:9")  # a closed port on this machine
    cmd = [SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path), "--cores", "1"]
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        env_endpoint.pop(var, None)
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env_endpoint, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and time.time() - t0 < 60
    assert "Hugging Face hub, which cannot be reached" in out and "--configfile config.yaml tests/offline.yaml" in out
    assert not (tmp_path / "resources").exists()


def test_broken_result_fails_the_table_rule_naming_the_file(tiny_run, tmp_path):
    work = tmp_path / "copy"
    shutil.copytree(tiny_run, work, symlinks=True)
    broken = "results/lmeval/piqa.0shot.lim8/tiny.fp.json"
    (work / broken).write_text('{"task": "piqa", "acc": 0.5')
    proc = snakemake(work, "--cores", "1", "results/tables/zeroshot.md")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"[table] DataError: result file {broken} is not valid JSON" in out
    assert "Traceback" not in out and "pandas" not in out
    assert not (work / "results/tables/zeroshot.md").exists()
    (work / broken).write_text('{"task": "piqa"}')
    proc = snakemake(work, "--cores", "1", "results/tables/zeroshot.md")
    assert f"result file {broken} has no 'metrics' of an lm-eval task" in proc.stdout + proc.stderr


def test_rerun_is_a_no_op(tiny_run):
    proc = snakemake(tiny_run, "-n", "--cores", "2")
    assert proc.returncode == 0 and "Nothing to be done" in proc.stdout + proc.stderr


def test_settings_that_make_no_result_rerun_nothing(tiny_run, tmp_path, text_files):
    """The rules pass each job only what makes its result: the chunk size of calibration forwards, or a dataset
    used only for calibration, is no input of any finished quantize or perplexity job, and a method with a group size
    no other method uses (which the model's fetch checks) refetches nothing."""
    work = tmp_path / "copy"
    shutil.copytree(tiny_run, work, symlinks=True)
    cfg = yaml.safe_load((work / "config.yaml").read_text())
    cfg["compute"] = {"calib_chunk_tokens": 64, "block_streams": "disk"}
    cfg["datasets"]["toycalib"] = {"path": "json", "data_files": str(text_files["train"]), "label": "calib only"}
    cfg["methods"].append({"id": "ldlq_other", "solver": "ldlq", "bits": [4], "group_size": [32],
                           "calibration": {"dataset": "toycalib", "nsamples": 8, "seqlen": 32}})
    cfg["methods"].append({"id": "rtn_g16", "solver": "rtn", "bits": [4], "group_size": [16]})
    cfg["tables"]["main"]["rows"] = ["fp", "rtn", "ldlq"]  # what the table had by default: no new row
    write_config(work, cfg)
    proc = snakemake(work, "-n", "--cores", "2", "results/tables/main.md", "results/tables/zeroshot.md")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Nothing to be done" in proc.stdout + proc.stderr, proc.stdout[-3000:]
    # ... while a setting that does make results reruns what it makes
    cfg["compute"]["seed"] = 1
    write_config(work, cfg)
    proc = snakemake(work, "-n", "--cores", "2", "results/tables/main.md")
    assert "quantize" in proc.stdout and "perplexity" not in proc.stdout.split("Job stats")[0].split("rule quantize")[0]


def test_fp_statistics_and_block_wise_methods_run_end_to_end(tiny_run, tmp_path):
    """A spec that reads a statistic of the FP model (`fpin`) gets a `stats` job, shared by every such spec, and a
    block-wise method runs through the same quantize rule; both evaluate like any other model."""
    work = tmp_path / "copy"
    shutil.copytree(tiny_run, work, symlinks=True)
    names = ["tiny.toytrain.n8.L32.ldlq.w3g32.fpin", "tiny.toytrain.n8.L32.rtn.neuqi_int.w3g32.fpin",
             "tiny.toytrain.n8.L32.lsq.w3g32"]
    targets = [f"results/ppl/toytest.L32.nw8/{n}.json" for n in names]
    proc = snakemake(work, "-n", "--cores", "2", *targets)
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.count("rule stats:") == 1 and "results/stats/fp_hessian/tiny.toytrain.n8.L32" in out
    assert out.count("rule quantize:") == 3 and "rule calibration:" not in out  # the windows exist already
    proc = snakemake(work, "--cores", "2", *targets)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    manifest = json.loads((work / "results/stats/fp_hessian/tiny.toytrain.n8.L32/manifest.json").read_text())
    assert manifest["model"] == "tiny" and manifest["calib"] == "tiny.toytrain.n8.L32" and manifest["blocks"] == 2
    for name in names:
        record = json.loads((work / f"results/ppl/toytest.L32.nw8/{name}.json").read_text())
        assert record["value"] > 1
    diag = json.loads((work / "results/quantized/tiny.toytrain.n8.L32.lsq.w3g32/diagnostics.json").read_text())
    assert all(b["error_after"] < b["error_before"] for b in diag["blocks"])


def test_guidedquant_runs_end_to_end(tiny_run, tmp_path):
    """SqueezeLLM, LNQ + GuidedQuant and LDLQ + GuidedQuant share one gradients pass; LNQ's guided Hessians of the FP
    model are their own artifact; all three evaluate like any other model and record their bits per weight."""
    work = tmp_path / "copy"
    shutil.copytree(tiny_run, work, symlinks=True)
    names = ["tiny.toytrain.n8.L32.sqllm.w3", "tiny.toytrain.n8.L32.lnq.w2.gq2", "tiny.toytrain.n8.L32.ldlq.w3g32.gq2"]
    targets = [f"results/ppl/toytest.L32.nw8/{n}.json" for n in names]
    proc = snakemake(work, "-n", "--cores", "2", *targets)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert out.count("rule stats:") == 2, out[-3000:]
    assert "results/stats/gradients.G4/tiny.toytrain.n8.L32" in out
    assert "results/stats/guided_hessian.g2/tiny.toytrain.n8.L32" in out
    proc = snakemake(work, "--cores", "2", *targets)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for name in names:
        assert json.loads((work / f"results/ppl/toytest.L32.nw8/{name}.json").read_text())["value"] > 1
    diag = json.loads((work / "results/quantized/tiny.toytrain.n8.L32.sqllm.w3/diagnostics.json").read_text())
    assert diag["avg_bits_per_weight"] == pytest.approx(3 + 16 * 8 / 64, rel=0.2)  # tables over 64 or 128 inputs
    manifest = json.loads((work / "results/stats/gradients.G4/tiny.toytrain.n8.L32/manifest.json").read_text())
    assert manifest["G"] == 4 and len(manifest["loss"]) == 8


def test_distillation_runs_between_quantize_and_evaluation(tiny_run, tmp_path):
    work = tmp_path / "copy"
    shutil.copytree(tiny_run, work, symlinks=True)
    name = "tiny.rtn.w3g32.kd.toytrain.n8.L32"
    target = f"results/ppl/toytest.L32.nw8/{name}.json"
    proc = snakemake(work, "-n", "--cores", "2", target)
    assert proc.returncode == 0, proc.stderr[-2000:]
    jobs = [line.split()[-1].rstrip(":") for line in proc.stdout.splitlines() if line.startswith(("rule ", "localrule "))]
    assert jobs == ["quantize", "distill", "perplexity"], jobs
    proc = snakemake(work, "--cores", "2", target)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    diag = json.loads((work / f"results/quantized/{name}/diagnostics.json").read_text())
    assert diag["distill"]["base"] == "tiny.rtn.w3g32" and diag["distill"]["steps"] == 8
    assert json.loads((work / target).read_text())["value"] > 1


def test_pack_runs_between_quantize_and_evaluation(tiny_run, tmp_path):
    work = tmp_path / "copy"
    shutil.copytree(tiny_run, work, symlinks=True)
    cfg = yaml.safe_load((work / "config.yaml").read_text())
    cfg["pack"] = {"formats": ["ct", "anyprec"], "dtype": "float32", "stat_dtype": "float16", "perplexity": False}
    write_config(work, cfg)
    # A model no table has made yet: quantize, then pack, then evaluate the packed model.
    target = "results/ppl/toytest.L32.nw8/tiny.rtn.w3g32.pack-ct.json"
    proc = snakemake(work, "-n", "--cores", "2", target)
    assert proc.returncode == 0, proc.stderr[-2000:]
    jobs = [line.split()[-1].rstrip(":") for line in proc.stdout.splitlines() if line.startswith(("rule ", "localrule "))]
    assert jobs == ["quantize", "pack", "perplexity"], jobs
    # A plain run packs every table model the formats can hold: ct takes all of them (integer zero points),
    # anyprec only the per-channel ones (one table per row). Two packed models are evaluated.
    evaluated = ("tiny.rtn.w4g32", "tiny.toytrain.n8.L32.ldlq.w3")
    proc = snakemake(work, "--cores", "2", "all",
                     *(f"results/ppl/toytest.L32.nw8/{name}.pack-ct.json" for name in evaluated))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in (work / "results/packed/ct").iterdir()) == [
        "tiny.rtn.w4g32", "tiny.toytrain.n8.L32.ldlq.w3", "tiny.toytrain.n8.L32.ldlq.w3g32",
        "tiny.toytrain.n8.L32.ldlq.w4", "tiny.toytrain.n8.L32.ldlq.w4g32"]
    assert sorted(p.name for p in (work / "results/packed/anyprec").iterdir()) == [
        "tiny.toytrain.n8.L32.ldlq.w3", "tiny.toytrain.n8.L32.ldlq.w4"]
    for name in evaluated:
        packed = json.loads((work / f"results/ppl/toytest.L32.nw8/{name}.pack-ct.json").read_text())
        plain = json.loads((work / f"results/ppl/toytest.L32.nw8/{name}.json").read_text())
        # float16 scales change the model a little, not its quality
        assert abs(packed["value"] / plain["value"] - 1) < 1e-3 and packed["value"] != plain["value"]
        assert packed["bits_per_weight"] > 3
    report = json.loads((work / "results/packed/ct/tiny.rtn.w4g32/pack_report.json").read_text())
    assert report["format"] == "ct" and report["stat_dtype"] == "float16"
    assert any((work / "results/logs/pack").glob("*.log")) and any((work / "results/benchmarks/pack").glob("*.tsv"))
    proc = snakemake(work, "-n", "--cores", "2", "results/ppl/toytest.L32.nw8/tiny.toytrain.n8.L32.ldlq.neuqi.w3g32.pack-ct.json")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "cannot pack 'tiny.toytrain.n8.L32.ldlq.neuqi.w3g32' as ct" in out, out[-2000:]
    assert "neuqi_int" in out and "Traceback" not in out


@pytest.mark.parametrize("target,message", [
    ("results/quantized/tiny.toytrain.n8.L32.spqr.w3g16.sym", "'sym' (symmetric grid) does not apply to spqr"),
    ("results/ppl/toytest.L32.nw8/tiny.rtn.w4g32.damp0p1.json", "'damp0p1' (Hessian damping) does not apply to rtn"),
    ("results/quantized/tiny.toytrain.n8.L32.ldlq.neuqii.w4g32", "'neuqii' is not an init"),
    ("results/quantized/tiny.toytrain.n8.L32.lsq.w3g32.bs16", "batch (16) is larger than the 8 calibration windows"),
])
def test_refused_names_stop_the_dag_in_one_line(tiny_run, target, message):
    proc = snakemake(tiny_run, "-n", "--cores", "2", target)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and message in out, out[-2000:]
    line = next(line for line in out.splitlines() if message in line)
    assert line.startswith("Error: cannot read short name") and "Traceback" not in out


@pytest.mark.parametrize("change,message", [
    (lambda c: c.update(calibraton={}), "unknown config key 'calibraton'"),
    (lambda c: c["methods"][0].update(solver="awq"), "unknown solver 'awq'"),
    (lambda c: c["methods"][0].update(bits=[1]), "bits must be between 2 and 8"),
    (lambda c: c["methods"][1].update(group_size=[48]),
     "group size 48 does not divide the input dimension 64 of layer 'self_attn.q_proj'"),
    (lambda c: c["methods"][0].update(options={"damp": 0.1}), "option 'damp' (Hessian damping) does not apply to rtn"),
    (lambda c: c["methods"].append({"id": "spqr", "solver": "spqr", "bits": [3], "group_size": [16],
                                    "options": {"sym": True}}), "option 'sym' (symmetric grid) does not apply to spqr"),
    (lambda c: c["datasets"].update(toytest={"path": "Salesforce/wikitext", "name": "wikitext-2-raw-v1"}),
     "dataset 'toytest': 'Salesforce/wikitext' is no local path"),
])
def test_bad_input_fails_before_any_job(tmp_path, tiny_dir, text_files, change, message, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    cfg = tiny_config(tiny_dir, text_files)
    change(cfg)
    write_config(tmp_path, cfg)
    proc = snakemake(tmp_path, "--cores", "2")
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr
    assert not (tmp_path / "results").exists() and not (tmp_path / "resources").exists()


def test_unsupported_architecture_fails_before_any_job(tmp_path, text_files):
    model_dir = tmp_path / "gpt2"
    build_tokenizer(model_dir)
    tiny_model("gpt2").save_pretrained(model_dir)
    write_config(tmp_path / "w", tiny_config(model_dir, text_files))
    proc = snakemake(tmp_path / "w", "--cores", "2")
    assert proc.returncode != 0
    assert "model type 'gpt2' is not supported; supported model types:" in proc.stdout + proc.stderr
    assert not (tmp_path / "w" / "results").exists()


def test_runtime_failure_names_the_problem_and_leaves_no_artifact(tmp_path, tiny_dir, text_files):
    cfg = tiny_config(tiny_dir, text_files)
    cfg["calibration"]["nsamples"] = 100_000  # far more text than the toy corpus holds
    write_config(tmp_path, cfg)
    proc = snakemake(tmp_path, "--cores", "2", "results/calibration/tiny.toytrain.n100000.L32.pt")
    assert proc.returncode != 0
    assert "too short for 100000 windows of 32 tokens" in proc.stdout + proc.stderr
    assert not list((tmp_path / "results" / "calibration").glob("*"))


def test_lint_and_dry_runs(tmp_path):
    proc = snakemake(REPO, "--lint", offline=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    for args in ([], ["--configfile", "config.yaml", "tests/offline.yaml"]):
        # --forceall: the whole DAG is listed even where this checkout already holds results.
        proc = snakemake(REPO, "-n", "--forceall", "--cores", "2", *args, offline=False)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "quantize" in proc.stdout and "table" in proc.stdout
        # NeUQI's table is `default_target: false`: none of its jobs in a plain run
        assert "results/tables/main.md" in proc.stdout and "results/tables/init.md" not in proc.stdout
        assert "neuqi" not in proc.stdout and "magr" not in proc.stdout
        # nor GuidedQuant's (its gradients pass and LNQ take hours on a CPU)
        assert "lnq" not in proc.stdout and "sqllm" not in proc.stdout and "rule stats" not in proc.stdout


def test_offline_dry_run_with_mmlu_builds(tmp_path):
    """A hub-only task (MMLU, 5-shot) in an offline dry run: the DAG builds without any data access."""
    extra = tmp_path / "mmlu.yaml"
    extra.write_text(yaml.safe_dump({
        "lm_eval": {"tasks": {"mmlu": {"num_fewshot": 5, "label": "MMLU"}}},
        "tables": {"mmlu": {"title": "MMLU 5-shot", "rows": ["fp", "ldlq"], "metrics": ["mmlu.acc"]}}}))
    proc = snakemake(REPO, "-n", "--cores", "2", "--configfile", str(REPO / "config.yaml"),
                     str(REPO / "tests/offline.yaml"), str(extra))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "results/lmeval/mmlu.5shot/smollm2-135m-instruct-q4_1.fp.json" in proc.stdout
    assert "results/tables/mmlu.md" in proc.stdout


@pytest.mark.parametrize("preset", sorted(p.name for p in (REPO / "presets").glob("*.yaml")))
def test_presets_build_their_dag(preset, tmp_path):
    # Dry run in an empty directory: nothing of the paper's models is reachable here, and nothing is needed.
    shutil.copy(REPO / "config.yaml", tmp_path / "config.yaml")
    proc = snakemake(tmp_path, "-n", "--cores", "2", "--configfile", str(REPO / "presets" / preset), offline=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "quantize" in proc.stdout and "table" in proc.stdout


def test_init_table_builds_when_asked_for(tmp_path):
    """Left out of a plain run (test_lint_and_dry_runs), built when its file is the target."""
    shutil.copy(REPO / "config.yaml", tmp_path / "config.yaml")
    proc = snakemake(tmp_path, "results/tables/init.md", "-n", "--cores", "2", "--configfile",
                     str(REPO / "config.yaml"), offline=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for name in ("ldlq.neuqi.w2g64", "ldlq.neuqi_int.w3", "magr.ldlq.w3g64"):
        assert f"results/quantized/smollm2-135m.c4.n32.L512.{name}" in proc.stdout
    assert "results/tables/init.md" in proc.stdout


def test_mixture_calibration_runs_through_the_workflow(tiny_run, tmp_path):
    """A `mixtures:` entry is calibrated on like a dataset: one job reads each part's fetched file, the windows come
    from each part in proportion, and the name's dataset part is the mixture's key."""
    work = tmp_path / "copy"
    shutil.copytree(tiny_run, work, symlinks=True)
    cfg = yaml.safe_load((work / "config.yaml").read_text())
    cfg["mixtures"] = {"toymix": {"parts": {"toytrain": 3, "toytest": 1}}}
    cfg["methods"].append({"id": "ldlq_mix", "solver": "ldlq", "bits": [4], "group_size": [32],
                           "calibration": {"dataset": "toymix", "nsamples": 8, "seqlen": 32}})
    write_config(work, cfg)
    proc = snakemake(work, "--cores", "2", "results/quantized/tiny.toymix.n8.L32.ldlq.w4g32")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    manifest = json.loads((work / "results/calibration/tiny.toymix.n8.L32.json").read_text())
    assert manifest["sampler"] == "mixture" and manifest["counts"] == {"toytrain": 6, "toytest": 2}
    assert sorted(manifest["window_parts"]) == ["toytest"] * 2 + ["toytrain"] * 6
