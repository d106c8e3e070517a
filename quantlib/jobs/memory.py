"""The memory model: a job's peak host memory from the model's shapes (config.json), the calibration tokens, the
dtype and the method, with the jobs reading the model block by block (`quantlib.access.lazy`). The figures size the
rules' `mem_mb` (what a cluster job asks for) and the `compute.max_memory` budget, which picks chunk sizes and
where activations are kept, and refuses up front a budget that cannot hold one block and its statistics.

Peak = runtime + the largest of its phases (b: bytes per element of the compute dtype; float32 for statistics):
  runtime   Python, torch and transformers themselves (RUNTIME_MB, measured: `python -c "import torch,
            transformers"` plus a model class)
  capture   the embeddings (vocab x hidden x b) while the calibration windows go through them, and the block-0
            inputs (N tokens x hidden x b)
  block     one block's weights (P x b); the activation streams: the block's inputs and outputs over all N tokens
            (2 x N x hidden x b; four streams in block-wise mode: two inputs, the targets, the new outputs); one
            chunk's forward working set (T tokens x (6 hidden + 3 intermediate) x b); the largest subgroup's solve
            (the larger of the capture's and the solve's k x d_in^2 x 4, `solve_square_floats`: the Hessian's
            float64 sum and mean, its factored copies; the solve's also rows x d_in x the solver's bytes per
            weight, the weights' working copies; measured for LDLQ on Llama-2-7B shapes, where down_proj's 11008^2
            Hessian makes it the largest term, and per solver family on the offline model:
            `solve_bytes_per_weight`; a trellis solver's Viterbi search too, `viterbi_bytes`); the statistics
            read for the block (the FP Hessians of every subgroup; the Fisher, one float per weight); block-wise
            training (a window per forward): the trainable quantizer's state per weight
            (TRAINING_FLOATS_PER_WEIGHT) and one step's graph
  finish    the tensors outside the blocks (embeddings, norms, an untied head) as the checkpoint's last shard,
            twice (safetensors serialises each tensor to bytes before writing)
With streams on disk, the activation term is one chunk instead of N tokens. A quantized forward (activations, KV
cache, online Hadamards: `quantlib.transforms.activations`) adds to the block phase one chunk's quantized copies
(T x (I + 2 kv width) x b). A rotation (QuaRot, SpinQuant; `rotation_phases`) holds the whole model, its head untied,
through every phase, and adds
  rotate    the model, what the allocator keeps of its freed copies, and the largest rotated tensor's float64
            copy and product (each rotated weight is written back before the next is made)
  spin      SpinQuant's training: the whole model, the rotated weights in float32 (its graph's) and twice the
            autograd graph of spin_batch windows of L tokens (blocks x (18 h + 7 I) + 4 V floats per token: what
            every block saves with its quantizers, the logits; twice: what the allocator keeps of earlier steps')

Jobs that back-propagate through the model block by block (`quantlib.stats.streamed`: a statistic whose catalog
entry is `backward`, and distillation) hold instead, besides the runtime (`quantlib.jobs.memory_backward`): the inputs of every
block over every item (one item with streams on disk); one block's weights, their gradients (float32) and one
item's recomputed forward with its autograd graph; the loss on the final states (the gradients' logits over the
vocabulary; distillation's targets). Distillation also keeps its trainables with AdamW's state, the student's
embeddings and every block's integer codes (one byte per weight; on disk with streams on disk).
What a cluster job asks for (`mem_mb`, wall time) from these figures: `quantlib.jobs.requests`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from quantlib.access.adapters import get_adapter
from quantlib.catalog import registry
from quantlib.catalog.contract import forward_settings
from quantlib.catalog.vector import viterbi_bytes
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
    heads: int = 0  # attention heads, and the key/value heads' width (kv heads x head_dim; 0: as wide as hidden)
    kv_width: int = 0

    @classmethod
    def of(cls, cfg: dict) -> "Shapes":
        adapter = get_adapter(cfg.get("model_type", "?"))
        d_in, d_out = adapter.input_dims(cfg), adapter.output_dims(cfg)
        hidden = cfg["hidden_size"]
        blocks = cfg.get("num_hidden_layers") or cfg.get("n_layer")
        linear = sum(d_in[n] * d_out[n] for n in d_in)
        heads = cfg.get("num_attention_heads") or cfg.get("n_head") or 0
        head_dim = cfg.get("head_dim") or (hidden // heads if heads else 0)
        return cls(hidden=hidden, intermediate=max(d_in.values()), vocab=cfg["vocab_size"], blocks=blocks,
                   block_params=linear + 4 * hidden,  # norms (and biases, small beside the linears)
                   tied=bool(cfg.get("tie_word_embeddings", False)),
                   subgroups=[(d_in[g[0]], sum(d_out[n] for n in g)) for g in adapter.subgroups],
                   max_layers_per_subgroup=max(len(g) for g in adapter.subgroups),
                   heads=heads, kv_width=(cfg.get("num_key_value_heads") or heads) * head_dim)

    @property
    def linear_params(self) -> int:
        """The weights of one block's linears."""
        return self.block_params - 4 * self.hidden

    @property
    def kv(self) -> int:
        return self.kv_width or self.hidden


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


# Autograd's working set of one block's forward recomputed with gradients and its backward, per token of the item, in
# units of the hidden and intermediate sizes (float32): the tensors a Llama block's graph saves (norm outputs, q, k,
# v, the attention output, the MLP's three intermediate products) and the gradients in flight, counted generously.
# On the offline model the measured peaks came 1.1x (distillation) and 1.12x (gradients, streams on disk: its end
# loss) over the model's figures, about the allocator's slack seen for the other jobs (benchmarks/memory_bench.py).
BACKWARD_HIDDEN, BACKWARD_INTERMEDIATE = 16, 8
# Block-wise training (mode block) per weight of the block's linears, float32: the trainable quantizer's state
# beside the FP weight it keeps (FlexRound: the per-weight log-scale, its gradient, Adam's two moments; UniQuanF:
# its binary-coding init's planes too), the quantized weight its forward makes and what the step's graph saves of it,
# and the backward's temporaries. Fitted on the offline model, 32 x 512 windows, 2026-12-07: FlexRound ep1 peaks
# 869 MB (the whole job), UniQuanF 967 MB (its first 3 blocks); 15 floats matched FlexRound, 17 sits between.
TRAINING_FLOATS_PER_WEIGHT = 17


# Working memory of a solve per weight of the stacked subgroup, beyond the Hessian's copies (measured on the
# offline model, peak during the solve minus before it, divided by the subgroup's weights): error-feedback and
# coordinate-descent solvers keep ~5 float32 copies of the weights; the lookup-table fit (SqueezeLLM, LNQ) works in
# float64 with per-row design matrices; ALTERNATING's sign planes and least squares grow with the bits.
def solve_square_floats(spec) -> tuple[int, int]:
    """The largest subgroup's d_in x d_in working set in float32 units: (while its Hessian is captured, while it
    is solved beside the weights' working copies). LDLQ, with or without a rotation of the whole model (which
    leaves the Hessians alone): (3, 2), the Hessian's float64 sum and the float32 mean made from it, then the mean
    with one factor buffer (`PreparedHessian.ldl`); measured on Llama-2-7B shapes (benchmarks/memory_bench.py).
    The other solvers and preprocessors keep more copies (the damped matrix, GPTQ's inverse, a symmetric
    eigen-solve in float64): 5 throughout, as measured before LDLQ's was made lean."""
    layer_scope = [p for p in spec.preprocess if registry.component("preprocess", p).scope != "model"]
    return (3, 2) if spec.solver == "ldlq" and not layer_scope else (5, 5)


def solve_bytes_per_weight(spec) -> int:
    if spec.format == "lut":  # refitted 2026-12-07 on LNQ w2, one layer of 3072 x 576: 380 MiB above the solve's
        # start (flash1dkmeans's first compile, table_update's 2^22-entry float64 chunks, the k-means' float64 copies);
        # whole jobs on the offline model measured 834-908 MB against 676 with the 64 it had
        return 225
    if spec.format == "bcq":  # refitted 2026-12-07 on ALTERNATING w2 / w3 / w4: 856 / 896 / 1090 MB measured
        return 70 + 66 * spec.bits
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


def quantize_phases(shapes: Shapes, spec, chunk_tokens: int, streams: str, dtype_bytes: int = 4,
                    attn: str = "sdpa") -> dict:
    """Bytes of each phase of a quantize job (the module's docstring); `attn` the attention implementation
    (compute.attn_implementation): the eager one makes every head's scores."""
    b = dtype_bytes
    n_tokens = spec.calib.nsamples * spec.calib.seqlen if spec.calib is not None and spec.needs_tokens else 0
    seqlen = spec.calib.seqlen if spec.calib is not None else 1
    mode = spec.mode
    # Block-wise training keeps its streams a window per entry and runs its forwards a window at a time.
    capture, block = calibration_pass(shapes, n_tokens, seqlen, seqlen if mode == "block" else chunk_tokens, streams,
                                      4 if mode == "block" else 2, b)
    per_weight = solve_bytes_per_weight(spec)
    captured, solving = solve_square_floats(spec)
    solve = max(max(captured * d * d * 4, solving * d * d * 4 + per_weight * rows * d
                    + (viterbi_bytes(spec, rows) if spec.format == "trellis" else 0))
                for d, rows in shapes.subgroups)
    stats = sum(statistic_bytes(shapes, name, "read_bytes") for name in spec.statistics())
    training = 0
    if mode == "block":  # the trainables and their state, and one step's graph over `batch` windows
        step_tokens = spec.opt("batch") * seqlen
        training = TRAINING_FLOATS_PER_WEIGHT * shapes.linear_params * 4 + \
            step_tokens * (BACKWARD_HIDDEN * shapes.hidden + BACKWARD_INTERMEDIATE * shapes.intermediate) * 4
    block += (0 if mode == "block" else solve) + stats + training
    forward = forward_settings(spec)
    if forward is not None and n_tokens:
        # The quantized forward's temporaries in one chunk's pass (`quantlib.transforms.activations`), beyond the
        # plain forward's working set: a linear's input is quantized into a copy while the plain one is still held
        # (the widest, down_proj's I; with a rotation, R4's online Hadamard makes it), and the keys and values are
        # quantized into copies. The attention stays sdpa's fused causal kernel (the windows pass no mask), so no
        # heads x L x L scores are made (measured on the offline model: the installed forward +0.02-0.11 GB).
        chunk = max(seqlen, min(n_tokens, chunk_tokens // seqlen * seqlen))
        block += chunk * (shapes.intermediate + 2 * shapes.kv) * b
    if attn == "eager" and n_tokens:
        # eager attention materialises the heads x L x L scores of every window of the chunk (the masked and
        # softmaxed ones replace them in turn); sdpa's kernels and flash attention make none. Measured on the offline
        # model, 32 windows of 512 tokens: +0.35-0.42 GB over sdpa, this term's 0.30 GB (the plain forward's
        # working set, T (6h + 3I) b, is that much above the measured sdpa forward).
        chunk = max(seqlen, min(n_tokens, chunk_tokens // seqlen * seqlen))
        block += (chunk // seqlen) * (shapes.heads or 1) * seqlen * seqlen * b
    embeddings = shapes.vocab * shapes.hidden * b
    phases = {"capture": capture, "block": block,
              "finish": 2 * embeddings * (1 if shapes.tied else 2)}  # save_file copies each tensor to bytes
    if any(registry.component("preprocess", p).scope == "model" for p in spec.preprocess):
        # the whole rotated model (head untied) is held through every phase; the last shard saves its embeddings
        # and head, each also as bytes
        whole, own = rotation_phases(shapes, spec, b)
        phases = {k: v + whole for k, v in phases.items()}
        phases["finish"] = whole + 2 * embeddings
        phases.update(own)
    return phases


# SpinQuant's autograd graph per token of a training window, in floats (float32): what each block saves for the
# backward with the quantized forward in the loop, in units of the hidden and intermediate sizes: the two norms'
# inputs and outputs, the straight-through quantized input every linear saves (q, k and v each quantize their own
# copy), the queries and keys after RoPE and after R3, the keys and values quantized, the attention's output and
# log-sum-exp, the MLP's gate, up, SiLU and product and down_proj's rotated and quantized input; then the loss: the
# logits, their log-softmax and both gradients (4 V). Counted from the graph and checked on the offline model
# (SmolLM2-135M, one step with one and two 512-token windows: 1603 MB a window, these constants' 1621 MB).
SPIN_HIDDEN, SPIN_INTERMEDIATE, SPIN_LOGITS = 18, 7, 4


def rotation_phases(shapes: Shapes, spec, b: int) -> tuple[int, dict]:
    """What a model-scope preprocessor (QuaRot, SpinQuant: `quantlib.transforms.rotation`, `.spinquant`) holds: the
    whole model (the head untied, bytes) with what the allocator keeps of the rotation's freed copies, held through
    every phase, and the phases of the rotation itself."""
    h = shapes.hidden
    # what R1/R2 rotate: every block's linears, the embeddings and the (untied) head
    rotated = shapes.blocks * shapes.linear_params + 2 * shapes.vocab * h
    whole = shapes.blocks * shapes.block_params * b + 2 * shapes.vocab * h * b
    # The allocator keeps what the loading, the norm folding and the rotation freed (float64 copies among the new
    # weights, fragmented) and later phases get only part of it back: on the offline model the resident set after
    # `rotate_model` holds 1.1-1.35 times the model beyond it, and the LDLQ job then peaks in its block phase (2273 and
    # 2517 MB in two runs; this model's 2319 MB with the runtime, three quarters of the model held beside it).
    held = whole + 3 * whole // 4
    # `rotate_model` (and SpinQuant's `apply_learned`): each weight is rotated in float64, written back in the
    # model's dtype and freed before the next is made (`apply_rotations`), so beside what is held the largest tensor
    # (the embeddings or the head) is there as its float64 copy, its product and its new weight, 20 bytes a weight
    # (measured on the offline model, float32: QuaRot + RTN peaks 1993 and 2023 MB, this phase's 2087 MB with the
    # runtime; 3117 MB when every product was held until all were done).
    out = {"rotate": held + 20 * max(shapes.vocab, shapes.intermediate) * h}
    if "spinquant" in spec.preprocess:
        # `learn_rotations`: the rotated weights as functions of R1/R2 (float32, held by the graph; v_proj's and
        # o_proj's R1 products kept for R2), then the autograd graph of spin_batch windows of L tokens, twice: a
        # step's graph (measured alone, the first step: 1603 MB a window on the offline model, SPIN_* 1621 MB), and
        # as much again that the allocator keeps of the steps' freed graphs, fragmented, when the gradients, later
        # steps and the learned rotations' float64 products are allocated. Fitted on the whole job (SmolLM2-135M,
        # 5 steps, float32): peaks 5229 and 8504 MB for 1 and 2 windows a step, this phase's 4996 and 8239 MB with
        # the runtime.
        graph = 4 * (rotated + shapes.blocks * (shapes.kv + h) * h)
        tokens = spec.opt("spin_batch") * spec.calib.seqlen
        per_token = shapes.blocks * (SPIN_HIDDEN * h + SPIN_INTERMEDIATE * shapes.intermediate) + \
            SPIN_LOGITS * shapes.vocab
        out["spin"] = whole + graph + 2 * tokens * per_token * 4
    return held, out


# `compute.block_streams: auto` keeps a job's activation streams in memory unless that makes its estimated peak more
# than this many times the peak with them on disk. Streams that grow with the blocks (the streamed backward keeps
# every block's inputs over every window) go to disk: the offline model's gradients statistic peaks 1.89 GB with them
# in memory and 0.77 GB on disk, not slower (616 and 503 s on a busy machine, benchmarks/memory_bench.py); a quantize
# job's two streams of one block stay in memory until the calibration tokens outgrow its solve.
AUTO_STREAMS_GROWTH = 1.5


def resolve_streams(compute: dict, phases) -> str:
    """Where a job keeps its activation streams: `compute.block_streams` as given, or for `auto` (the default)
    `memory` unless its peak (`phases(streams)`, bytes per phase) with them in memory is over AUTO_STREAMS_GROWTH
    times its peak with them on disk."""
    streams = compute.get("block_streams", "auto")
    if streams != "auto":
        return streams
    in_memory, on_disk = (RUNTIME_MB * MB + max(phases(where).values()) for where in ("memory", "disk"))
    return "memory" if in_memory <= AUTO_STREAMS_GROWTH * on_disk else "disk"


def plan_quantize(cfg: dict, spec, compute: dict, dtype_bytes: int = 4) -> Plan:
    """The chunk size and stream placement for a quantize job under `compute.max_memory` (none: the settings as
    given, `auto` streams resolved by `resolve_streams`). Within a budget: smaller chunks first, then streams on
    disk; a budget that cannot hold one block, its statistics and one calibration window is refused before any work,
    with the figures."""
    shapes = Shapes.of(cfg)
    b = dtype_bytes
    chunk = compute.get("calib_chunk_tokens", 65536)
    budget = parse_memory(compute.get("max_memory"))
    attn = compute.get("attn_implementation", "auto")
    streams = resolve_streams(compute, lambda where: quantize_phases(shapes, spec, chunk, where, b, attn))
    plan = Plan(chunk, streams, quantize_phases(shapes, spec, chunk, streams, b, attn), budget)
    if budget is None or plan.peak <= budget:
        return plan
    seqlen = spec.calib.seqlen if spec.calib is not None else 1
    for where in ([streams, "disk"] if streams == "memory" else [streams]):
        c = chunk
        while True:
            plan = Plan(c, where, quantize_phases(shapes, spec, c, where, b, attn), budget)
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


def eval_streams(cfg: dict, windows: int, seqlen: int, batch: int, compute: dict, dtype_bytes: int = 4) -> str:
    """Where a perplexity job keeps its windows' hidden states between blocks (`resolve_streams`)."""
    return resolve_streams(compute, lambda where: eval_phases(Shapes.of(cfg), windows, seqlen, batch, dtype_bytes,
                                                              where))


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


def fit_streams(what: str, phases, compute: dict) -> Plan:
    """The streams (compute.block_streams, `auto` resolved by `resolve_streams`; else on disk when the budget asks)
    under `compute.max_memory` for a job whose phases are `phases(streams)`; a budget that cannot hold it even with
    every stream on disk is refused before any work, with the figures."""
    budget = parse_memory(compute.get("max_memory"))
    chunk, streams = compute.get("calib_chunk_tokens", 65536), resolve_streams(compute, phases)
    for where in ([streams, "disk"] if streams == "memory" else [streams]):
        plan = Plan(chunk, where, phases(where), budget)
        if budget is None or plan.peak <= budget:
            return plan
    parts = ", ".join(f"{k} {v / MB:,.0f} MB" for k, v in plan.phases.items())
    raise ConfigError(
        f"compute.max_memory is {budget / MB:,.0f} MB, but {what} needs at least {plan.peak / MB:,.0f} MB even with "
        f"activations on disk: runtime {RUNTIME_MB} MB + the largest phase of ({parts}). Raise compute.max_memory to "
        f"at least {plan.peak / MB:,.0f} MB (or run the job on a machine with more memory).")


def statistic_bytes(shapes: Shapes, name: str, which: str) -> int:
    """A statistics artifact's bytes per block from its catalog entry (`read_bytes`: what a quantize job holds of it;
    `compute_bytes`: what its own job holds beyond a calibration pass or the whole model)."""
    stat, params = registry.parse_stat_name(name)
    return getattr(registry.STATISTICS[stat], which)(shapes, params)


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
