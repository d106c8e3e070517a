"""Cluster and environment execution: per-rule conda envs, the profiles, a real single-node SLURM cluster running
the tiny workflow, and a run killed in the middle of a quantize job that resumes to identical results."""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import tomllib
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from packaging.requirements import Requirement
from test_workflow import SNAKEMAKE, snakemake, tiny_config, write_config

from quantlib.artifacts.atomic import atomic_dir, write_json
from quantlib.stats.progress import KILL_AFTER_BLOCK

# Rules that run no code of their own (a target rule; pack_refused, which only stops the DAG) need no environment.
RULES_WITHOUT_ENV = {"all", "pack_refused"}
# Rules that run on the submitting host under a cluster executor (downloads: login nodes have the network).
LOCAL_RULES = {"fetch_model", "fetch_dataset", "all"}


RULE_RE = re.compile(r"^[ ]*rule (\w+):", flags=re.M)
CONDA_RE = re.compile(r"^[ ]+conda:\s*\n\s+\"([^\"]+)\"", flags=re.M)


def rule_blocks() -> dict[str, tuple[Path, str]]:
    """The file and the text of each rule of the rule files. Rules defined only for some configs (inside an `if`, indented) are
    found too."""
    blocks = {}
    for path in [REPO / "Snakefile", *sorted((REPO / "rules").glob("*.smk"))]:
        text = path.read_text()
        starts = list(RULE_RE.finditer(text))
        for match, after in zip(starts, [*starts[1:], None]):
            blocks[match.group(1)] = path, text[match.end():after.start() if after else len(text)]
        # `use rule A as B with:` makes B a copy of A with some keys replaced: B keeps A's env and threads.
        for base, derived in re.findall(r"^\s*use rule (\w+) as (\w+)", text, re.M):
            blocks[derived] = blocks[base]
    return blocks


def rule_envs() -> dict[str, Path | None]:
    """Each rule with the conda env file its `conda:` names (None if it names none)."""
    envs = {}
    for rule, (path, block) in rule_blocks().items():
        conda = CONDA_RE.search(block)
        # Snakemake reads the path relative to the file that defines the rule.
        envs[rule] = (path.parent / conda.group(1)).resolve() if conda else None
    return envs


def pyproject_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(dep) for dep in project["dependencies"]]


def env_pins(env_file: Path) -> tuple[dict, list]:
    """(pip pins {normalized name: version}, conda dependencies) of a conda env file."""
    spec = yaml.safe_load(env_file.read_text())
    pins, conda = {}, []
    for dep in spec["dependencies"]:
        if isinstance(dep, dict):
            for line in dep["pip"]:
                if not line.startswith("-"):
                    req = Requirement(line)
                    (op_version,) = req.specifier
                    assert op_version.operator == "==", f"{env_file.name}: {line} is not pinned with =="
                    pins[canonical(req.name)] = op_version.version
        else:
            conda.append(dep)
    return pins, conda


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_constraints_are_the_env_pins_and_installed():
    """README and CI install with constraints.txt: the same versions as every env file pins, and the installed ones."""
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            (op_version,) = req.specifier
            pins[canonical(req.name)] = op_version.version
    for env_file in sorted((REPO / "envs").glob("*.yaml")):
        env, _ = env_pins(env_file)
        assert {k: pins.get(k) for k in env} == env, env_file.name
    for name, version in pins.items():
        try:
            installed = md.version(name).split("+")[0]
        except md.PackageNotFoundError:
            continue  # an extra this install left out (the SLURM plugin): its tests skip, naming the extra
        assert installed == version, f"constraints.txt pins {name}=={version}, installed {installed}"


def test_every_rule_names_an_existing_env():
    proc = snakemake(REPO, "--list-rules", offline=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    listed = set(proc.stdout.split())
    envs = rule_envs()
    # The scan sees every rule of the files; Snakemake lists those the repository's config enables.
    assert listed <= set(envs), f"rules the file scan missed: {listed - set(envs)}"
    for rule, env in envs.items():
        if rule in RULES_WITHOUT_ENV:
            assert env is None, f"rule {rule} runs no code and needs no env"
            continue
        assert env is not None, f"rule {rule} has no conda: directive (add one naming envs/<family>.yaml)"
        assert env.is_file() and env.parent == REPO / "envs", f"rule {rule}: {env} does not exist"
    # No env file without a rule that uses it.
    assert {p.resolve() for p in (REPO / "envs").glob("*.yaml")} == {e for e in envs.values() if e}


@pytest.mark.parametrize("env_file", sorted((REPO / "envs").glob("*.yaml")), ids=lambda p: p.name)
def test_env_pins_agree_with_pyproject_and_the_tested_versions(env_file):
    pins, conda = env_pins(env_file)
    assert "python=3.11" in conda and "pip" in conda
    spec = yaml.safe_load(env_file.read_text())
    assert "-e .." in spec["dependencies"][-1]["pip"], "the env must install the project itself"
    # Every job imports quantlib, installed with all of pyproject's dependencies: each one is pinned here.
    for req in pyproject_requirements():
        name = canonical(req.name)
        assert name in pins, f"{env_file.name} does not pin {req.name} (pyproject: {req})"
        assert req.specifier.contains(pins[name]), f"{env_file.name}: {req.name}=={pins[name]} violates {req}"
    # ... at the versions the project is tested with (the environment running these tests).
    for name, version in pins.items():
        installed = md.version(name).split("+")[0]
        assert version == installed, f"{env_file.name} pins {name}=={version}, tested with {installed}"


# Rules that hold a model on a GPU under profiles/slurm; lmeval exists on another branch (it is ready when it lands).
GPU_RULES = {"quantize", "stats", "distill", "perplexity", "lmeval"}


def test_slurm_profiles_cover_every_torch_rule():
    torch_rules = {rule for rule, (_, block) in rule_blocks().items() if "threads: TORCH_THREADS" in block}
    assert {"quantize", "perplexity"} <= torch_rules
    for name in ("slurm", "slurm-local"):
        profile = yaml.safe_load((REPO / "profiles" / name / "config.yaml").read_text())
        # Without --cores a rule's TORCH_THREADS falls back to 2: a cluster profile sets each torch rule's threads.
        assert torch_rules | GPU_RULES <= set(profile["set-threads"]), (name, torch_rules - set(profile["set-threads"]))
    resources = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())["set-resources"]
    assert {rule for rule, res in resources.items() if res.get("gres") == "gpu:1"} == GPU_RULES


def test_profiles_request_per_rule_resources_scaled_by_model_size(tmp_path, tiny_dir, text_files):
    assert not (REPO / "profiles" / "default").exists(), "Snakemake would apply profiles/default to every run"
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        pytest.skip("needs the `slurm` extra (snakemake's SLURM executor plugin): pip install -e '.[slurm]'")
    cfg = tiny_config(tiny_dir, text_files)
    cfg["models"]["tiny"]["params_b"] = 70  # pretend a 70B model: requests must grow with it
    write_config(tmp_path, cfg)
    proc = snakemake(tmp_path, "-n", "-p", "--profile", str(REPO / "profiles" / "slurm"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    jobs = {}
    for block in proc.stdout.split("\nrule ")[1:]:
        rule = block.split(":", 1)[0]
        res = re.search(r"resources: (.*)", block)
        jobs.setdefault(rule, []).append(dict(kv.split("=", 1) for kv in res.group(1).split(", ")) if res else {})
    for rule in ("quantize", "perplexity"):
        for res in jobs[rule]:
            assert res["gres"] == "gpu:1" and res["slurm_partition"] == "gpu", (rule, res)
            assert int(res["mem_mb"]) == 3 * 4 * 1024 * 70, (rule, res)  # fp32 weights x3 of a 70B model
    assert all(int(r["runtime"]) == 700 for r in jobs["quantize"])
    assert all(r["slurm_partition"] == "cpu" and "gres" not in r for r in jobs["calibration"])
    for name in ("local", "slurm-local"):
        proc = snakemake(tmp_path, "-n", "--profile", str(REPO / "profiles" / name))
        assert proc.returncode == 0, (name, proc.stderr[-2000:])


# ----------------------------------------------------------------------------------------------------------------
# Reference: the tiny workflow run locally without interruption.

def cluster_config(tiny_dir, text_files) -> dict:
    """The tiny workflow cut to one method with a Hessian and one without: every rule still runs, and the jobs (each
    mostly a Python start-up, submitted and polled one by one under SLURM) stay few."""
    cfg = tiny_config(tiny_dir, text_files)
    cfg["methods"] = [
        {"id": "rtn", "label": "RTN", "solver": "rtn", "bits": [4], "group_size": [32]},
        {"id": "ldlq", "label": "LDLQ", "solver": "ldlq", "bits": [3], "group_size": [32]},
    ]
    return cfg


def result_fingerprint(work: Path) -> dict:
    """What must not depend on how the workflow was executed: every figure and every stored tensor."""
    fp = {"table.csv": (work / "results/tables/main.csv").read_text()}
    for path in sorted((work / "results/ppl").rglob("*.json")):
        record = json.loads(path.read_text())
        fp[str(path.relative_to(work))] = (record["value"], record["protocol"])
    for path in sorted((work / "results/quantized").rglob("*.safetensors")):
        fp[str(path.relative_to(work))] = hashlib.sha256(path.read_bytes()).hexdigest()
    assert len(fp) == 1 + 3 + 2 * 3  # table, 3 perplexities (FP + 2 quantized), 2 checkpoints of 3 shards each
    return fp


def assert_nothing_partial(work: Path) -> None:
    assert not list(work.rglob(".*.tmp-*")), "a half-written temporary was left behind"
    incomplete = work / ".snakemake" / "incomplete"
    assert not incomplete.exists() or not any(incomplete.iterdir()), "Snakemake still marks outputs incomplete"


def test_a_killed_writers_temporaries_are_removed_when_the_output_is_redone(tmp_path):
    # What a SIGKILLed job leaves: a temporary beside its output, never renamed into place.
    (tmp_path / ".model.tmp-dead").mkdir()
    (tmp_path / ".model.tmp-dead" / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".ppl.json.tmp-dead").write_text("{")
    (tmp_path / ".other.json.tmp-live").write_text("{")  # another output's: not ours to remove
    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "weights").write_text("whole")
    write_json(tmp_path / "ppl.json", {"value": 1.0})
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.json.tmp-live", "model", "ppl.json"]
    assert json.loads((tmp_path / "ppl.json").read_text()) == {"value": 1.0}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_dir, text_files):
    work = tmp_path_factory.mktemp("local")
    write_config(work, cluster_config(tiny_dir, text_files))
    proc = snakemake(work, "--cores", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work


# ----------------------------------------------------------------------------------------------------------------
# Killed in the middle of a quantize job, then resumed.

def test_killed_during_quantize_resumes_to_identical_results(tmp_path, tiny_dir, text_files, reference_run):
    write_config(tmp_path, cluster_config(tiny_dir, text_files))
    cmd = [SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"),
           "--directory", str(tmp_path), "--cores", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    logs = tmp_path / "results" / "logs" / "quantize"
    deadline = time.time() + 600
    # The quantize script opens its log first thing, then imports torch and loads the model (seconds): killing as
    # soon as the log appears hits the job while it runs, never after it finished.
    while not (logs.is_dir() and any(logs.iterdir())):
        assert proc.poll() is None, "the workflow ended before any quantize job started"
        assert time.time() < deadline, "no quantize job started within 10 minutes"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    (killed_log,) = list(logs.iterdir())
    name = killed_log.name.removesuffix(".log")
    while True:  # the whole process group, the quantize job included, is gone
        try:
            os.killpg(proc.pid, 0)
            time.sleep(0.05)
        except ProcessLookupError:
            break
    assert not (tmp_path / "results" / "quantized" / name).exists(), "the quantize job had already finished"
    assert any((tmp_path / ".snakemake" / "incomplete").iterdir())
    # What was finished before the kill (the fetched model and data, at least) must be kept, not redone.
    finished = {p: p.stat().st_mtime_ns for p in (tmp_path / "resources").rglob("*") if p.is_file()}
    assert finished

    # A killed Snakemake leaves its lock: the next run names --unlock.
    rerun = snakemake(tmp_path, "--cores", "2", "--rerun-incomplete")
    assert rerun.returncode != 0 and "--unlock" in rerun.stderr
    assert snakemake(tmp_path, "--unlock").returncode == 0
    rerun = snakemake(tmp_path, "--cores", "2", "--rerun-incomplete")
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in finished} == finished
    assert "rule fetch_model" not in rerun.stderr and f"wildcards: name={name}" in rerun.stderr
    assert result_fingerprint(tmp_path) == result_fingerprint(reference_run)
    assert_nothing_partial(tmp_path)


def test_quantize_jobs_killed_after_block_1_resume_at_block_2(tmp_path, tiny_dir, text_files, reference_run,
                                                              monkeypatch):
    # Each quantize job kills itself (SIGKILL) once block 1 of 2 is recorded; Snakemake deletes the failed jobs'
    # outputs, not the progress beside them, and the next run's jobs go on from block 2 (quantlib.stats.progress).
    write_config(tmp_path, cluster_config(tiny_dir, text_files))
    monkeypatch.setenv(KILL_AFTER_BLOCK, "1")
    killed = snakemake(tmp_path, "--cores", "2")
    assert killed.returncode != 0
    partial = sorted(p.name for p in (tmp_path / "results" / "quantized").glob(".*.partial"))
    assert partial and not list((tmp_path / "results" / "quantized").glob("[!.]*"))
    monkeypatch.delenv(KILL_AFTER_BLOCK)
    rerun = snakemake(tmp_path, "--cores", "2")
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    for folder in partial:
        log = (tmp_path / "results" / "logs" / "quantize" / f"{folder[1:].removesuffix('.partial')}.log").read_text()
        assert "resuming at block 2 of 2" in log, log[-3000:]
    assert result_fingerprint(tmp_path) == result_fingerprint(reference_run)
    assert_nothing_partial(tmp_path)
    assert not list(tmp_path.rglob("*.partial"))


# ----------------------------------------------------------------------------------------------------------------
# A real single-node SLURM cluster (slurm-wlm and munge, as root).

SLURM_DAEMONS = ("slurmctld", "slurmd")


def _cluster_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "a single-node SLURM cluster needs root (slurmd runs as root)"
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        return "snakemake's SLURM executor plugin is not installed: pip install -e '.[slurm]'"
    missing = [tool for tool in ("munged", "munge", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo")
               if not shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin")]
    if missing:
        return f"SLURM/munge tools missing ({', '.join(missing)}): apt-get install slurm-wlm munge"
    return None


def _start_munge() -> subprocess.Popen | None:
    """Reuse a running munged; else start one (with a key, created if absent). Returns what to stop afterwards."""
    if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0:
        return None
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        key.write_bytes(os.urandom(1024))
    shutil.chown(key, "munge", "munge")
    key.chmod(0o400)
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    subprocess.run(["su", "-s", "/bin/sh", "munge", "-c", "/usr/sbin/munged"], check=True)
    for _ in range(100):
        if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0:
            return Path("/run/munge/munged.pid")
        time.sleep(0.1)
    raise RuntimeError("munged did not come up")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _write_slurm_conf(root: Path) -> Path:
    """slurm.conf for this host: its name, CPUs and ~90% of its memory; everything else under `root`, on ports of
    its own so that it never meets another cluster on the machine."""
    host = socket.gethostname().split(".")[0]
    mem_mb = int(int(Path("/proc/meminfo").read_text().split()[1]) / 1024 * 0.9)
    for sub in ("state", "spool", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    conf = root / "slurm.conf"
    conf.write_text(f"""\
ClusterName=quantlibtest
SlurmctldHost={host}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
SlurmUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmdSpoolDir={root}/spool
StateSaveLocation={root}/state
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
MpiDefault=none
NodeName={host} CPUs={os.cpu_count()} RealMemory={mem_mb} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
    return conf


def _stop(pid_file: Path) -> None:
    try:
        pid = int(pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            os.kill(pid, 0)
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _node_state() -> str:
    return subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30).stdout.strip()


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    reason = _cluster_unavailable()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("slurm")
    munged_pid = None
    # The default path: srun inside a batch job reads it (an SLURM_CONF of ours does not reach the job steps).
    conf = Path("/etc/slurm/slurm.conf")
    saved = conf.read_bytes() if conf.exists() else None
    try:
        # Where the daemons cannot start (a container without the privileges slurmd needs), the test cannot run here:
        # skip, with the daemons' own words. Anything wrong once the node is up fails the test.
        try:
            munged_pid = _start_munge()
            conf.parent.mkdir(parents=True, exist_ok=True)
            conf.write_text(_write_slurm_conf(root).read_text())
            for daemon in SLURM_DAEMONS:
                subprocess.run([f"/usr/sbin/{daemon}"], check=True, capture_output=True, text=True, timeout=60)
            deadline = time.time() + 60
            while (state := _node_state()) != "idle":
                if time.time() > deadline:
                    raise RuntimeError(f"the SLURM node is not idle after 60 s (sinfo: {state!r})")
                time.sleep(0.5)
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", None) or ""
            logs = "".join(p.read_text()[-800:] for p in (root / "log").glob("*.log"))
            pytest.skip(f"this machine cannot run a single-node SLURM cluster: {exc} {detail}\n{logs}")
        yield root
    finally:
        for daemon in reversed(SLURM_DAEMONS):
            _stop(root / f"{daemon}.pid")
        if munged_pid:
            _stop(munged_pid)
        if saved is None:
            conf.unlink(missing_ok=True)
        else:
            conf.write_bytes(saved)


def test_tiny_workflow_on_a_real_slurm_cluster(slurm_cluster, tmp_path, tiny_dir, text_files, reference_run):
    write_config(tmp_path, cluster_config(tiny_dir, text_files))
    t0 = time.time()
    proc = snakemake(tmp_path, "--profile", str(REPO / "profiles" / "slurm-local"), timeout=600)
    wall = time.time() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    # Every job but the local rules' was submitted to SLURM, and has its SLURM log named by its job id.
    remote_jobs = Counter(re.findall(r"^rule (\w+):", out, flags=re.M))
    local_jobs = set(re.findall(r"^localrule (\w+):", out, flags=re.M))
    assert local_jobs <= LOCAL_RULES, f"jobs run outside SLURM: {local_jobs - LOCAL_RULES}"
    assert {"calibration", "eval_windows", "quantize", "perplexity", "table"} <= set(remote_jobs), remote_jobs
    slurm_logs = list((tmp_path / ".snakemake" / "slurm_logs").rglob("*.log"))
    submitted = re.findall(r"submitted with SLURM jobid (\d+)", out)
    assert sorted(p.stem for p in slurm_logs) == sorted(set(submitted)) == sorted(submitted)
    log_rules = Counter(p.relative_to(tmp_path / ".snakemake" / "slurm_logs").parts[0].removeprefix("rule_")
                        for p in slurm_logs)
    assert log_rules == remote_jobs
    # Each job ran inside its SLURM allocation: its SLURM log holds the job step's Snakemake running that one rule to
    # the end.
    for log in slurm_logs:
        rule = log.relative_to(tmp_path / ".snakemake" / "slurm_logs").parts[0].removeprefix("rule_")
        text = log.read_text()
        assert "--executor slurm-jobstep" in text and f"rule {rule}:" in text, log
        assert f"Finished jobid: 0 (Rule: {rule})" in text, log
    # calibration, eval windows, 2 quantize, 3 perplexity, table (and any rule another branch adds to `all`)
    assert sum(remote_jobs.values()) >= 1 + 1 + 2 + 3 + 1
    assert result_fingerprint(tmp_path) == result_fingerprint(reference_run)
    assert_nothing_partial(tmp_path)
    print(f"\nSLURM: {len(submitted)} jobs submitted, workflow wall time {wall:.0f} s")
