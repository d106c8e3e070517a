"""Model loading and the explicit download step into the workflow's resources (adapters: quantlib.adapters)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from .adapters import ADAPTERS, Adapter, adapter_for, check_group_size_fits, get_adapter, read_config  # noqa: F401
from .errors import DataError
from .io import atomic_dir

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
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, attn_implementation=attn)
    model.config.use_cache = False
    return model.eval()


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.model_max_length = int(1e9)  # we cut windows ourselves; silence the length warning
    return tok


# ------------------------------------------------------------------------------------------------ fetching

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                    "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")


def fetch_model(source: str, out_dir: str | Path, gguf_file: str | None = None, revision: str | None = None,
                tokenizer: str | None = None) -> None:
    """Materialise a model as a plain HF checkpoint (config.json, safetensors, tokenizer) in `out_dir`.

    `source` is a hub id or a local directory; `gguf_file` names a GGUF inside it, which is dequantized once here
    (GGUF-loaded models cannot be saved with save_pretrained). Written atomically: a crash leaves nothing.
    """
    src = Path(source).expanduser()
    with atomic_dir(out_dir) as tmp:
        if gguf_file:
            _convert_gguf(source, gguf_file, revision, tmp)
        elif src.is_dir():
            _copy_local(src, tmp)
        elif src.exists():
            raise DataError(f"model source '{source}' is a file; give its directory (and gguf_file for a GGUF)")
        else:
            _download(source, revision, tmp)
        tok_src = tokenizer or (str(src) if src.is_dir() else None)
        if tok_src and Path(tok_src).is_dir():
            for name in _TOKENIZER_FILES:
                if (Path(tok_src) / name).exists() and not (tmp / name).exists():
                    shutil.copy2(Path(tok_src) / name, tmp / name)
        elif tokenizer:
            from transformers import AutoTokenizer
            AutoTokenizer.from_pretrained(tokenizer, revision=revision).save_pretrained(tmp)
        cfg = read_config(tmp)
        get_adapter(cfg.get("model_type", "?"))
        if not any((tmp / n).exists() for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
            raise DataError(f"no tokenizer found for model '{source}'; set `tokenizer:` to a directory or hub id")


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


def _copy_local(src: Path, tmp: Path) -> None:
    files = [p for p in src.iterdir() if p.is_file() and (p.suffix in (".safetensors", ".json", ".bin", ".model", ".txt", ".jinja"))]
    if not (src / "config.json").exists():
        raise DataError(f"'{src}' has no config.json; is it a Hugging Face model directory?")
    for p in files:
        try:
            os.link(p, tmp / p.name)  # same filesystem: no copy of multi-GB weights
        except OSError:
            shutil.copy2(p, tmp / p.name)


def _download(repo_id: str, revision: str | None, tmp: Path) -> None:
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(repo_id, revision=revision, local_dir=str(tmp),
                          allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as exc:  # offline, unknown repo, gated: one message with what to do
        raise DataError(
            f"could not download model '{repo_id}': {type(exc).__name__}: {exc}. On a machine without the hub, "
            "set `source:` to a local directory (or pre-fill the resources folder).") from exc
    if not any(tmp.glob("*.safetensors")):
        raise DataError(f"model '{repo_id}' has no safetensors weights on the hub; convert it to safetensors first")
