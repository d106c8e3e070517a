"""quantlib: post-training quantization of LLMs, one implementation of each method, usable without Snakemake.

The Python API (quantlib.api, importable from here): load_model, load_tokenizer, read_texts, calibration_windows,
eval_windows, quantize, save, load, perplexity, pack_checkpoint, generate. The catalog of methods is quantlib.catalog.registry, short names
quantlib.catalog.spec, the workflow's configuration quantlib.config. `import quantlib` loads torch only when an API
function is first used, so the Snakefile's imports stay light.
"""

__all__ = ["calibration_windows", "eval_windows", "generate", "load", "load_model", "load_tokenizer", "pack_checkpoint",
           "perplexity", "quantize", "read_texts", "save"]


def __getattr__(name):
    if name in __all__:
        from quantlib import api  # here, not at the top: `import quantlib` stays free of torch

        return getattr(api, name)
    raise AttributeError(f"module 'quantlib' has no attribute '{name}'")


def __dir__():
    return sorted(list(globals()) + __all__)
