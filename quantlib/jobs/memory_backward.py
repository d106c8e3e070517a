"""The memory model of the jobs that back-propagate through the model block by block (`quantlib.stats.streamed`):
a statistic whose catalog entry is `backward` (the end-loss gradients) and distillation. The terms are described in
`quantlib.jobs.memory`'s docstring; the figures size these jobs' streams under `compute.max_memory` and their
`mem_mb`."""

from __future__ import annotations

from quantlib.catalog import registry
from quantlib.catalog.statistics import LOSS_LOGITS
from quantlib.jobs.memory import (
    BACKWARD_HIDDEN,
    BACKWARD_INTERMEDIATE,
    Plan,
    Shapes,
    calibration_pass,
    fit_streams,
    statistic_bytes,
    whole_model_bytes,
)

LOGITS_COPIES = 4  # a piece of the end loss: logits, their log-softmax and both gradients (float32)


def backward_phases(shapes: Shapes, items: int, item_tokens: int, streams: str, b: int, block_extra: int = 0,
                    head: int = 0, resident: int = 0, dense: int | None = None) -> dict:
    """Bytes of the phases of a streamed backward over `items` items of `item_tokens` tokens (b: bytes per element
    of the activations): `forward` (the kept inputs of every block, a block's weights and one item's forward),
    `head` (the kept inputs, the final states and their gradients, and `head`: the loss on the final states) and
    `backward` (the kept inputs, two gradient streams, a block's weights and their float32 gradients, `block_extra`,
    one item's recomputed forward and backward); each plus `resident`, what the job holds throughout. `dense`: the
    block's parameters held as weights with gradients (default all; distillation's quantized linears are made from
    codes instead, counted in its `block_extra`)."""
    h, inter = shapes.hidden, shapes.intermediate
    one = item_tokens * h * b
    stream = items * one if streams == "memory" else one
    kept = shapes.blocks * stream
    dense = shapes.block_params if dense is None else dense
    weights = dense * b
    forward = item_tokens * (6 * h + 3 * inter) * b
    recompute = item_tokens * (BACKWARD_HIDDEN * h + BACKWARD_INTERMEDIATE * inter) * 4
    return {"forward": resident + kept + stream + weights + forward,
            "head": resident + kept + 2 * stream + weights + head,
            "backward": resident + kept + 2 * stream + weights + dense * 4 + block_extra + recompute}


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
                              resident=resident, dense=shapes.block_params - linear)}


def plan_statistic(cfg: dict, name: str, calib, compute: dict, dtype_bytes: int = 4) -> Plan:
    """Where a statistics job keeps its activations under `compute.max_memory` (`quantlib.jobs.memory.fit_streams`), and its figures."""
    shapes = Shapes.of(cfg)
    return fit_streams(f"the statistic {name}", lambda where: statistic_phases(shapes, name, calib, compute, where,
                                                                          dtype_bytes), compute)


def plan_distill(cfg: dict, spec, compute: dict) -> Plan:
    """Where a distillation job keeps its activations, targets and codes under `compute.max_memory` (`quantlib.jobs.memory.fit_streams`)."""
    shapes = Shapes.of(cfg)
    return fit_streams(f"distilling {spec.short_name()}", lambda where: distill_phases(shapes, spec, where), compute)
