"""Model loading and the explicit download step into the workflow's resources (adapters: quantlib.access.adapters)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from quantlib.access.adapters import check_model_shapes, get_adapter, read_config
from quantlib.artifacts.atomic import atomic_dir
from quantlib.artifacts.integrity import verify
from quantlib.errors import DataError

log = logging.getLogger("quantlib")


# ------------------------------------------------------------------------------------------------ loading

def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        # bf16/fp16 matmuls are 10-100x slower than fp32 on CPUs without AMX; GPUs run the papers' fp16.
        return torch.float16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_attn(attn: str, device: str) -> str:
    if attn != "auto":
        return attn
    if device.startswith("cuda"):
        from transformers.utils import is_flash_attn_2_available
        if is_flash_attn_2_available():
            return "flash_attention_2"
    return "sdpa"


def load_model(model_dir: str | Path, dtype: torch.dtype = torch.float32, attn: str = "sdpa"):
    """A full-precision model from a resources directory (a plain HF checkpoint)."""
    from transformers import AutoModelForCausalLM

    get_adapter(read_config(model_dir).get("model_type", "?"))
    verify(model_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, attn_implementation=attn)
    except Exception as exc:  # a damaged weights file of a copy without checksums, say
        raise DataError(f"the model in {model_dir} could not be loaded ({type(exc).__name__}: {exc}); delete "
                        f"{model_dir} and rerun the workflow to fetch it again") from exc
    check_finite(model, model_dir)
    model.config.use_cache = False
    return model.eval()


def check_finite(model, where) -> None:
    """NaN or Inf in the model's own weights make every figure meaningless: refuse them when the model is loaded,
    naming the tensor, before any block is quantized or evaluated."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise DataError(f"tensor '{name}' of the model in {where} holds {bad} NaN or Inf values; the checkpoint is "
                            "damaged or was saved in a dtype too narrow for its values")


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.model_max_length = int(1e9)  # we cut windows ourselves; silence the length warning
    return tok


# ------------------------------------------------------------------------------------------------ fetching

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                    "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")


def fetch_model(source: str, out_dir: str | Path, gguf_file: str | None = None, revision: str | None = None,
                tokenizer: str | None = None, shape_checks: dict | None = None, model_key: str | None = None) -> None:
    """Materialise a model as a plain HF checkpoint (config.json, safetensors, tokenizer) in `out_dir`.

    `source` is a hub id or a local directory; `gguf_file` names a GGUF inside it, which is dequantized once here
    (GGUF-loaded models cannot be saved with save_pretrained). Written atomically: a crash leaves nothing.
    `shape_checks` ({group_sizes, row_groups}: what the experiment's specs need) are checked against the model's
    config.json before any weight is downloaded or converted.
    """
    def check(cfg: dict) -> None:
        check_model_shapes(cfg, model_key or source, **(shape_checks or {}))

    src = Path(source).expanduser()
    with atomic_dir(out_dir, seal=True) as tmp:
        if gguf_file:
            _convert_gguf(source, gguf_file, revision, tmp)
        elif src.is_dir():
            if (src / "config.json").exists():
                check(read_config(src))
            _copy_local(src, tmp)
        elif src.exists():
            raise DataError(f"model source '{source}' is a file; give its directory (and gguf_file for a GGUF)")
        else:
            _download(source, revision, tmp, check)
        tok_src = tokenizer or (str(src) if src.is_dir() else None)
        if tok_src and Path(tok_src).is_dir():
            for name in TOKENIZER_FILES:
                if (Path(tok_src) / name).exists() and not (tmp / name).exists():
                    shutil.copy2(Path(tok_src) / name, tmp / name)
        elif tokenizer:
            from transformers import AutoTokenizer
            AutoTokenizer.from_pretrained(tokenizer, revision=revision).save_pretrained(tmp)
        cfg = read_config(tmp)
        check(cfg)
        check_weight_files(tmp, source)
        if not any((tmp / n).exists() for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
            raise DataError(f"no tokenizer found for model '{source}'; set `tokenizer:` to a directory or hub id")


def check_weight_files(folder: Path, source: str) -> None:
    """Every safetensors file must open (its header read): a truncated or damaged download is named here, at fetch
    time, not as an 'incomplete metadata' error deep in a later job."""
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise DataError(f"model '{source}' has no safetensors weights")
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:
                keys = list(handle.keys())
                if keys:
                    handle.get_slice(keys[-1])  # the last tensor's data lies at the end of a complete file
        except Exception as exc:
            raise DataError(f"weights file {f.name} of model '{source}' is damaged or truncated ({exc}); download "
                            "it again (or replace the local copy)") from None


def _convert_gguf(source: str, gguf_file: str, revision: str | None, tmp: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    if Path(source).is_dir() and not (Path(source) / gguf_file).exists():
        raise DataError(f"GGUF file '{gguf_file}' not found in {source}")
    log.info("dequantizing %s/%s to a float32 checkpoint", source, gguf_file)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, revision=revision, dtype=torch.float32)
    get_adapter(model.config.model_type)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied to the embedding; safetensors refuses shared storage
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["dtype"] = "float32"
    cfg["quantlib_source"] = {"source": source, "gguf_file": gguf_file}
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))


def _not_found(repo_id: str, exc: Exception) -> str:
    return (f"model '{repo_id}' is no local directory (relative paths are read from {Path.cwd()}) and could not be "
            f"downloaded as a hub id ({type(exc).__name__}: {exc}). Give an existing directory (e.g. ./{repo_id}), a "
            "reachable hub id, or pre-fill the resources folder.")


def _copy_local(src: Path, tmp: Path) -> None:
    files = [p for p in src.iterdir() if p.is_file() and (p.suffix in (".safetensors", ".json", ".bin", ".model", ".txt", ".jinja"))]
    if not (src / "config.json").exists():
        raise DataError(f"'{src}' has no config.json; is it a Hugging Face model directory?")
    for p in files:
        try:
            os.link(p, tmp / p.name)  # same filesystem: no copy of multi-GB weights
        except OSError:
            shutil.copy2(p, tmp / p.name)


def _download(repo_id: str, revision: str | None, tmp: Path, check=None) -> None:
    from huggingface_hub import hf_hub_download, snapshot_download

    if check is not None:  # config.json first: a group size the model cannot take fails before gigabytes download
        try:
            config = hf_hub_download(repo_id, "config.json", revision=revision)
        except Exception as exc:
            raise DataError(_not_found(repo_id, exc)) from exc
        check(json.loads(Path(config).read_text()))
    try:
        snapshot_download(repo_id, revision=revision, local_dir=str(tmp),
                          allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as exc:  # offline, unknown repo, gated: one message with what to do
        raise DataError(_not_found(repo_id, exc)) from exc
    if not any(tmp.glob("*.safetensors")):
        raise DataError(f"model '{repo_id}' has no safetensors weights on the hub; convert it to safetensors first")
