"""The memory model: a job's peak host memory from the model's shapes (config.json), the calibration tokens, the
dtype and the method, with the jobs reading the model block by block (`quantlib.access.lazy`). The figures size the
rules' `mem_mb` (what a cluster job asks for) and the `compute.max_memory` budget, which picks chunk sizes and
where activations are kept, and refuses up front a budget that cannot hold one block and its statistics.

Peak = runtime + the largest of three phases (b: bytes per element of the compute dtype; float32 for statistics):
  runtime   Python, torch and transformers themselves (RUNTIME_MB, measured: `python -c "import torch,
            transformers"` plus a model class)
  capture   the embeddings (vocab x hidden x b) while the calibration windows go through them, and the block-0
            inputs (N tokens x hidden x b)
  block     one block's weights (P x b); the activation streams: the block's inputs and outputs over all N tokens
            (2 x N x hidden x b; four streams in block-wise mode: two inputs, the targets, the new outputs); one
            chunk's forward working set (T tokens x (6 hidden + 3 intermediate) x b); the largest subgroup's solve
            (5 x d_in^2 x 4 + rows x d_in x the solver's bytes per weight: the Hessian's float64 sum, its damped,
            permuted and factored copies, the weights' working copies; measured for LDLQ on Llama-2-7B shapes,
            where down_proj's 11008^2 Hessian makes it the largest term, and per solver family on the offline
            model: `solve_bytes_per_weight`); the statistics read for the block (the FP Hessians of every
            subgroup; the Fisher, one float per weight); block-wise training: the weights' three more copies (the trainable quantizer, its gradient,
            Adam's two moments)
  finish    the tensors outside the blocks (embeddings, norms, an untied head) as the checkpoint's last shard,
            twice (safetensors serialises each tensor to bytes before writing)
With streams on disk, the activation term is one chunk instead of N tokens.

Jobs that back-propagate through the model block by block (`quantlib.stats.streamed`: a statistic whose catalog
entry is `backward`, and distillation) hold instead, besides the runtime (`backward_phases`): the inputs of every
block over every item (one item with streams on disk); one block's weights, their gradients (float32) and one
item's recomputed forward with its autograd graph; the loss on the final states (the gradients' logits over the
vocabulary; distillation's targets). Distillation also keeps its trainables with AdamW's state, the student's
embeddings and every block's integer codes (one byte per weight; on disk with streams on disk): `distill_phases`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from quantlib.access.adapters import get_adapter
from quantlib.catalog import registry
from quantlib.catalog.statistics import LOSS_LOGITS
from quantlib.errors import ConfigError

MB = 1 << 20
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# Measured on the dev machine (Linux x86-64, torch 2.13 CPU, transformers 4.5x): the resident set of a Python
# process that has imported torch, transformers and quantlib and built a model class, before any weight.
RUNTIME_MB = 460


def parse_memory(value) -> int | None:
    """A memory setting in bytes: an integer (MB) or a string such as '800MB', '1.5GB', '24GiB'; None = no budget."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        amount = int(value * MB)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(MB|MiB|GB|GiB|M|G)\s*", str(value), re.IGNORECASE)
        if not m:
            raise ConfigError(f"compute.max_memory '{value}' is no amount of memory; write e.g. 800MB or 24GB")
        amount = int(float(m.group(1)) * (MB if m.group(2).upper().startswith("M") else 1024 * MB))
    # A budget of nothing (or less) would refuse every job with figures that say nothing about the cause.
    if amount <= 0:
        raise ConfigError(f"compute.max_memory {value!r} is no memory budget: give a positive amount, e.g. 800MB or "
                          "24GB (an integer is MB), or leave it out for no budget")
    return amount


@dataclass
class Shapes:
    """What the memory model needs from a config.json."""
    hidden: int
    intermediate: int
    vocab: int
    blocks: int
    block_params: int
    tied: bool
    subgroups: list  # [(d_in, stacked output rows)] per subgroup of quantized layers
    max_layers_per_subgroup: int = 1

    @classmethod
    def of(cls, cfg: dict) -> "Shapes":
        adapter = get_adapter(cfg.get("model_type", "?"))
        d_in, d_out = adapter.input_dims(cfg), adapter.output_dims(cfg)
        hidden = cfg["hidden_size"]
        blocks = cfg.get("num_hidden_layers") or cfg.get("n_layer")
        linear = sum(d_in[n] * d_out[n] for n in d_in)
        return cls(hidden=hidden, intermediate=max(d_in.values()), vocab=cfg["vocab_size"], blocks=blocks,
                   block_params=linear + 4 * hidden,  # norms (and biases, small beside the linears)
                   tied=bool(cfg.get("tie_word_embeddings", False)),
                   subgroups=[(d_in[g[0]], sum(d_out[n] for n in g)) for g in adapter.subgroups],
                   max_layers_per_subgroup=max(len(g) for g in adapter.subgroups))


@dataclass
class Plan:
    """How a quantize job runs and what it should hold at its peak (bytes per phase)."""
    chunk_tokens: int
    streams: str
    phases: dict
    budget: int | None = None

    @property
    def peak(self) -> int:
        return RUNTIME_MB * MB + max(self.phases.values())

    def record(self) -> dict:
        return {"estimated_peak_mb": round(self.peak / MB), "runtime_mb": RUNTIME_MB,
                **{f"{k}_mb": round(v / MB) for k, v in self.phases.items()}, "chunk_tokens": self.chunk_tokens,
                "streams": self.streams, "budget_mb": None if self.budget is None else round(self.budget / MB)}


# Working memory of a solve per weight of the stacked subgroup, beyond the Hessian's copies (measured on the
# offline model, peak during the solve minus before it, divided by the subgroup's weights): error-feedback and
# coordinate-descent solvers keep ~5 float32 copies of the weights; the lookup-table fit (SqueezeLLM, LNQ) works in
# float64 with per-row design matrices; ALTERNATING's sign planes and least squares grow with the bits.
def solve_bytes_per_weight(spec) -> int:
    if spec.format == "lut":
        return 64
    if spec.format == "bcq":
        return 48 * spec.bits
    return 20


def calibration_pass(shapes: Shapes, n_tokens: int, seqlen: int, chunk_tokens: int, streams: str, n_streams: int,
                     b: int) -> tuple[int, int]:
    """Bytes of a walk of `n_tokens` calibration tokens (windows of `seqlen`) through the blocks, one block read at
    a time: (capture: the embeddings while the windows go through them and the block-0 inputs; block: one block's
    weights, `n_streams` activation streams over every token (one chunk with streams on disk) and one chunk's
    forward working set)."""
    h = shapes.hidden
    chunk = max(seqlen, min(n_tokens, chunk_tokens // seqlen * seqlen)) if n_tokens else 0
    held = chunk if streams == "disk" else n_tokens
    activations = n_streams * held * h * b + chunk * (6 * h + 3 * shapes.intermediate) * b
    capture = shapes.vocab * h * b + n_tokens * h * b if n_tokens else 0
    return capture, shapes.block_params * b + activations


def quantize_phases(shapes: Shapes, spec, chunk_tokens: int, streams: str, dtype_bytes: int = 4) -> dict:
    """Bytes of each phase of a quantize job (the module's docstring)."""
    b = dtype_bytes
    n_tokens = spec.calib.nsamples * spec.calib.seqlen if spec.calib is not None and spec.needs_tokens else 0
    seqlen = spec.calib.seqlen if spec.calib is not None else 1
    mode = spec.mode
    capture, block = calibration_pass(shapes, n_tokens, seqlen, chunk_tokens, streams, 4 if mode == "block" else 2,
                                      b)
    per_weight = solve_bytes_per_weight(spec)
    solve = max(5 * d * d * 4 + per_weight * rows * d for d, rows in shapes.subgroups)
    stats = sum(statistic_bytes(shapes, name, "read_bytes") for name in spec.statistics())
    training = 3 * shapes.block_params * 4 if mode == "block" else 0
    block += (0 if mode == "block" else solve) + stats + training
    embeddings = shapes.vocab * shapes.hidden * b
    phases = {"capture": capture, "block": block,
              "finish": 2 * embeddings * (1 if shapes.tied else 2)}  # save_file copies each tensor to bytes
    if any(registry.component("preprocess", p).scope == "model" for p in spec.preprocess):
        # a rotation holds the whole model (head untied) through every phase; rotating a matrix makes a float64 copy
        whole = shapes.blocks * shapes.block_params * b + 2 * embeddings
        phases = {k: v + whole for k, v in phases.items()}
        phases["rotate"] = whole + 2 * embeddings * 8 // b
        if "spinquant" in spec.preprocess:  # the rotated copy of every weight, its gradient, one window's activations
            phases["rotate"] += 2 * whole + 4 * spec.opt("spin_batch") * spec.calib.seqlen * (
                shapes.blocks * (8 * shapes.hidden + 3 * shapes.intermediate) + shapes.vocab)
    return phases


def plan_quantize(cfg: dict, spec, compute: dict, dtype_bytes: int = 4) -> Plan:
    """The chunk size and stream placement for a quantize job under `compute.max_memory` (none: the settings as
    given). Within a budget: smaller chunks first, then streams on disk; a budget that cannot hold one block, its
    statistics and one calibration window is refused before any work, with the figures."""
    shapes = Shapes.of(cfg)
    b = dtype_bytes
    chunk, streams = compute.get("calib_chunk_tokens", 65536), compute.get("block_streams", "memory")
    budget = parse_memory(compute.get("max_memory"))
    plan = Plan(chunk, streams, quantize_phases(shapes, spec, chunk, streams, b), budget)
    if budget is None or plan.peak <= budget:
        return plan
    seqlen = spec.calib.seqlen if spec.calib is not None else 1
    for where in ([streams, "disk"] if streams == "memory" else [streams]):
        c = chunk
        while True:
            plan = Plan(c, where, quantize_phases(shapes, spec, c, where, b), budget)
            if plan.peak <= budget or c <= seqlen:
                break
            c = max(seqlen, c // 2)
        if plan.peak <= budget:
            return plan
    parts = ", ".join(f"{k} {v / MB:,.0f} MB" for k, v in plan.phases.items())
    raise ConfigError(
        f"compute.max_memory is {budget / MB:,.0f} MB, but quantizing {spec.short_name()} needs at least "
        f"{plan.peak / MB:,.0f} MB even with one window per chunk and activations on disk: runtime "
        f"{RUNTIME_MB} MB + the largest phase of ({parts}). Raise compute.max_memory to at least "
        f"{plan.peak / MB:,.0f} MB (or quantize on a machine with more memory).")


def eval_phases(shapes: Shapes, windows: int, seqlen: int, batch: int, dtype_bytes: int = 4,
                streams: str = "memory") -> dict:
    """Bytes of each phase of a perplexity job run block by block: the hidden states of every window (one batch
    with streams on disk) twice (a block's inputs and outputs), a block and one batch's forward; then the head,
    whose logits (batch x seqlen x vocab, float32) and their loss dominate."""
    b, h = dtype_bytes, shapes.hidden
    held = batch * seqlen if streams == "disk" else windows * seqlen
    tokens = batch * seqlen
    embeddings = shapes.vocab * h * b
    return {"embed": embeddings + held * h * b,
            "block": 2 * held * h * b + shapes.block_params * b + tokens * (6 * h + 3 * shapes.intermediate) * b,
            "head": embeddings * (1 if shapes.tied else 2) + held * h * b + 2 * tokens * shapes.vocab * 4}


def eval_peak(cfg: dict, windows: int, seqlen: int, batch: int, dtype_bytes: int = 4) -> int:
    return RUNTIME_MB * MB + max(eval_phases(Shapes.of(cfg), windows, seqlen, batch, dtype_bytes).values())


def whole_model_bytes(s: Shapes, seqlen: int, batch: int, dtype_bytes: int = 4) -> int:
    """A job that holds the whole model (lm-eval, packing): the weights plus one batch's forward and its logits."""
    weights = s.blocks * s.block_params * dtype_bytes + s.vocab * s.hidden * dtype_bytes * (1 if s.tied else 2)
    tokens = batch * seqlen
    return weights + tokens * (6 * s.hidden + 3 * s.intermediate) * dtype_bytes + 2 * tokens * s.vocab * 4


def whole_model_peak(cfg: dict, seqlen: int, batch: int, dtype_bytes: int = 4) -> int:
    """`whole_model_bytes` of a config.json's model, with the runtime."""
    return RUNTIME_MB * MB + whole_model_bytes(Shapes.of(cfg), seqlen, batch, dtype_bytes)


# ------------------------------------------------------------------------------------------ streamed backward
# Autograd's working set of one block's forward recomputed with gradients and its backward, per token of the item, in
# units of the hidden and intermediate sizes (float32): the tensors a Llama block's graph saves (norm outputs, q, k,
# v, the attention output, the MLP's three intermediate products) and the gradients in flight, counted generously.
# On the offline model the measured peaks came 1.1x (distillation) and 1.2x (gradients, streams on disk) over the
# model's figures, about the allocator's slack seen for the other jobs (benchmarks/memory_bench.py).
BACKWARD_HIDDEN, BACKWARD_INTERMEDIATE = 16, 8
LOGITS_COPIES = 4  # a piece of the end loss: logits, their log-softmax and both gradients (float32)


def backward_phases(shapes: Shapes, items: int, item_tokens: int, streams: str, b: int, block_extra: int = 0,
                    head: int = 0, resident: int = 0) -> dict:
    """Bytes of the phases of a streamed backward over `items` items of `item_tokens` tokens (b: bytes per element
    of the activations): `forward` (the kept inputs of every block, a block's weights and one item's forward),
    `head` (the kept inputs, the final states and their gradients, and `head`: the loss on the final states) and
    `backward` (the kept inputs, two gradient streams, a block's weights and their float32 gradients, `block_extra`,
    one item's recomputed forward and backward); each plus `resident`, what the job holds throughout."""
    h, inter = shapes.hidden, shapes.intermediate
    one = item_tokens * h * b
    stream = items * one if streams == "memory" else one
    kept = shapes.blocks * stream
    weights = shapes.block_params * b
    forward = item_tokens * (6 * h + 3 * inter) * b
    recompute = item_tokens * (BACKWARD_HIDDEN * h + BACKWARD_INTERMEDIATE * inter) * 4
    return {"forward": resident + kept + stream + weights + forward,
            "head": resident + kept + 2 * stream + weights + head,
            "backward": resident + kept + 2 * stream + weights + shapes.block_params * 4 + block_extra + recompute}


def statistic_phases(shapes: Shapes, name: str, calib, compute: dict, streams: str, b: int) -> dict:
    """Bytes of each phase of a statistics job on the calibration `calib` (a CalibSpec). Read block by block, it is
    a calibration pass like a quantize job's (the embeddings while the windows go through them; one block, its inputs
    and outputs over every token and one chunk's forward) plus what its catalog entry computes per block; with a
    streamed backward, the backward's phases (`backward_phases`; the loss: the embeddings and head, the logits of
    one window); otherwise the whole model and one window's forward plus the entry's figure."""
    stat, _ = registry.parse_stat_name(name)
    entry = registry.STATISTICS[stat]
    extra = statistic_bytes(shapes, name, "compute_bytes")
    n, L = calib.nsamples, calib.seqlen
    embeddings = shapes.vocab * shapes.hidden * b
    if entry.backward:  # the end loss, pieces of LOSS_LOGITS logits at a time
        piece = max(1, min(L, LOSS_LOGITS // shapes.vocab)) * shapes.vocab
        head = embeddings * (1 if shapes.tied else 2) + LOGITS_COPIES * piece * 4
        return {"capture": embeddings + n * L * shapes.hidden * b,
                **backward_phases(shapes, n, L, streams, b, block_extra=extra, head=head)}
    if entry.block_by_block:
        capture, block = calibration_pass(shapes, n * L, L, compute.get("calib_chunk_tokens", 65536), "memory", 2, b)
        return {"capture": capture, "block": block + extra}
    return {"model": whole_model_bytes(shapes, L, 1, b) + extra}


def distill_phases(shapes: Shapes, spec, streams: str) -> dict:
    """Bytes of each phase of a distillation job (float32; `spec` a `.kd` name's): `targets` (the FP model's streamed
    forward: its embeddings and block-0 inputs, then two streams of every window's states and one block), `student`
    (reading the base's representations once) and the streamed backward of one batch (`backward_phases`), with the
    targets, the student's embeddings, the codes and the trainables with AdamW's state resident."""
    d = spec.distill
    n, L, h = d.calib.nsamples, d.calib.seqlen, shapes.hidden
    tokens = d.opt("batch") * L
    every = n * L * h * 4 if streams == "memory" else L * h * 4  # one state of every window
    embeddings = shapes.vocab * h * 4
    linear = sum(d_in * rows for d_in, rows in shapes.subgroups)  # a block's quantized weights
    g = spec.group_size
    groups = shapes.blocks * sum(rows * (d_in // g if g > 0 else 1) for d_in, rows in shapes.subgroups)
    codes = linear * (shapes.blocks if streams == "memory" else 1)  # uint8
    resident = embeddings + every + codes + groups * 2 * 4 * 4  # scales and zeros, their gradients, two moments
    weights = shapes.block_params * 4
    return {"targets": embeddings + n * L * h * 4 + 2 * every + weights + L * (6 * h + 3 * shapes.intermediate) * 4,
            "student": resident + weights + 5 * linear,
            # a block's trainable linears: the codes (uint8), the weights they make and those weights' gradients
            **backward_phases(shapes, 1, tokens, streams, 4, block_extra=9 * linear, head=2 * tokens * h * 4,
                              resident=resident)}


def _fit(what: str, phases, compute: dict) -> Plan:
    """The streams (compute.block_streams, else on disk when the budget asks) under `compute.max_memory` for a job
    whose phases are `phases(streams)`; a budget that cannot hold it even with every stream on disk is refused
    before any work, with the figures."""
    budget = parse_memory(compute.get("max_memory"))
    chunk, streams = compute.get("calib_chunk_tokens", 65536), compute.get("block_streams", "memory")
    for where in ([streams, "disk"] if streams == "memory" else [streams]):
        plan = Plan(chunk, where, phases(where), budget)
        if budget is None or plan.peak <= budget:
            return plan
    parts = ", ".join(f"{k} {v / MB:,.0f} MB" for k, v in plan.phases.items())
    raise ConfigError(
        f"compute.max_memory is {budget / MB:,.0f} MB, but {what} needs at least {plan.peak / MB:,.0f} MB even with "
        f"activations on disk: runtime {RUNTIME_MB} MB + the largest phase of ({parts}). Raise compute.max_memory to "
        f"at least {plan.peak / MB:,.0f} MB (or run the job on a machine with more memory).")


def plan_statistic(cfg: dict, name: str, calib, compute: dict, dtype_bytes: int = 4) -> Plan:
    """Where a statistics job keeps its activations under `compute.max_memory` (`_fit`), and its figures."""
    shapes = Shapes.of(cfg)
    return _fit(f"the statistic {name}", lambda where: statistic_phases(shapes, name, calib, compute, where,
                                                                          dtype_bytes), compute)


def plan_distill(cfg: dict, spec, compute: dict) -> Plan:
    """Where a distillation job keeps its activations, targets and codes under `compute.max_memory` (`_fit`)."""
    shapes = Shapes.of(cfg)
    return _fit(f"distilling {spec.short_name()}", lambda where: distill_phases(shapes, spec, where), compute)


# ------------------------------------------------------------------------------------------------ packing
# Working memory of converting a layer into a pack format, in bytes per weight of the largest layer (the code
# streams' int64 temporaries; Any-Precision's bit planes are built for the whole matrix). Measured on Llama-2-7B
# shapes (2 and 4 blocks, w4): peaks 0.8-1.0x the estimate, the same for 2 and 4 blocks.
PACK_WORK_BYTES = {"ct": 12, "gptq": 10, "anyprec": 20, "bcq": 12}


def pack_phases(cfg: dict, spec, fmt: str, dtype_bytes: int = 4, pack_bytes: int = 2, stat_bytes: int = 2) -> dict:
    """Bytes of a pack job's phases (`quantlib.checkpoint.pack.writer`, one decoder block at a time): `block`, one
    block's source tensors (packed codes, float32 statistics, the rest in `dtype_bytes`), its codes unpacked (a byte
    per weight), its packed tensors twice (safetensors serialises them to bytes before writing) and the working
    memory of its largest layer; `outer`, the embeddings and head as stored and in the pack's dtype (or twice in it,
    while safetensors serialises them)."""
    shapes, adapter = Shapes.of(cfg), get_adapter(cfg.get("model_type", "?"))
    d_in, d_out = adapter.input_dims(cfg), adapter.output_dims(cfg)
    bits, g = spec.bits or 16, spec.group_size
    weights = sum(d_in[n] * d_out[n] for n in d_in)
    # per (row, group) a scale and zero, or bcq's alphas and offset; per row a table (lookup tables, anyprec)
    per_group = bits + 1 if spec.format == "bcq" else 2
    per_row = 2 ** bits if spec.format == "lut" or fmt == "anyprec" else 0
    stats = sum(d_out[n] * ((d_in[n] // g if g > 0 else 1) * per_group + per_row) for n in d_in)
    other = max(0, shapes.block_params - weights)
    source = weights * bits // 8 + stats * 4 + other * dtype_bytes
    packed = weights * bits // 8 + stats * stat_bytes + other * pack_bytes
    work = PACK_WORK_BYTES.get(fmt, max(PACK_WORK_BYTES.values())) * max(d_in[n] * d_out[n] for n in d_in)
    embeddings = shapes.vocab * shapes.hidden * (1 if shapes.tied else 2)
    return {"block": source + weights + 2 * packed + work,
            "outer": embeddings * max(dtype_bytes + pack_bytes, 2 * pack_bytes)}


def plan_pack(cfg: dict, spec, pack_cfg: dict, compute: dict, dtype_bytes: int = 4) -> Plan:
    """A pack job's figures (`spec` a `.pack-{format}` name's); a `compute.max_memory` below its peak is refused
    before any weight is read."""
    b = {k: DTYPE_BYTES.get(pack_cfg.get(k, "float16"), 2) for k in ("dtype", "stat_dtype")}
    plan = Plan(0, "memory", pack_phases(cfg, spec, spec.pack, dtype_bytes, b["dtype"], b["stat_dtype"]),
                parse_memory(compute.get("max_memory")))
    if plan.budget is not None and plan.peak > plan.budget:
        parts = ", ".join(f"{k} {v / MB:,.0f} MB" for k, v in plan.phases.items())
        raise ConfigError(f"compute.max_memory is {plan.budget / MB:,.0f} MB, but packing {spec.short_name()} needs "
                          f"{plan.peak / MB:,.0f} MB: runtime {RUNTIME_MB} MB + the larger phase of ({parts}). "
                          f"Raise compute.max_memory to at least {plan.peak / MB:,.0f} MB.")
    return plan


# ------------------------------------------------------------------------------------------------ cluster requests

MARGIN = 1.5  # over the estimate: allocator slack and what the model leaves out (measured peaks 0.95-1.35x of the estimate on the offline model)
FLOOR_MB = 2000
UNCAPPED_EVAL_TOKENS = 600_000  # a protocol without max_windows: WikiText-2 or C4's 256 x 2048 windows, about
# The longest request of a batch of a zero-shot task (lm-eval pads a batch to its longest), about; each few-shot
# example adds as much. ARC, PIQA, HellaSwag, WinoGrande and LAMBADA requests are well under it.
LMEVAL_TOKENS = 256


def lmeval_tokens(tasks: dict) -> int:
    """The longest request lm-eval is expected to batch for these tasks ({task: {num_fewshot, ...}})."""
    return LMEVAL_TOKENS * (1 + max([(t or {}).get("num_fewshot", 0) or 0 for t in tasks.values()] or [0]))


def statistic_bytes(shapes: Shapes, name: str, which: str) -> int:
    """A statistics artifact's bytes per block from its catalog entry (`read_bytes`: what a quantize job holds of it;
    `compute_bytes`: what its own job holds beyond a calibration pass or the whole model)."""
    stat, params = registry.parse_stat_name(name)
    return getattr(registry.STATISTICS[stat], which)(shapes, params)


# Before the model is fetched there is no config.json: rules of thumb from its size in billions of parameters (the
# config's params_b), float32 weights at 4 bytes per parameter times the copies a job holds.
FALLBACK_COPIES = {"fetch": 2, "quantize": 3, "distill": 5, "stats": 3, "perplexity": 3, "lmeval": 3, "pack": 2}
FALLBACK_FLOOR_MB = 4000
# Wall time (minutes) a cluster job asks for: per billion parameters (the work grows about linearly with the
# parameter count), and a floor. lm-eval runs every task of the config in one job: on a 2-core CPU ~10 min for
# 6 tasks x 25 documents of a 135M model.
RUNTIME_MINUTES = {"quantize": (10, 60), "distill": (60, 60), "stats": (10, 60), "perplexity": (5, 30),
                   "lmeval": (20, 60)}


def _kind(job: str) -> str:
    return job.partition(":")[0]


def runtime_minutes(job: str, params_b: float) -> int:
    """The wall time (minutes) a cluster job of kind `job` asks for, from the model's size."""
    per_b, floor = RUNTIME_MINUTES[_kind(job)]
    return int(max(floor, per_b * params_b))


def request_mb(job: str, model_cfg: dict | None, spec, cfg: dict, params_b: float = 1.0) -> int:
    """The `mem_mb` a rule asks a cluster for: the memory model's peak for `job` (quantize, perplexity, lmeval,
    stats:{statistic}, distill, pack) with a margin, from the model's config.json (`model_cfg`) and the workflow's
    config `cfg`; `spec` is the job's spec (for a statistic, its calibration, a CalibSpec). Before the model is
    fetched there is no config.json: a rule of thumb from `params_b`."""
    if model_cfg is None:
        return int(max(FALLBACK_FLOOR_MB, FALLBACK_COPIES[_kind(job)] * 4 * 1024 * params_b))
    compute = cfg.get("compute", {})
    b = DTYPE_BYTES.get(compute.get("dtype", "auto"), 4)  # auto: float32, what a CPU job computes in
    if job == "quantize":
        plan = plan_quantize(model_cfg, spec, compute, b)
        if plan.budget is not None:
            return int(plan.budget / MB)
        peak = plan.peak
    elif job == "perplexity" and spec.pack is None:
        ppl = cfg["perplexity"]
        peak = 0
        for dataset, opts in ppl["datasets"].items():
            seqlen = ppl["seqlen"]
            windows = (opts or {}).get("max_windows") or UNCAPPED_EVAL_TOKENS // seqlen
            peak = max(peak, eval_peak(model_cfg, windows, seqlen, ppl["batch_size"], b))
    elif job == "lmeval":
        peak = whole_model_peak(model_cfg, lmeval_tokens(cfg["lm_eval"]["tasks"]), cfg["lm_eval"]["batch_size"], b)
    elif job.startswith("stats:") or job == "distill":  # stats:{statistic}: `spec` is the calibration (a CalibSpec)
        plan = plan_distill(model_cfg, spec, compute) if job == "distill" else \
            plan_statistic(model_cfg, job.partition(":")[2], spec, compute, b)
        if plan.budget is not None:
            return int(plan.budget / MB)
        peak = plan.peak
    elif job == "pack":  # `spec` is the packed one's ({name}.pack-{format})
        peak = plan_pack(model_cfg, spec, cfg.get("pack", {}), {}, b).peak
    else:  # a job that holds the whole model: a packed model's perplexity
        peak = whole_model_peak(model_cfg, 2048, 1, b)
    return max(FLOOR_MB, int(MARGIN * peak / MB))
