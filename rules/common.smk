# Expansion of the config into short names and paths; every helper here is a thin call into quantlib (names and
# path templates: quantlib.catalog.names; what a spec reads: QuantSpec.inputs(); the config: quantlib.config).

import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError

from quantlib.access.adapters import read_config
from quantlib.artifacts.integrity import describe_problems, scan_artifacts
from quantlib.config.experiment import Experiment
from quantlib.config.preflight import check_sources
from quantlib.config.preflight import check_config_files, check_hub_for_download
from quantlib.errors import QuantlibError
from quantlib.jobs.requests import request_mb, runtime_minutes
from quantlib.catalog.names import DATASET_KEY_RE, MODEL_KEY_RE, PATHS, STAT_RE, evaldata_path, parse_ppl_protocol
from quantlib.catalog.pack_formats import check_format, wildcard_pattern
from quantlib.catalog.registry import stat_dependencies
from quantlib.catalog.names import parse_calib_name
from quantlib.catalog.spec import QuantSpec

try:
    check_config_files([str(p) for p in workflow.configfiles])
    EXP = Experiment(config)
    check_sources(EXP)  # the models' shapes first; targets get the same checks in spec_of
except QuantlibError as exc:
    sys.exit(f"Configuration error: {exc}")

# Before any job: an existing artifact whose recorded files are missing or resized, or that has no record (half
# written), would be taken as done; stop naming it (stat only: quantlib.artifacts.integrity.scan_artifacts). Not in
# `--lint` (the only parse without check_envvars) nor in a job that re-reads this file on a cluster node.
if workflow.is_main_process and workflow.check_envvars:
    _damaged = scan_artifacts(EXP.resources)
    if _damaged:
        sys.exit(f"Error: {describe_problems(_damaged)}")

RES = EXP.resources
# Torch rules run multi-threaded: Snakemake sets OMP_NUM_THREADS to a job's threads. `snakemake --report` runs
# without --cores, and then no job runs.
try:
    TORCH_THREADS = max(2, min(workflow.cores, 16))
except WorkflowError:
    TORCH_THREADS = 2


wildcard_constraints:
    model=MODEL_KEY_RE,
    dataset=DATASET_KEY_RE,
    seqlen=r"[0-9]+",
    stat=STAT_RE,
    # A quantized model's short name (never the unquantized "{model}.fp", nor a distilled one: rule distill, nor a
    # packed one: rule pack).
    name=r"(?!.*\.kd\.)(?!.*\.pack-)[a-z0-9][A-Za-z0-9_.-]*(?<!\.fp)",
    packformat=wildcard_pattern(),  # the catalog's pack formats
    unpacked=r"(?!.*\.pack-)[a-z0-9][A-Za-z0-9_.-]*(?<!\.fp)",
    base=r"[a-z0-9][A-Za-z0-9_.-]*",
    kd=r"[a-z0-9][a-z0-9_-]*\.n[0-9]+\.L[0-9]+(\.[A-Za-z0-9_-]+)*",
    anyname=r"[a-z0-9][A-Za-z0-9_.-]*",
    calib=r"[a-z0-9][A-Za-z0-9_.-]*\.n[0-9]+\.L[0-9]+(\.s[0-9]+)?",
    table=r"[A-Za-z0-9_-]+",


TABLE_FORMATS = ["md", "csv", "tex", "png"]


SPECS = {}  # name -> spec: Snakemake asks for a name's spec many times while it builds the DAG
UNCHECKED_MODELS = set()  # models whose shapes could not be checked yet (said once each)


def spec_of(name):
    """The spec of a short name from a target or wildcard; a bad name stops the DAG with its one-line reason. A name
    gets the checks a config entry gets (EXP.check_name: shapes against the model's config.json when on disk)."""
    if name in SPECS:
        return SPECS[name]
    try:
        spec = QuantSpec.parse(name)
        checked = EXP.check_name(spec)
    except QuantlibError as exc:
        sys.exit(f"Error: {exc}")
    SPECS[name] = spec
    if not checked and spec.model not in UNCHECKED_MODELS:
        UNCHECKED_MODELS.add(spec.model)
        print(f"Note: model '{spec.model}' has no config.json on disk yet (not fetched, no local source, not in the "
              "hub cache): the group sizes and gq of its names are checked by its fetch and by their jobs",
              file=sys.stderr)
    return spec


def hub_preflight(kind):
    """An input function of the download rules: before a download runs (not in a dry run), a hub id needs the hub;
    an unreachable hub stops the DAG in seconds with what to do. Adds no input."""

    def check(wildcards):
        if not workflow.dryrun:
            try:
                check_hub_for_download(EXP, kind, wildcards.model if kind == "model" else wildcards.dataset)
            except QuantlibError as exc:
                sys.exit(f"Configuration error: {exc}")
        return []

    return check


def all_tables():
    return expand(PATHS.tables, table=EXP.default_tables(), ext=TABLE_FORMATS)


def model_params_b(model):
    return EXP.model_cfg(model).get("params_b", 1.0)


def calib_inputs(wildcards):
    """The model and the dataset file of each dataset the calibration reads (a mixture's parts, in order)."""
    model, calib = parse_calib_name(wildcards.calib)
    files = [EXP.dataset_path(d) for d in EXP.calibration_datasets(calib.dataset)]
    return {"model": EXP.model_path(model), "dataset": files[0] if len(files) == 1 else files}


def calib_dataset_cfg(wildcards):
    return EXP.calibration_source(parse_calib_name(wildcards.calib)[1].dataset)


def quantize_inputs(wildcards):
    """The model and whatever the spec's catalog entries say it reads (calibration, statistics artifacts)."""
    spec = spec_of(wildcards.name)
    return {"model": EXP.model_path(spec.model), **spec.inputs(EXP.stat_settings)}


def model_config(model):
    """The model's config.json once fetched (the memory model reads its shapes), else None."""
    folder = EXP.model_path(model)
    return read_config(folder) if (Path(folder) / "config.json").exists() else None


def job_mem(job, model, spec):
    """mem_mb from the memory model (quantlib.jobs.requests); before the model is fetched, from its params_b."""
    try:
        return request_mb(job, model_config(model), spec, EXP.cfg, model_params_b(model))
    except QuantlibError as exc:
        sys.exit(f"Configuration error: {exc}")


def job_runtime(job, model):
    return runtime_minutes(job, model_params_b(model))


def quantize_mem(wildcards):
    spec = spec_of(wildcards.name)
    return job_mem("quantize", spec.model, spec)


def quantize_runtime(wildcards):
    return job_runtime("quantize", spec_of(wildcards.name).model)


def distill_inputs(wildcards):
    """The FP model (the teacher), the base checkpoint and the distillation windows."""
    spec = spec_of(f"{wildcards.base}.kd.{wildcards.kd}")
    return {"model": EXP.model_path(spec.model), **spec.distill_inputs()}


def distill_mem(wildcards):
    spec = spec_of(f"{wildcards.base}.kd.{wildcards.kd}")
    return job_mem("distill", spec.model, spec)


def distill_runtime(wildcards):
    return job_runtime("distill", spec_of(f"{wildcards.base}.kd.{wildcards.kd}").model)


def stats_inputs(wildcards):
    """The model, the calibration windows and the statistics this one is computed from (catalog `needs`)."""
    try:
        return {"model": EXP.model_path(parse_calib_name(wildcards.calib)[0]),
                "tokens": PATHS.calibration.format(calib=wildcards.calib),
                **stat_dependencies(wildcards.stat, wildcards.calib, EXP.stat_settings)}
    except QuantlibError as exc:
        sys.exit(f"Error: {exc}")


def stats_mem(wildcards):
    model, calib = parse_calib_name(wildcards.calib)
    return job_mem(f"stats:{wildcards.stat}", model, calib)


def stats_runtime(wildcards):
    return job_runtime("stats", parse_calib_name(wildcards.calib)[0])


def ppl_runtime(wildcards):
    return job_runtime("perplexity", spec_of(wildcards.anyname).model)


def lmeval_runtime(wildcards):
    return job_runtime("lmeval", spec_of(wildcards.anyname).model)


def ppl_inputs(wildcards):
    spec = spec_of(wildcards.anyname)
    model = model_input(wildcards)
    windows = {}
    for protocol in EXP.ppl_protocols():
        dataset, seqlen, _ = parse_ppl_protocol(protocol)
        windows[protocol] = evaldata_path(spec.model, dataset, seqlen)
    return {"model": model, **windows}


def ppl_mem(wildcards):
    spec = spec_of(wildcards.anyname)
    return job_mem("perplexity", spec.model, spec)


def lmeval_mem(wildcards):
    spec = spec_of(wildcards.anyname)
    return job_mem("lmeval", spec.model, spec)


def model_input(wildcards):
    """The model a {anyname} evaluation reads: the resources checkpoint ({model}.fp), a quantized directory, or a
    packed one ({name}.pack-{format})."""
    return EXP.checkpoint_path(spec_of(wildcards.anyname))


def pack_mem(wildcards):
    # One decoder block at a time: its source tensors, codes and packed copy (quantlib.jobs.memory.pack_phases).
    spec = spec_of(f"{wildcards.unpacked}.pack-{wildcards.packformat}")
    return job_mem("pack", spec.model, spec)


def pack_input(wildcards):
    spec = spec_of(f"{wildcards.unpacked}.pack-{wildcards.packformat}")  # refuses a model the format cannot hold
    return EXP.quantized_path(spec.unpacked())


def pack_refusal(wildcards):
    """The input of pack_refused, which says why pack cannot make results/packed/{anyformat}/{anyname}. An unknown
    format, an FP model, a model the format cannot hold or a bad name stop the DAG with the project's message, not
    Snakemake's generic one. Snakemake expands each rule whose output matches, so this also runs for the paths pack
    makes; those get an input that nothing makes, and pack_refused is never chosen in pack's place."""
    path = PATHS.packed.format(format=wildcards.anyformat, name=wildcards.anyname)
    try:
        check_format(wildcards.anyformat)
    except QuantlibError as exc:
        sys.exit(f"Error: {path}: {exc}")
    spec_of(f"{wildcards.anyname}.pack-{wildcards.anyformat}")  # an FP model, one the format cannot hold, a bad name
    return [f"{path} (made by rule pack)"]
