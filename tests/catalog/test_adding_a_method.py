"""docs/adding-a-method.md runs as written: its plugin (a statistic of the FP model, `colnorm`, and a method that
reads it, `clipsearch`), taken from the page's code blocks, goes through the runner and through the workflow (a dry
run, then its stats and quantize jobs) with nothing in the package edited; the page's other examples behave as the
shipped solvers they show."""

from __future__ import annotations

import copy
import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import REPO, calib_tokens, tiny_model
from quantlib.access.adapters import adapter_for
from quantlib.catalog import registry
from quantlib.catalog.spec import QuantSpec
from quantlib.config.experiment import Experiment
from quantlib.config.plugins import load_plugins
from quantlib.errors import ConfigError
from quantlib.runner.walk import quantize_model
from quantlib.solvers.contract import LayerSolver, solve_layer
from quantlib.stats.artifacts import compute_statistic, open_statistic

sys.path.insert(0, str(REPO / "tests" / "jobs"))  # the workflow tests' helpers
from test_workflow import snakemake, tiny_config, write_config  # noqa: E402

DOC = REPO / "docs" / "adding-a-method.md"
PLUGIN, IMPL = "colnorm_plugin", "colnorm_impl"
NAME = "tiny.toy.n8.L32.clipsearch.w3g32"


def doc_examples() -> dict[str, str]:
    """The page's code blocks marked `<!-- example: KEY -->`, by key."""
    found = re.findall(r"<!-- example: (\S+) -->\n```python\n(.*?)```", DOC.read_text(), re.DOTALL)
    return dict(found)


def doc_namespace(key: str) -> dict:
    namespace: dict = {}
    exec(compile(doc_examples()[key], f"{DOC.name} ({key})", "exec"), namespace)
    return namespace


def pythonpath(folder: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(folder), env.get("PYTHONPATH")) if p)
    return env


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    """The page's plugin written as two modules and loaded through the config's hook; its method and statistic are
    unregistered afterwards, so the rest of the session sees the shipped ones only (its option token stays: an
    identical option registers again without complaint)."""
    folder = tmp_path_factory.mktemp("plugin")
    examples = doc_examples()
    for module in (PLUGIN, IMPL):
        (folder / f"{module}.py").write_text(examples[f"{module}.py"])
    sys.path.insert(0, str(folder))
    try:
        load_plugins([PLUGIN])
        load_plugins([PLUGIN])  # a second load (another Experiment, say) registers nothing twice
        yield SimpleNamespace(folder=folder, impl=importlib.import_module(IMPL))
    finally:
        sys.path.remove(str(folder))
        registry.SOLVERS.pop("clipsearch", None)
        registry.STATISTICS.pop("colnorm", None)
        for module in (PLUGIN, IMPL):
            sys.modules.pop(module, None)


def input_colnorms(model, tokens) -> dict[str, torch.Tensor]:
    """E[x_j^2] of every quantized linear's input, from one forward pass of the whole model (not the statistic's
    block-by-block walk)."""
    adapter = adapter_for(model)
    sums, handles = {}, []
    for i, block in enumerate(adapter.block_list(model)):
        for name, lin in adapter.linears(block):
            def add(module, args, key=f"{adapter.blocks}.{i}.{name}"):
                sums[key] = args[0].detach().float().reshape(-1, module.in_features).square().sum(0)
            handles.append(lin.register_forward_pre_hook(add))
    with torch.no_grad():
        model(tokens, use_cache=False)
    for h in handles:
        h.remove()
    return {key: s / tokens.numel() for key, s in sums.items()}


def test_the_statistic_reaches_the_method_through_the_runner(plugin, tmp_path, monkeypatch):
    spec = QuantSpec.parse(NAME)
    assert spec.mode == "data_free" and not spec.needs_tokens  # reads the statistic, not the windows
    assert spec.inputs()["colnorm"] == "results/stats/colnorm/tiny.toy.n8.L32"
    model, tokens = tiny_model("llama"), calib_tokens(8, 32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # input channels of very different energy, as in trained models
        for name, module in model.named_modules():
            if name.endswith("layernorm"):
                module.weight.mul_(torch.randn(module.weight.shape, generator=g).exp())
    fp = copy.deepcopy(model)
    reference = input_colnorms(fp, tokens)

    compute_statistic("colnorm", model, tokens, tmp_path / "colnorm", spec.calib_name(), spec.model, progress=False)
    manifest = json.loads((tmp_path / "colnorm" / "manifest.json").read_text())
    assert (manifest["stat"], manifest["model"], manifest["calib"], manifest["blocks"]) == (
        "colnorm", "tiny", "tiny.toy.n8.L32", 2)
    calls = []
    solve = plugin.impl.solve

    def spy(W, task):
        calls.append((task.name, W.clone(), task.stat("colnorm").clone()))
        return solve(W, task)

    monkeypatch.setattr(plugin.impl, "solve", spy)  # the runner resolves the entry's impl path when it starts
    statistics = {"colnorm": open_statistic("colnorm", tmp_path / "colnorm", spec)}
    report = quantize_model(model, spec, None, statistics=statistics, progress=False)
    monkeypatch.undo()

    # Wiring: one call per subgroup of every block, each with its own layers' statistic, one row per output row.
    adapter = adapter_for(fp)
    blocks = adapter.block_list(fp)
    expected = [(i, group) for i in range(len(blocks)) for group in adapter.subgroups]
    assert [name for name, _, _ in calls] == [f"{adapter.blocks}.{i}.{'+'.join(g)}" for i, g in expected]
    for (i, group), (_, W, stat) in zip(expected, calls):
        assert stat.shape == W.shape
        row = 0
        for name in group:
            lin = blocks[i].get_submodule(name)
            assert torch.equal(W[row:row + lin.out_features], lin.weight.float())
            torch.testing.assert_close(stat[row:row + lin.out_features],
                                       reference[f"{adapter.blocks}.{i}.{name}"].expand(lin.out_features, -1),
                                       rtol=1e-4, atol=1e-7)
            row += lin.out_features
    assert {d["bits_per_weight"] for d in report.layers.values()} == {3 + 32 / 32}

    # The result depends on the statistic as it should: per layer, its colnorm-weighted rounding error is at most
    # that of the same search weighted uniformly and that of plain RTN, and below both in total.
    rtn = QuantSpec.parse("tiny.rtn.w3g32")
    totals = torch.zeros(3, dtype=torch.float64)
    for i, block in enumerate(blocks):
        for name, lin in adapter.linears(block):
            full = f"{adapter.blocks}.{i}.{name}"
            W = lin.weight.detach().float()
            results = (model.get_submodule(full).weight.detach().float(),
                       solve_layer(W, None, spec, full, {"colnorm": torch.ones_like(W)}).weight,
                       solve_layer(W, None, rtn, full).weight)
            costs = torch.tensor([float((reference[full] * (W - W_hat).square()).sum()) for W_hat in results],
                                 dtype=torch.float64)
            assert costs[0] <= costs[1:].min() * (1 + 1e-4), (full, costs)
            totals += costs
    assert totals[0] < 0.99 * totals[1] and totals[0] < 0.99 * totals[2], totals

    # The API computes the statistic itself and gets the same model.
    import quantlib

    again = copy.deepcopy(fp)
    quantlib.quantize(again, NAME, tokens, progress=False)
    for full in report.layers:
        assert torch.equal(again.get_submodule(full).weight, model.get_submodule(full).weight), full


def test_the_option_and_check_of_the_entry(plugin):
    spec = QuantSpec.parse(NAME + ".csteps3")
    assert spec.opt("clip_steps") == 3 and spec.short_name() == NAME + ".csteps3"
    assert QuantSpec.parse(NAME).opt("clip_steps") == 7
    with pytest.raises(ConfigError, match="clip_steps must be between 1 and 10, got 0"):
        QuantSpec.parse(NAME + ".csteps0")


def test_the_workflow_plans_the_statistic_for_the_method(plugin, tmp_path, tiny_dir, text_files, monkeypatch):
    """A config that lists the plugin gets a `stats` job for `colnorm` feeding the method's `quantize` job, and both
    run, though nothing in the package, its rules or its scripts names either."""
    for path in [REPO / "Snakefile", *(REPO / "rules").glob("*.smk"), *(REPO / "workflow").rglob("*.py"),
                 *(REPO / "quantlib").rglob("*.py")]:
        assert not re.search("colnorm|clipsearch", path.read_text()), path
    monkeypatch.setenv("PYTHONPATH", pythonpath(plugin.folder)["PYTHONPATH"])
    cfg = tiny_config(tiny_dir, text_files)
    cfg["plugins"] = [PLUGIN]
    cfg["methods"] = [{"id": "clip", "label": "ClipSearch", "solver": "clipsearch", "bits": [3], "group_size": [32]}]
    write_config(tmp_path, cfg)
    proc = snakemake(tmp_path, "-n", "--cores", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = {}
    for rule, body in re.findall(r"^(?:local)?rule (\w+):\n((?:    .*\n)+)", proc.stdout, re.MULTILINE):
        fields = dict(re.findall(r"^    (\w+): (.*)$", body, re.MULTILINE))
        jobs.setdefault(rule, []).append({k: v.split(", ") for k, v in fields.items()})
    stats_dir = "results/stats/colnorm/tiny.toytrain.n8.L32"
    assert [j["output"] for j in jobs["stats"]] == [[stats_dir]]
    assert "results/calibration/tiny.toytrain.n8.L32.pt" in jobs["stats"][0]["input"]
    assert [j["output"] for j in jobs["quantize"]] == [["results/quantized/tiny.toytrain.n8.L32.clipsearch.w3g32"]]
    assert stats_dir in jobs["quantize"][0]["input"]
    assert "results/calibration/tiny.toytrain.n8.L32.pt" not in jobs["quantize"][0]["input"]

    # And they run: each job's script imports the plugin (quantlib.jobs.script.run_script).
    target = "results/quantized/tiny.toytrain.n8.L32.clipsearch.w3g32"
    proc = snakemake(tmp_path, "--cores", "2", target)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    manifest = json.loads((tmp_path / stats_dir / "manifest.json").read_text())
    assert manifest["stat"] == "colnorm" and manifest["calib"] == "tiny.toytrain.n8.L32" and manifest["blocks"] == 2
    layers = json.loads((tmp_path / target / "diagnostics.json").read_text())["layers"]
    assert len(layers) == 14 and all(d["weighted_error"] > 0 and d["bits_per_weight"] == 4 for d in layers.values())

    del cfg["plugins"]
    write_config(tmp_path, cfg)
    proc = snakemake(tmp_path, "-n", "--cores", "2")
    assert proc.returncode != 0 and "unknown solver 'clipsearch'" in proc.stdout + proc.stderr


def test_a_job_imports_the_plugins_first(plugin):
    """A job's script sees the plugin's entries; a plugin that does not import stops it in one line."""
    code = ("import sys\n"
            "from types import SimpleNamespace\n"
            "from quantlib.catalog import registry\n"
            "from quantlib.jobs.script import run_script\n"
            "smk = SimpleNamespace(log=[], wildcards=[], rule='stats', threads=1, config={'plugins': sys.argv[1:]})\n"
            "run_script(smk, lambda smk: print('colnorm' in registry.STATISTICS, 'clipsearch' in registry.SOLVERS))\n")

    def run(*plugins):
        return subprocess.run([sys.executable, "-c", code, *plugins], capture_output=True, text=True,
                              env=pythonpath(plugin.folder), timeout=300, check=False)

    proc = run(PLUGIN)
    assert proc.returncode == 0 and proc.stdout.split() == ["True", "True"], proc.stderr[-2000:]
    proc = run("no_such_plugin")
    assert proc.returncode == 1 and "cannot import 'no_such_plugin'" in proc.stderr, proc.stderr[-2000:]
    assert "PYTHONPATH" in proc.stderr and "Traceback" not in proc.stderr


def test_the_config_hook(plugin):
    cfg = tiny_config(Path("tiny"), {"train": "train.jsonl", "test": "test.jsonl"})
    assert Experiment(cfg).cfg["plugins"] == []
    cfg["plugins"] = [PLUGIN]
    cfg["methods"] = [{"id": "clip", "solver": "clipsearch", "bits": [3], "group_size": [32]}]
    for _ in range(2):  # the same plugins twice in one process
        spec = Experiment(cfg).all_specs()[-1]
        assert spec.short_name() == "tiny.toytrain.n8.L32.clipsearch.w3g32"
        assert spec.inputs()["colnorm"] == "results/stats/colnorm/tiny.toytrain.n8.L32"
    for plugins, message in ((["no_such_plugin"], (r"cannot import 'no_such_plugin' \(ModuleNotFoundError: .*"
                                                   r"add its folder to PYTHONPATH")),
                             (["colnorm_plugin.py"], "'colnorm_plugin.py' is not a module name"),
                             ("colnorm_plugin", "expected a list of module names")):
        with pytest.raises(ConfigError, match=message):
            Experiment({**cfg, "plugins": plugins})
    # The entries module is pure Python: reading a config imports neither torch nor the implementations.
    code = (f"import sys\nfrom quantlib.config.plugins import load_plugins\nload_plugins([{PLUGIN!r}])\n"
            f"print(sorted(m for m in sys.modules if m in ('torch', {IMPL!r})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=pythonpath(plugin.folder),
                          timeout=120, check=False)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_the_pages_solver_examples_are_the_shipped_solvers():
    from quantlib.solvers import ldlq, lsq

    g = torch.Generator().manual_seed(0)
    W = torch.randn(48, 64, generator=g)
    X = torch.randn(512, 64, generator=g) @ torch.randn(64, 64, generator=g)
    H = X.T @ X / len(X)
    solver = LayerSolver(QuantSpec.parse("m.c4.n8.L32.ldlq.w3g32"))
    ours, theirs = doc_namespace("layerwise")["solve"](W, solver.task(H, "x")), ldlq.solve(W, solver.task(H, "x"))
    assert torch.equal(ours.weight, theirs.weight) and ours.stats == theirs.stats

    solver = LayerSolver(QuantSpec.parse("m.c4.n8.L32.lsq.w3g32"))
    linear = torch.nn.Linear(64, 48)
    modules = [wrap(linear, solver.task(None, "x")) for wrap in (doc_namespace("blockwise")["wrap"], lsq.wrap)]
    for m in modules:
        m.log_scale.data += 0.1 * torch.randn(m.log_scale.shape, generator=torch.Generator().manual_seed(1))
    x = torch.randn(4, 64)
    assert torch.equal(modules[0](x), modules[1](x))
    assert torch.equal(modules[0].freeze().weight, modules[1].freeze().weight)
    assert modules[0].param_groups(solver.spec)[0]["lr"] == modules[1].param_groups(solver.spec)[0]["lr"]


def test_every_python_block_of_the_page_is_valid_python():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.DOTALL)
    assert len(blocks) == len(doc_examples()) == 4
    for block in blocks:
        compile(block, str(DOC), "exec")
