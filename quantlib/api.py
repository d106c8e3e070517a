"""The library from Python, without Snakemake: load a model, draw calibration windows, quantize by short name,
save, reload, measure perplexity and generate text. Each function is the one the workflow's jobs call.

    import quantlib

    model_dir = "resources/models/smollm2-135m-instruct-q4_1"     # any Hugging Face checkpoint directory
    texts = quantlib.read_texts("resources/datasets/c4.parquet")  # or a list of strings
    tokenizer = quantlib.load_tokenizer(model_dir)
    tokens = quantlib.calibration_windows(texts, tokenizer, nsamples=32, seqlen=512)
    model = quantlib.load_model(model_dir)
    report = quantlib.quantize(model, "smollm2.c4.n32.L512.ldlq.w4g64", tokens)
    quantlib.save(model, "smollm2.c4.n32.L512.ldlq.w4g64", report, "out/ldlq.w4g64", tokenizer_dir=model_dir)
    windows = quantlib.eval_windows(quantlib.read_texts("wiki.jsonl"), tokenizer, seqlen=512)
    print(quantlib.perplexity(quantlib.load("out/ldlq.w4g64"), windows, max_windows=40)["ppl"])
    quantlib.generate("out/ldlq.w4g64", "The capital of France is", on_text=print)
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from quantlib.access.datasets import calibration_windows as _calibration_windows
from quantlib.access.datasets import eval_windows as _eval_windows
from quantlib.access.datasets import mixture_windows as _mixture_windows
from quantlib.access.datasets import read_texts  # noqa: F401  (part of the API)
from quantlib.access.models import load_model as _load_model
from quantlib.access.models import load_tokenizer  # noqa: F401  (part of the API)
from quantlib.catalog.registry import stat_dependencies
from quantlib.catalog.spec import QuantSpec
from quantlib.checkpoint.pack.writer import pack_checkpoint as _pack
from quantlib.checkpoint.reader import load_any
from quantlib.checkpoint.writer import save_quantized
from quantlib.errors import ConfigError
from quantlib.evaluation.generate import Sampling
from quantlib.evaluation.generate import generate as _generate
from quantlib.evaluation.perplexity import perplexity as _perplexity
from quantlib.runner.group import QuantizedModelReport
from quantlib.runner.walk import quantize_model
from quantlib.stats.artifacts import compute_statistic, open_statistic


def _spec(spec) -> QuantSpec:
    return spec if isinstance(spec, QuantSpec) else QuantSpec.parse(spec)


def load_model(model_dir, dtype: torch.dtype = torch.float32, attn: str = "sdpa"):
    """A full-precision Hugging Face checkpoint (a supported architecture), in evaluation mode."""
    return _load_model(model_dir, dtype, attn)


def load(path, dtype: torch.dtype = torch.float32, attn: str = "sdpa"):
    """A quantized checkpoint written by `save` (or the workflow), a packed one (`pack_checkpoint`), or a plain
    full-precision one."""
    return load_any(path, dtype, attn)


def pack_checkpoint(src, out_dir, fmt: str = "ct", dtype: str = "float16", stat_dtype: str = "float16") -> dict:
    """Write the quantized checkpoint `src` in an external layout (ct: compressed-tensors, which transformers loads;
    gptq; anyprec; bcq: docs/packing.md) into `out_dir`; returns the pack report."""
    return _pack(src, out_dir, fmt, dtype, stat_dtype)


def calibration_windows(texts: list[str] | dict[str, list[str]], tokenizer, nsamples: int, seqlen: int,
                        seed: int = 0, sampler: str = "documents", weights: dict[str, float] | None = None,
                        chat_template: bool = False) -> torch.Tensor:
    """(nsamples, seqlen) token windows: GPTQ's sampler (a random window of a random long-enough document,
    `documents`) or random windows of the texts joined (`concat`), seeded. A dict {part: texts} draws a mixture, each
    part's share of the windows its share of `weights` (default equal); `chat_template` formats every document as a
    user turn of the tokenizer's chat template (as a config's `mixtures:` entry does)."""
    if not isinstance(texts, dict) and not chat_template:
        windows, _ = _calibration_windows(texts, tokenizer, {"calibration_sampler": sampler}, nsamples, seqlen, seed)
        return windows
    parts = texts if isinstance(texts, dict) else {"text": texts}
    mixture = {"parts": weights or dict.fromkeys(parts, 1.0), "chat_template": chat_template,
               "datasets": dict.fromkeys(parts, {"calibration_sampler": sampler})}
    return _mixture_windows(parts, tokenizer, mixture, nsamples, seqlen, seed)[0]


def eval_windows(texts: list[str], tokenizer, seqlen: int, join: str = "\n\n") -> torch.Tensor:
    """The perplexity protocol's windows: the texts joined, tokenized once, cut into non-overlapping windows."""
    windows, _ = _eval_windows(texts, tokenizer, {"join": join}, seqlen)
    return windows


def quantize(model, spec, tokens: torch.Tensor | None = None, *, statistics: dict | None = None,
             device: str = "cpu", seed: int = 0, progress: bool = True) -> QuantizedModelReport:
    """Quantize `model` in place as the short name (or QuantSpec) `spec` says. `tokens` are the calibration windows
    its calibration part names (n windows of L tokens). Statistics of the FP model that the spec reads (`fpin`,
    SqueezeLLM's Fisher, GuidedQuant's saliency) are computed from `model` and `tokens` first unless given as
    {statistic: opened artifact}."""
    spec = _spec(spec)
    if spec.calib is not None:
        if tokens is None:
            raise ConfigError(f"{spec.short_name()} reads calibration windows: pass tokens of shape "
                              f"({spec.calib.nsamples}, {spec.calib.seqlen})")
        if tuple(tokens.shape) != (spec.calib.nsamples, spec.calib.seqlen):
            raise ConfigError(f"{spec.short_name()} names {spec.calib.nsamples} windows of {spec.calib.seqlen} tokens; "
                              f"the tokens given are {tuple(tokens.shape)}")
    statistics = dict(statistics or {})
    missing = [s for s in spec.statistic_kinds() if s not in statistics]
    with tempfile.TemporaryDirectory(prefix="quantlib-stats-") as tmp:
        folder = Path(tmp)

        def compute(name: str) -> None:  # a statistic after the ones it is computed from
            needs = {k: folder / Path(p).parent.name for k, p in stat_dependencies(name, spec.calib_name(), {}).items()}
            for path in needs.values():
                if not path.exists():
                    compute(path.name)
            compute_statistic(name, model, tokens, folder / name, spec.calib_name(), spec.model, inputs=needs,
                              device=device, progress=progress)

        for name in spec.statistics():
            kind = name.split(".")[0]
            if kind in missing:
                if not (folder / name).exists():
                    compute(name)
                statistics[kind] = open_statistic(kind, folder / name, spec)
        return quantize_model(model, spec, tokens if spec.needs_tokens else None, device=device, progress=progress,
                              statistics=statistics, seed=seed)


def save(model, spec, report: QuantizedModelReport, out_dir, tokenizer_dir) -> None:
    """Write the quantized model (Hugging Face layout with each layer in its format) to `out_dir`, atomically."""
    save_quantized(model, _spec(spec), report, out_dir, tokenizer_dir)


def perplexity(model, windows: torch.Tensor, max_windows: int | None = None, batch_size: int = 4,
               device: str = "cpu") -> dict:
    """GPTQ's perplexity protocol on the windows: {"ppl", "mean_nll", "windows", "seqlen", "tokens_scored"}."""
    return _perplexity(model, windows, max_windows, batch_size, device)


def generate(model, prompt: str, tokenizer=None, max_new_tokens: int = 64, sampler: str = "greedy",
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0, chat: bool = False,
             on_text=None, device: str = "cpu") -> str:
    """Continue `prompt` with a model: a loaded one (then give its `tokenizer`) or the path of any checkpoint `load`
    reads (its own tokenizer files are used). `sampler` is `greedy` or `sample` (temperature, top_k, top_p), seeded;
    `chat` wraps the prompt in the tokenizer's chat template; `on_text(piece)` streams the text as it comes.
    Returns the new text."""
    if isinstance(model, (str, Path)):
        tokenizer = tokenizer or load_tokenizer(model)
        model = load_any(model)
    elif tokenizer is None:
        raise ConfigError("generate: a loaded model needs its tokenizer (or pass the checkpoint's path instead)")
    return _generate(model, tokenizer, prompt, max_new_tokens, Sampling(sampler, temperature, top_k, top_p), seed,
                     chat, on_text, device)
