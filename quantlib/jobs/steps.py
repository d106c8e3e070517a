"""One function per workflow step. The Snakemake scripts are thin adapters to these; each is usable on its own."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from quantlib.access.adapters import check_group_size_fits, check_row_groups_fit, read_config
from quantlib.access.blocks import BlockAccess
from quantlib.access.datasets import calibration_windows, eval_windows, mixture_windows, read_texts
from quantlib.access.lazy import LazyModel, offloaded
from quantlib.access.models import load_model, load_tokenizer, resolve_attn, resolve_device, resolve_dtype
from quantlib.artifacts.atomic import atomic_file, versions, write_json
from quantlib.artifacts.integrity import verify
from quantlib.catalog import registry
from quantlib.catalog.names import parse_calib_name, parse_lmeval_protocol, parse_ppl_protocol
from quantlib.catalog.spec import QuantSpec
from quantlib.checkpoint.pack.load import load_packed
from quantlib.checkpoint.pack.writer import pack_checkpoint
from quantlib.checkpoint.reader import is_packed_dir, load_any
from quantlib.checkpoint.writer import CheckpointWriter
from quantlib.errors import ConfigError
from quantlib.evaluation.lmeval import TaskSet, evaluate_tasks
from quantlib.evaluation.perplexity import perplexity_by_block
from quantlib.jobs.memory import (
    DTYPE_BYTES,
    MB,
    eval_streams,
    parse_memory,
    plan_pack,
    plan_quantize,
    whole_model_peak,
)
from quantlib.jobs.memory_backward import plan_distill, plan_statistic
from quantlib.jobs.requests import lmeval_tokens
from quantlib.runner.distill import distill as train
from quantlib.runner.group import QuantizedModelReport
from quantlib.stats.progress import BlockProgress, StepProgress
from quantlib.runner.walk import quantize_model, transforms_model
from quantlib.stats.artifacts import compute_statistic, open_statistic

log = logging.getLogger("quantlib")


def _save_tensor(obj, path) -> None:
    with atomic_file(path, seal=True) as tmp:
        torch.save(obj, tmp)


def load_tensor(path):
    """A tensor artifact (calibration or evaluation windows), verified first."""
    verify(path)
    return torch.load(path)


def calibrate(model_dir, dataset_file, ds_cfg: dict, calib_name: str, out_pt, out_json) -> None:
    """Sample the calibration windows named by `calib_name` ({model}.{dataset}.n{n}.L{L}[.s{seed}]). A mixture
    (`ds_cfg` from `Experiment.calibration_source`, with `parts`) reads one dataset file per part, in its order."""
    _, calib = parse_calib_name(calib_name)
    tok = load_tokenizer(model_dir)
    if "parts" in ds_cfg:
        files = [dataset_file] if isinstance(dataset_file, (str, Path)) else list(dataset_file)
        texts = {part: read_texts(f) for part, f in zip(ds_cfg["parts"], files, strict=True)}
        windows, manifest = mixture_windows(texts, tok, ds_cfg, calib.nsamples, calib.seqlen, calib.seed)
    else:
        windows, manifest = calibration_windows(read_texts(dataset_file), tok, ds_cfg, calib.nsamples, calib.seqlen,
                                                calib.seed)
    _save_tensor(windows, out_pt)
    write_json(out_json, {"name": calib_name, "dataset": calib.dataset, "source": ds_cfg, "nsamples": calib.nsamples,
                          "seqlen": calib.seqlen, "tokens": windows.numel(), **manifest})
    drawn_from = (", ".join(f"{k}: {v}" for k, v in manifest["counts"].items()) if "counts" in manifest
                  else f"{manifest['documents']} documents" if "documents" in manifest
                  else f"{manifest.get('text_tokens', '?')} tokens of joined text" if "text_tokens" in manifest
                  else manifest["sampler"])
    log.info("calibration %s: %d windows of %d tokens (%s)", calib_name, calib.nsamples, calib.seqlen, drawn_from)


def make_eval_windows(model_dir, dataset_file, ds_cfg: dict, seqlen: int, out_pt) -> None:
    tok = load_tokenizer(model_dir)
    windows, info = eval_windows(read_texts(dataset_file), tok, ds_cfg, seqlen)
    _save_tensor({"windows": windows, "info": info}, out_pt)
    log.info("%d evaluation windows of %d tokens", len(windows), seqlen)


def _compute(compute: dict):
    device = resolve_device(compute.get("device", "auto"))
    return device, resolve_dtype(compute.get("dtype", "auto"), device), resolve_attn(
        compute.get("attn_implementation", "auto"), device)


def quantize(name: str, model_dir, inputs: dict, out_dir, compute: dict) -> None:
    """Quantize the model named by `name`. `inputs` maps each artifact the spec reads (`QuantSpec.inputs()`: the
    calibration windows and their manifest, statistics of the FP model) to its path."""
    spec = QuantSpec.parse(name)
    # Checks that need only config.json come before any weight or data is loaded.
    model_cfg = read_config(model_dir)
    check_group_size_fits(model_cfg, spec.group_size, spec.model)
    check_row_groups_fit(model_cfg, spec.opt_or("guided_groups", 0), spec.model, "gq")
    missing = sorted(set(spec.inputs()) - set(inputs) - {"calib_json"})  # the manifest only feeds diagnostics
    if missing:
        raise ValueError(f"{name} reads {missing}, which were not given")
    seed = compute.get("seed", 0)
    torch.manual_seed(seed)
    device, dtype, attn = _compute(compute)
    t0 = time.time()
    # Chunk size and stream placement within compute.max_memory; a budget too small fails here, before any work.
    plan = plan_quantize(model_cfg, spec, compute, torch.finfo(dtype).bits // 8)
    statistics = {stat: open_statistic(stat, inputs[stat], spec) for stat in spec.statistic_kinds()}
    tokens = load_tensor(inputs["calib"]) if "calib" in inputs else None
    # The model stays on disk: each block is read when the runner reaches it, written to its shard of the
    # checkpoint when quantized and freed (peak memory: one block and its statistics, not the model).
    lazy = LazyModel(model_dir, dtype, attn)
    writer = CheckpointWriter()
    prefix = lazy.prefix
    # A spec that transforms the whole model first (rotations) holds it in memory; its outside-the-blocks tensors
    # (rotated embeddings, untied head) are then the model's own, not the checkpoint's.
    whole = transforms_model(spec)
    if whole:
        lazy.load_all()
    access = BlockAccess(lazy.model, lazy=None if whole else lazy,
                         on_block=lambda i, block: writer.write_block(i, f"{prefix}.{i}", block.state_dict()))
    # Progress kept beside the output after each block (its shard, the streams after it): a job killed and started
    # again goes on from the block after the last finished one, to the same bytes (quantlib.stats.progress).
    progress = BlockProgress(out_dir, spec.short_name(), inputs={**inputs, "model": model_dir},
                             settings={"seed": seed, "device": device, "dtype": str(dtype), "attn": attn,
                                       "chunk_tokens": plan.chunk_tokens}, parts={"checkpoint": writer})
    with progress, writer.writing(out_dir, len(lazy), into=progress.checkpoint):
        report = quantize_model(lazy.model, spec, tokens, device=device, chunk_tokens=plan.chunk_tokens,
                                statistics=statistics, on_layer=writer.add, seed=seed, streams=plan.streams,
                                access=access, resume=progress)
        extra = {"compute": {"device": device, "dtype": str(dtype), "attn": attn,
                             "threads": torch.get_num_threads()}, "memory": plan.record(), "total_seconds": None}
        if inputs.get("calib_json"):
            import json
            extra["calibration"] = {k: v for k, v in json.loads(Path(inputs["calib_json"]).read_text()).items()
                                    if k not in ("draws", "window_parts")}
        extra["total_seconds"] = round(time.time() - t0, 2)
        writer.save(lazy.model, spec, report, out_dir, model_dir, extra,
                    outer_state=None if whole else lazy.outer_state())
    log.info("%s quantized in %.1fs", name, time.time() - t0)


def distill(name: str, model_dir, inputs: dict, out_dir, compute: dict, max_steps: int | None = None,
            save_every: int = 8) -> None:
    """Distil the quantized model `name`'s base (a `.kd` name): `inputs` holds its base checkpoint (`base`) and the
    distillation windows (`calib`, `calib_json`); the teacher is the FP model in `model_dir`. Both are read block by
    block (`quantlib.runner.distill`); each block's shard is written when its trained layers are. The training's
    state is kept beside the output every `save_every` steps: a job killed and started again goes on after the last
    step kept, to the same bytes (`quantlib.stats.progress.StepProgress`)."""
    import json

    spec = QuantSpec.parse(name)
    if spec.distill is None:
        raise ValueError(f"{name} has no distillation part (.kd...)")
    device, _, attn = _compute(compute)
    # Streams within compute.max_memory; a budget too small fails here, before any weight is read.
    plan = plan_distill(read_config(model_dir), spec, compute)
    t0 = time.time()
    tokens = load_tensor(inputs["calib"])
    student = LazyModel(inputs["base"], torch.float32, attn)
    if not student.quantized:
        raise ConfigError(f"{inputs['base']} is not a quantlib checkpoint: distillation trains a quantized model")
    teacher = LazyModel(model_dir, torch.float32, attn)
    writer = CheckpointWriter()
    layers = {}
    seed = compute.get("seed", 0)
    # What the training computes from identifies its progress: the spec (with its .kd settings), the base, the
    # windows, the teacher and the settings that change the result (`calib_json` only feeds the diagnostics).
    progress = StepProgress(out_dir, spec.short_name(), {k: v for k, v in {**inputs, "model": model_dir}.items()
                                                         if k != "calib_json"},
                            {"seed": seed, "device": device, "attn": attn, "max_steps": max_steps}, every=save_every)

    def write(i, block, reps):
        for layer, rep in reps.items():
            writer.add(layer, rep)
            layers[layer] = {"shape": list(rep.shape), "bits_per_weight": rep.bits_per_weight}
        writer.write_block(i, f"{student.prefix}.{i}", {k: v.cpu() for k, v in block.state_dict().items()
                                                         if v.device.type != "meta"})

    with progress, writer.writing(out_dir, len(student), into=progress.checkpoint):
        outer, diag = train(student, teacher, tokens, spec, seed=seed, device=device, max_steps=max_steps,
                            streams=plan.streams, on_block=write, resume=progress)
        report = QuantizedModelReport(layers=layers, seconds=diag["seconds"])
        extra = {"distill": diag, "compute": {"device": device, "dtype": "torch.float32", "attn": attn,
                                              "threads": torch.get_num_threads()}, "memory": plan.record()}
        if inputs.get("calib_json"):
            extra["calibration"] = {k: v for k, v in json.loads(Path(inputs["calib_json"]).read_text()).items()
                                    if k not in ("draws", "window_parts")}
        extra["total_seconds"] = round(time.time() - t0, 2)
        writer.save(student.model, spec, report, out_dir, inputs["base"], extra, outer_state=outer)
    log.info("%s distilled in %.1fs (loss %.5f -> %.5f)", name, time.time() - t0, diag["loss"][0] if diag["loss"]
             else float("nan"), diag["loss"][-1] if diag["loss"] else float("nan"))


def statistic(stat: str, calib_name: str, model_dir, calib_pt, out_dir, compute: dict, inputs: dict | None = None
              ) -> None:
    """Compute the statistics artifact `stat` (a statistic and its parameters, as `rules/stats.smk` names it) of the FP
    model on the calibration windows `calib_name`: an artifact shared by every method that needs it. `inputs` maps
    the statistics it is computed from to their artifacts."""
    model_key, calib = parse_calib_name(calib_name)
    device, dtype, attn = _compute(compute)
    # Where activations are kept within compute.max_memory; a budget too small fails here, before any weight is read.
    plan = plan_statistic(read_config(model_dir), stat, calib, compute, torch.finfo(dtype).bits // 8)
    tokens = load_tensor(calib_pt)
    access = None
    if registry.STATISTICS[registry.parse_stat_name(stat)[0]].block_by_block:
        lazy = LazyModel(model_dir, dtype, attn)
        model, access = lazy.model, BlockAccess(lazy.model, lazy=lazy)
    else:  # computed on the whole model
        model = load_model(model_dir, dtype, attn)
    # A statistic computed block by block keeps its progress beside its output: started again after a kill, it goes
    # on after the last finished block (quantlib.stats.progress; what it computes from identifies the progress).
    settings = {k: compute.get(k) for k in ("calib_chunk_tokens", "dtype", "device")}
    with BlockProgress(out_dir, f"{stat}:{calib_name}", {"model": model_dir, "calib": calib_pt, **(inputs or {})},
                       settings) as resume:
        compute_statistic(stat, model, tokens, out_dir, calib_name, model_key, inputs=inputs, device=device,
                          chunk_tokens=compute.get("calib_chunk_tokens", 65536), access=access,
                          streams=plan.streams, resume=resume if access is not None else None)


def pack(name: str, src, out_dir, pack_cfg: dict, compute: dict | None = None) -> dict:
    """Write the quantized checkpoint `src` in the external layout that `name`'s `.pack-{format}` token names, one
    decoder block at a time; a `compute.max_memory` below the memory model's peak (`plan_pack`) is refused before
    any weight is read."""
    spec = QuantSpec.parse(name)
    if spec.pack is None:
        raise ConfigError(f"'{name}' names no pack format (a final .pack-{{format}} token)")
    cfg = read_config(src)
    stored = cfg.get("dtype") or cfg.get("torch_dtype")  # of the unquantized tensors (transformers renamed the key)
    plan = plan_pack(cfg, spec, pack_cfg, compute or {}, DTYPE_BYTES.get(stored, 4))
    log.info("%s: estimated peak %d MB", name, plan.peak // MB)
    report = pack_checkpoint(src, out_dir, spec.pack, pack_cfg.get("dtype", "float16"),
                             pack_cfg.get("stat_dtype", "float16"))
    log.info("%s: %d layers packed as %s, %.3f bits per weight on disk, %.1f MB, %.1f s", name,
             report["quantized_layers"], spec.pack, report["bits_per_weight_on_disk"], report["file_bytes"] / 1e6,
             report["seconds"])
    return report


def storage_bits(model_path) -> float | None:
    """Average storage bits per quantized weight of a quantized checkpoint (None for an unquantized model); for a
    packed one, the bits its layout takes on disk."""
    import json

    packed = Path(model_path) / "pack_report.json"
    if packed.exists():
        return json.loads(packed.read_text())["bits_per_weight_on_disk"]
    diag = Path(model_path) / "diagnostics.json"
    if not diag.exists():
        return None
    return json.loads(diag.read_text()).get("avg_bits_per_weight")


def perplexity(name: str, model_path, windows: dict, dataset_cfgs: dict, outputs: dict, compute: dict,
               batch_size: int = 4) -> dict:
    """Evaluate one model under several protocols: `windows` and `outputs` map each protocol name
    ({dataset}.L{seqlen}[.nw{n}]) to its window file and its result JSON. A full-precision or quantlib checkpoint
    is read block by block (one block in memory at a time, `quantlib.access.lazy`); a packed one is loaded whole."""
    spec = QuantSpec.parse(name)
    device, dtype, attn = _compute(compute)
    if is_packed_dir(model_path):
        model = load_packed(model_path, dtype, attn)
        access = BlockAccess(model)
    else:
        lazy = LazyModel(model_path, dtype, attn)
        model, access = lazy.model, BlockAccess(lazy.model, lazy=lazy)
    records, model_cfg = {}, read_config(model_path)
    for protocol, out_json in outputs.items():
        t0 = time.time()
        dataset, seqlen, max_windows = parse_ppl_protocol(protocol)
        data = load_tensor(windows[protocol])
        if data["windows"].shape[1] != seqlen:
            raise ValueError(f"{windows[protocol]} holds windows of {data['windows'].shape[1]} tokens, not {seqlen}")
        n = len(data["windows"]) if max_windows is None else min(max_windows, len(data["windows"]))
        streams = eval_streams(model_cfg, n, seqlen, batch_size, compute, torch.finfo(dtype).bits // 8)
        res = perplexity_by_block(model, data["windows"], max_windows, batch_size, device, access=access,
                                  streams=streams)
        ds_cfg = dataset_cfgs[dataset]
        records[protocol] = {
            "name": name, "model": spec.model, "spec": spec.short_name(), "metric": "ppl", "dataset": dataset,
            "value": res["ppl"], **res, "bits_per_weight": storage_bits(model_path),
            "protocol": {"dataset": dataset, "source": {k: v for k, v in ds_cfg.items() if k != "label"},
                         "seqlen": seqlen, "windows": res["windows"], "windows_available": len(data["windows"]),
                         "max_windows": max_windows, "tokens_scored": res["tokens_scored"], "dtype": str(dtype),
                         "device": device, "attn": attn, **data["info"]},
            "seconds": round(time.time() - t0, 2), "versions": versions(),
        }
        write_json(out_json, records[protocol])
        log.info("%s %s: ppl %.4f over %d windows", name, protocol, res["ppl"], res["windows"])
    return records


def _lmeval_offload(model_path, compute: dict, batch_size: int, tasks: dict, dtype) -> bool:
    """lm-eval runs the model in one piece: when the whole model does not fit `compute.max_memory`, its blocks are
    offloaded to disk (`quantlib.access.lazy.offloaded`). A packed checkpoint is always loaded whole."""
    budget = parse_memory(compute.get("max_memory"))
    if budget is None or is_packed_dir(model_path):
        return False
    need = whole_model_peak(read_config(model_path), lmeval_tokens(tasks), batch_size, torch.finfo(dtype).bits // 8)
    if need > budget:
        log.info("the whole model needs about %.0f MB, over compute.max_memory (%.0f MB): its blocks are offloaded "
                 "to disk for lm-eval", need / MB, budget / MB)
    return need > budget


def lm_eval_tasks(name: str, model_path, tasks: dict, outputs: dict, compute: dict, batch_size: int = 8,
                  bootstrap_iters: int = 1000) -> dict:
    """Evaluate one model on lm-eval tasks. `tasks` maps task names to {num_fewshot, limit, source}; `outputs` maps
    each protocol name ({task}.{shots}shot[.lim{n}]) to its result JSON. Every task's data is loaded before the
    model, so a missing dataset fails fast; the model is loaded once for all tasks."""
    import tempfile


    spec = QuantSpec.parse(name)
    for protocol in outputs:
        task, shots, limit = parse_lmeval_protocol(protocol)
        opts = tasks.get(task) or {}
        if (opts.get("num_fewshot", 0), opts.get("limit")) != (shots, limit):
            raise ValueError(f"output {protocol} does not match the task settings {opts}")
    device, dtype, attn = _compute(compute)
    with tempfile.TemporaryDirectory(prefix="quantlib-lmeval-") as tmp:
        taskset = TaskSet(tasks, tmp)
        taskset.check_data()
        t0 = time.time()
        offload = _lmeval_offload(model_path, compute, batch_size, tasks, dtype)
        if offload:
            model = offloaded(LazyModel(model_path, dtype, attn), Path(tmp) / "offload", device)
        else:
            model = load_any(model_path, dtype, attn)
        records = evaluate_tasks(model, model_path, taskset, device, batch_size, bootstrap_iters)
    seconds = round(time.time() - t0, 2)
    for protocol, out_json in outputs.items():
        task = parse_lmeval_protocol(protocol)[0]
        write_json(out_json, {
            "name": name, "model": spec.model, "spec": spec.short_name(), "protocol": protocol, **records[task],
            "bits_per_weight": storage_bits(model_path),
            "compute": {"device": device, "dtype": str(dtype), "attn": attn, "batch_size": batch_size,
                        "threads": torch.get_num_threads(), "blocks_offloaded_to_disk": offload},
            "job_seconds": seconds, "versions": versions(),
        })
    return records
