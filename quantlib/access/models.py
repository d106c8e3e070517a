"""Model loading and the explicit download step into the workflow's resources (adapters: quantlib.access.adapters)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from quantlib.access.adapters import check_model_shapes, get_adapter, read_config
from quantlib.access.provenance import MODEL_RECORD, TOKENIZER_FILES, local_model_inputs, looks_local, model_record
from quantlib.artifacts.atomic import atomic_dir, write_json
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

def fetch_model(source: str, out_dir: str | Path, gguf_file: str | None = None, revision: str | None = None,
                tokenizer: str | None = None, shape_checks: dict | None = None, model_key: str | None = None) -> None:
    """Materialise a model as a plain HF checkpoint (config.json, safetensors, tokenizer) in `out_dir`.

    `source` is a hub id or a local directory; `gguf_file` names a GGUF inside it, which is dequantized once here
    (GGUF-loaded models cannot be saved with save_pretrained). Written atomically: a crash leaves nothing.
    `shape_checks` ({group_sizes, row_groups}: what the experiment's specs need) are checked against the model's
    config.json before any weight is downloaded or converted. Every tensor is scanned once for NaN and Inf, and
    `provenance.json` records what the copy was made from (quantlib.access.provenance) and the scan's result.
    """
    def check(cfg: dict) -> None:
        check_model_shapes(cfg, model_key or source, **(shape_checks or {}))

    src = Path(source).expanduser()
    if tokenizer and looks_local(tokenizer) and not Path(tokenizer).expanduser().is_dir():
        raise DataError(f"model '{model_key or source}': local tokenizer '{tokenizer}' is no directory; set "
                        "`tokenizer:` to a tokenizer directory or hub id")
    # What transformers reads: a local folder with `~` expanded (it would take "~/..." for a hub id), or the hub id.
    where = str(src) if src.is_dir() else source
    with atomic_dir(out_dir, seal=True) as tmp:
        if gguf_file:
            _convert_gguf(where, gguf_file, revision, tmp)
        elif src.is_dir():
            if (src / "config.json").exists():
                check(read_config(src))
            _copy_local(src, tmp)
        elif src.exists():
            raise DataError(f"model source '{source}' is a file; give its directory (and gguf_file for a GGUF)")
        else:
            _download(source, revision, tmp, check)
        tok_src = tokenizer or (str(src) if src.is_dir() else None)
        if tok_src and Path(tok_src).expanduser().is_dir():
            for name in TOKENIZER_FILES:
                if (Path(tok_src).expanduser() / name).exists() and not (tmp / name).exists():
                    shutil.copy2(Path(tok_src).expanduser() / name, tmp / name)
        elif tokenizer:
            from transformers import AutoTokenizer
            AutoTokenizer.from_pretrained(tokenizer, revision=revision).save_pretrained(tmp)
        if gguf_file and not tokenizer and not _has_tokenizer(tmp):
            # A GGUF carries its tokenizer (vocabulary, merges or scores, special tokens): used when none lies beside
            # it and none is named (Gemma's official tokenizer repositories are gated).
            from transformers import AutoTokenizer
            AutoTokenizer.from_pretrained(where, gguf_file=gguf_file, revision=revision).save_pretrained(tmp)
        cfg = read_config(tmp)
        check(cfg)
        # Local copies are hard links of the source's files: the scan's SHA-256 is the source's (one read for both).
        scan = check_weight_files(tmp, source, hash_files=not gguf_file and src.is_dir())
        if not _has_tokenizer(tmp):
            raise DataError(f"no tokenizer found for model '{source}'; set `tokenizer:` to a directory or hub id")
        known = {name: {k: v for k, v in rec.items() if k in ("size", "sha256")} for name, rec in scan["files"].items()}
        extra = {"dtype": cfg.get("dtype") or cfg.get("torch_dtype"), "hub_commit": _hub_commit(tmp)}
        if gguf_file:
            extra["dequantized_to"] = "float32"
        entry = {"source": source, "gguf_file": gguf_file, "revision": revision, "tokenizer": tokenizer}
        # Inside the folder before it is sealed: its checksum record covers the provenance record too.
        write_json(tmp / MODEL_RECORD, model_record(entry, model_key, known=known, weights=scan, extra=extra))


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / n).exists() for n in ("tokenizer.json", "tokenizer.model", "vocab.json"))


def check_weight_files(folder: Path, source: str, hash_files: bool = False) -> dict:
    """Every safetensors file must open (its header read) and hold only finite numbers: a truncated or damaged
    download, or a NaN or Inf in the weights, is named here, at fetch time, not deep in a later job. Returns the
    scan's summary (tensors, elements, seconds; per file its size, and its SHA-256 with `hash_files`)."""
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
    t0 = time.perf_counter()
    summary = {"files": {f.name: scan_safetensors(f, source, hash_file=hash_files) for f in files}}
    summary["tensors"] = sum(r["tensors"] for r in summary["files"].values())
    summary["elements"] = sum(r["elements"] for r in summary["files"].values())
    summary["nonfinite"] = 0
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    log.info("scanned %d tensors (%d values) of %s for NaN/Inf in %.2f s: all finite", summary["tensors"],
             summary["elements"], source, summary["seconds"])
    return summary


def _nonfinite_floats(values: np.ndarray) -> int:
    finite = np.isfinite(values)
    return 0 if finite.all() else int(values.size - np.count_nonzero(finite))


def _all_ones(mask: int):
    """NaN or Inf in a format numpy has no float type for (or is slow at): the exponent bits all set."""
    return lambda values: int(np.count_nonzero((values & mask) == mask))


# safetensors dtype -> (how its little-endian bytes are viewed, the count of NaN and Inf in such a view). numpy's
# isfinite runs at about 5 GB/s here against torch's 0.2-0.4 GB/s; bit tests do float16 and bfloat16 as fast.
_SCANNED = {
    "F64": (np.dtype("<f8"), _nonfinite_floats),
    "F32": (np.dtype("<f4"), _nonfinite_floats),
    "F16": (np.dtype("<u2"), _all_ones(0x7C00)),
    "BF16": (np.dtype("<u2"), _all_ones(0x7F80)),
    "F8_E5M2": (np.dtype("u1"), _all_ones(0x7C)),
    "F8_E4M3": (np.dtype("u1"), _all_ones(0x7F)),  # e4m3fn: no Inf, NaN is S.1111.111
}


def scan_safetensors(path: Path, source: str, hash_file: bool = False, chunk: int = 1 << 24) -> dict:
    """Read a safetensors file once, front to back, `chunk` bytes at a time (memory stays small whatever the
    tensor's size): every floating-point tensor must be finite; with `hash_file`, the file's SHA-256 from the same
    read. Raises DataError naming the tensor and the file."""
    digest = hashlib.sha256() if hash_file else None
    buf = bytearray(chunk)
    view = memoryview(buf)
    elements = 0
    with open(path, "rb") as f:
        head = f.read(8)
        header_bytes = f.read(int.from_bytes(head, "little"))
        if digest:
            digest.update(head)
            digest.update(header_bytes)
        header = json.loads(header_bytes)
        header.pop("__metadata__", None)
        pos = 0  # offset in the data section
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            begin, end = info["data_offsets"]
            dtype, count_bad = _SCANNED.get(info["dtype"], (None, None))
            step = chunk - chunk % (dtype.itemsize if dtype else 1)
            bad, remaining = 0, end - begin
            _read_into(f, view, begin - pos, step, digest)  # padding between tensors, if any
            while remaining > 0:
                n = f.readinto(view[:min(step, remaining)])
                if not n:
                    raise DataError(f"weights file {path.name} of model '{source}' ends inside tensor '{name}': "
                                    "truncated; download it again (or replace the local copy)")
                if digest:
                    digest.update(view[:n])
                if dtype is not None:
                    values = np.frombuffer(buf, dtype=dtype, count=n // dtype.itemsize)
                    bad += count_bad(values)
                    elements += values.size
                remaining -= n
            pos = end
            if bad:
                raise DataError(f"tensor '{name}' in weights file {path.name} of model '{source}' holds {bad} NaN or "
                                "Inf values: the checkpoint is damaged or was saved in a dtype too narrow for its "
                                "values; fix the source (or use another copy) and fetch it again")
        while digest and (n := f.readinto(view)):  # anything after the last tensor
            digest.update(view[:n])
    out = {"size": path.stat().st_size, "tensors": len(header), "elements": elements}
    if digest:
        out["sha256"] = digest.hexdigest()
    return out


def _read_into(f, view: memoryview, count: int, step: int, digest) -> None:
    while count > 0:
        n = f.readinto(view[:min(step, count)])
        if not n:
            return
        if digest:
            digest.update(view[:n])
        count -= n


def _hub_commit(tmp: Path) -> str | None:
    """The commit a hub download resolved to (huggingface_hub's metadata files of a `local_dir` download)."""
    for meta in sorted((tmp / ".cache" / "huggingface" / "download").rglob("*.metadata")):
        first = meta.read_text().splitlines()[:1]
        if first:
            return first[0].strip()
    return None


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
    if not (src / "config.json").exists():
        raise DataError(f"'{src}' has no config.json; is it a Hugging Face model directory?")
    for p in local_model_inputs(str(src), None, None)["source"].values():  # the files its provenance records
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
