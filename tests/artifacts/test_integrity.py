"""Checksums of artifacts (quantlib.artifacts.integrity): no artifact is read without its record, every remedy names
the artifact to delete and the command, `python -m quantlib adopt` records an old artifact's checksums only when
told to, and the scan before any job finds artifacts with missing or resized files or no record, by `stat` only."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from quantlib.__main__ import main
from quantlib.artifacts.atomic import atomic_dir, atomic_file
from quantlib.artifacts.integrity import (CHECKSUMS, adopt, artifact_root, describe_problems, rebuild_hint,
                                          scan_artifacts, sidecar, verify)
from quantlib.errors import DataError
from quantlib.stats.artifacts import read_manifest

NAME = "tiny.c4.n8.L32.ldlq.w4g32"


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A working directory like the workflow's: paths are relative to it, as Snakemake gives them to jobs."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _folder(path, files=None, seal=True) -> Path:
    """A folder artifact written as the workflow writes one (atomically; sealed unless `seal` is False)."""
    path = Path(path)
    with atomic_dir(path, seal=seal) as tmp:
        for name, text in (files or {"config.json": "{}", "model-00001-of-00002.safetensors": "w" * 100}).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text)
    return path


def _file(path, text="windows", seal=True) -> Path:
    with atomic_file(path, seal=seal) as tmp:
        tmp.write_text(text)
    return Path(path)


# ------------------------------------------------------------------------------------------------ refusal

@pytest.mark.parametrize("kind", ["folder", "file"])
def test_an_artifact_without_its_record_is_refused_naming_it_and_both_ways_out(work, kind):
    path = (_folder(f"results/quantized/{NAME}", seal=False) if kind == "folder"
            else _file("results/calibration/tiny.c4.n8.L32.pt", seal=False))
    with pytest.raises(DataError) as err:
        verify(path)
    msg = str(err.value)
    assert msg.startswith(f"{path} has no checksum record"), msg
    assert f"`rm -rf {path}`, then rerun the same snakemake command" in msg
    assert f"`python -m quantlib adopt {path}`" in msg
    assert "not read unverified" in msg


def test_a_damaged_file_names_the_artifact_folder_to_delete_not_the_file(work):
    folder = _folder(f"results/quantized/{NAME}")
    shard = folder / "model-00001-of-00002.safetensors"
    shard.write_text("x" * 100)  # same size, other bytes
    with pytest.raises(DataError) as err:
        verify(folder)
    msg = str(err.value)
    assert msg.startswith(f"{shard} is damaged (its SHA-256 differs"), msg
    assert f"delete {folder} and rebuild it: `rm -rf {folder}`, then rerun the same snakemake command" in msg
    assert f"rm -rf {shard}" not in msg
    shard.unlink()
    with pytest.raises(DataError, match=r"model-00001-of-00002.safetensors is damaged \(the file is missing\); "
                                        rf"delete results/quantized/{NAME} and rebuild it"):
        verify(folder)


def test_a_damaged_record_is_refused_like_a_damaged_file(work):
    folder = _folder(f"results/quantized/{NAME}")
    (folder / CHECKSUMS).write_text("{not json")
    with pytest.raises(DataError, match=rf"{CHECKSUMS} is damaged \(not a readable checksum record.*`rm -rf "
                                        rf"results/quantized/{NAME}`"):
        verify(folder)


def test_a_sealed_artifact_verifies(work):
    assert verify(_folder(f"results/quantized/{NAME}")) >= 0
    assert verify(_file("results/calibration/tiny.c4.n8.L32.pt")) >= 0


def test_a_statistics_artifact_without_record_is_refused_when_read(work):
    folder = _folder("results/stats/fp_hessian/tiny.c4.n8.L32", {"manifest.json": json.dumps(
        {"stat": "fp_hessian", "model": "tiny", "calib": "tiny.c4.n8.L32"}), "block0000.safetensors": "h"}, seal=False)
    with pytest.raises(DataError, match=r"results/stats/fp_hessian/tiny.c4.n8.L32 has no checksum record.*"
                                        r"python -m quantlib adopt results/stats/fp_hessian/tiny.c4.n8.L32"):
        read_manifest(folder, "fp_hessian", {"model": "tiny", "calib": "tiny.c4.n8.L32"})
    adopt(folder)
    assert read_manifest(folder, "fp_hessian", {"model": "tiny", "calib": "tiny.c4.n8.L32"})["model"] == "tiny"


# ------------------------------------------------------------------------------------------------ artifact roots

@pytest.mark.parametrize("inside, root", [
    (f"results/quantized/{NAME}/model-00001-of-00002.safetensors", f"results/quantized/{NAME}"),
    (f"results/quantized/{NAME}", f"results/quantized/{NAME}"),
    ("results/stats/gradients.G4/tiny.c4.n8.L32/block0001.safetensors", "results/stats/gradients.G4/tiny.c4.n8.L32"),
    (f"results/packed/ct/{NAME}/config.json", f"results/packed/ct/{NAME}"),
    ("resources/models/tiny/config.json", "resources/models/tiny"),
    ("/data/prefilled/models/tiny/tokenizer.json", "/data/prefilled/models/tiny"),  # another `resources:` folder
    ("resources/datasets/c4.parquet", "resources/datasets/c4.parquet"),
    ("results/calibration/tiny.c4.n8.L32.pt.sha256.json", "results/calibration/tiny.c4.n8.L32.pt"),
    ("results/evaldata/tiny/wikitext2.L512.pt", "results/evaldata/tiny/wikitext2.L512.pt"),
    ("results/ppl/wikitext2.L512/tiny.fp.json", "results/ppl/wikitext2.L512/tiny.fp.json"),  # no artifact: itself
])
def test_artifact_root_of_a_path_without_record_follows_the_workflows_layouts(work, inside, root):
    assert artifact_root(inside) == Path(root)
    assert f"`rm -rf {root}`" in rebuild_hint(inside)


def test_artifact_root_is_the_nearest_folder_holding_a_record(work):
    folder = _folder("mine/copy", {"sub/weights.bin": "w"})  # a folder of the API user's own, not a layout
    assert artifact_root(folder / "sub" / "weights.bin") == folder
    assert artifact_root("mine/other.bin") == Path("mine/other.bin")


# ------------------------------------------------------------------------------------------------ adopting

def test_adopt_with_yes_records_what_seal_dir_records(work, capsys):
    folder = _folder(f"results/quantized/{NAME}", seal=False)
    reference = _folder("reference", {p.name: p.read_text() for p in folder.iterdir()})
    assert main(["adopt", f"{folder}/config.json", "--yes"]) == 0  # a path inside adopts the whole folder
    assert f"Adopted {folder}" in capsys.readouterr().out
    assert json.loads((folder / CHECKSUMS).read_text()) == json.loads((reference / CHECKSUMS).read_text())
    assert not [p for p in folder.iterdir() if ".tmp-" in p.name]  # the record was written through a temporary
    verify(folder)
    assert main(["adopt", str(folder), "--yes"]) == 1  # adopting over a record would hide the damage it reports
    assert "already has its checksum record" in capsys.readouterr().err


def test_adopt_a_file_writes_its_sidecar(work):
    path = _file("resources/datasets/c4.parquet", "rows", seal=False)
    assert main(["adopt", str(path), "--yes"]) == 0
    assert json.loads(sidecar(path).read_text())["size"] == 4
    verify(path)


@pytest.mark.parametrize("answer", ["n", "", EOFError])
def test_adopt_asks_and_writes_nothing_unless_told_yes(work, monkeypatch, capsys, answer):
    folder = _folder(f"results/quantized/{NAME}", seal=False)

    def reply(prompt):
        assert prompt == "Adopt it? [y/N] "
        if answer is EOFError:
            raise EOFError
        return answer

    monkeypatch.setattr("builtins.input", reply)
    assert main(["adopt", str(folder)]) == 1
    out = capsys.readouterr().out
    assert "adopt only an artifact that an older version of quantlib wrote whole" in out and "Not adopted" in out
    assert not (folder / CHECKSUMS).exists()
    monkeypatch.setattr("builtins.input", lambda prompt: "y")
    assert main(["adopt", str(folder)]) == 0
    verify(folder)


def test_adopt_runs_as_a_module_and_refuses_what_does_not_exist(work):
    proc = subprocess.run([sys.executable, "-m", "quantlib", "adopt", "results/quantized/none", "--yes"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 1 and "results/quantized/none does not exist: nothing to adopt" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "quantlib", "--help"], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0 and "adopt" in proc.stdout


# ------------------------------------------------------------------------------------------------ the scan

def test_scan_finds_each_kind_of_problem_and_ignores_temporaries(work):
    _folder(f"results/quantized/{NAME}")  # whole
    _folder("resources/models/tiny")  # whole
    _file("resources/datasets/c4.parquet")  # whole
    _file("results/evaldata/tiny/c4.L32.pt")  # whole
    missing = _folder("results/stats/fp_hessian/tiny.c4.n8.L32", {"manifest.json": "{}", "block0000.safetensors": "h",
                                                                  "block0001.safetensors": "h"})
    (missing / "block0001.safetensors").unlink()
    resized = _folder(f"results/quantized/{NAME}.kd.c4.n8.L32")
    (resized / "config.json").write_text("{} ")
    unrecorded = Path(f"results/packed/ct/{NAME}")
    unrecorded.mkdir(parents=True)
    (unrecorded / "config.json").write_text("{}")  # a half-written pack folder
    windows = _file("results/calibration/tiny.c4.n8.L32.pt")
    windows.write_text("windows, longer")
    old = _file("results/calibration/tiny.c4.n16.L32.pt", seal=False)
    # what running jobs and other tools leave: never artifacts
    Path(f"results/quantized/.{NAME}.w3.tmp-abc123").mkdir()
    (Path(f"results/quantized/.{NAME}.w3.tmp-abc123") / "config.json").write_text("{}")
    Path("results/calibration/.tiny.c4.n32.L32.pt.tmp-xyz").write_text("half")
    _file("results/ppl/c4.L32/tiny.fp.json", seal=False)
    Path(".snakemake/incomplete").mkdir(parents=True)

    problems = {str(p.artifact): p for p in scan_artifacts("resources")}
    assert sorted(problems) == sorted(map(str, [missing, resized, unrecorded, windows, old]))
    assert str(problems[str(missing)]) == f"{missing}/block0001.safetensors is damaged (the file is missing)"
    assert str(problems[str(resized)]) == (f"{resized}/config.json is damaged (3 bytes where 2 were written: "
                                           "truncated or replaced)")
    assert str(problems[str(unrecorded)]).startswith(f"{unrecorded} has no checksum record (checksums.json)")
    assert str(problems[str(windows)]).startswith(f"{windows} is damaged (15 bytes where 7")
    assert str(problems[str(old)]).startswith(f"{old} has no checksum record ({old.name}.sha256.json)")
    assert [p.recorded for p in (problems[str(unrecorded)], problems[str(old)], problems[str(missing)])] == [
        False, False, True]

    msg = describe_problems(list(problems.values()))
    assert msg.startswith("5 artifact(s) are damaged or unfinished")
    rm = next(line for line in msg.splitlines() if line.strip().startswith("rm -rf "))
    assert sorted(rm.split()[2:]) == sorted(problems)
    adopts = [line.strip() for line in msg.splitlines() if "python -m quantlib adopt" in line]
    assert sorted(adopts) == sorted(f"python -m quantlib adopt {p}" for p in (unrecorded, old))


def test_scan_of_a_whole_tree_and_another_resources_folder_finds_nothing(work):
    _folder("prefill/models/tiny")
    _file("prefill/datasets/c4.parquet")
    _folder(f"results/quantized/{NAME}")
    assert scan_artifacts("prefill") == []
    Path("prefill/models/tiny/config.json").unlink()
    assert [str(p.artifact) for p in scan_artifacts("prefill")] == ["prefill/models/tiny"]
    assert scan_artifacts("resources") == []  # not the folder the config names: not looked at


def test_scan_reads_no_file_but_the_records(work, monkeypatch):
    _folder(f"results/quantized/{NAME}", {f"model-{i:05d}.safetensors": "w" * 10 for i in range(20)})
    opened = []
    real_open = open

    def spy(path, *args, **kwargs):
        opened.append(Path(path).name)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", spy)
    monkeypatch.setattr("io.open", spy)  # pathlib's
    assert scan_artifacts() == []
    assert opened == [CHECKSUMS]
