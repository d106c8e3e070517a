"""What a cluster job asks for: `mem_mb` from the memory model's peak (`quantlib.jobs.memory`,
`quantlib.jobs.memory_backward`) with a margin, and wall time from the model's size. Read by `rules/common.smk`."""

from __future__ import annotations

from quantlib.jobs.memory import (
    DTYPE_BYTES,
    MB,
    eval_peak,
    plan_pack,
    plan_quantize,
    whole_model_peak,
)
from quantlib.jobs.memory_backward import plan_distill, plan_statistic

MARGIN = 1.5  # over the estimate: allocator slack and what the model leaves out (measured peaks 0.95-1.35x of the estimate on the offline model)
FLOOR_MB = 2000
UNCAPPED_EVAL_TOKENS = 600_000  # a protocol without max_windows: WikiText-2 or C4's 256 x 2048 windows, about
# The longest request of a batch of a zero-shot task (lm-eval pads a batch to its longest), about; each few-shot
# example adds as much. ARC, PIQA, HellaSwag, WinoGrande and LAMBADA requests are well under it.
LMEVAL_TOKENS = 256


def lmeval_tokens(tasks: dict) -> int:
    """The longest request lm-eval is expected to batch for these tasks ({task: {num_fewshot, ...}})."""
    return LMEVAL_TOKENS * (1 + max([(t or {}).get("num_fewshot", 0) or 0 for t in tasks.values()] or [0]))


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
