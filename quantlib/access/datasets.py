"""Datasets: the explicit fetch step, calibration samplers and evaluation windows.

A dataset in the config is `load_dataset` keyword arguments (`path`, `name`, `data_files`, `split`, `revision`)
plus how to read it (`text_column`, `rows`, `join`, ...). The same call serves a hub id (online, or from the
datasets cache with HF_DATASETS_OFFLINE=1), a local mirror directory, or `path: json|parquet|text` with local
`data_files`. `fetch_dataset` writes the text column to one local parquet file under the workflow's resources, so
every later step reads a small local file and an air-gapped machine can be served by a pre-filled folder.
"""

from __future__ import annotations

import hashlib
import logging
import random
from pathlib import Path

import torch

from quantlib.access.provenance import dataset_local_files, dataset_record, dataset_record_path
from quantlib.artifacts.atomic import atomic_file, write_json
from quantlib.artifacts.integrity import verify
from quantlib.catalog.names import mixture_counts
from quantlib.errors import DataError

log = logging.getLogger("quantlib")

LOAD_KEYS = ("path", "name", "data_files", "split", "revision")


def fetch_dataset(cfg: dict, out_path: str | Path, key: str = "?") -> int:
    """Load the dataset described by `cfg` and write its text rows to `out_path` (parquet). Returns the row count.

    `{name}.provenance.json` beside it records the config entry, the local data files' sizes and SHA-256 and the row
    count (quantlib.access.provenance), written in the same atomic write."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    kwargs = {k: cfg[k] for k in LOAD_KEYS if cfg.get(k) is not None}
    kwargs.setdefault("split", "train")
    local = [f for f in _local_files(cfg) if f.exists()]
    for f in local:
        if f.stat().st_size == 0:
            raise DataError(f"dataset '{key}': data file {f} is empty")
    rows = {f: _row_count(f, cfg["path"]) for f in local}
    if local and len(local) == len(_local_files(cfg)) and all(n == 0 for n in rows.values()):
        raise DataError(f"dataset '{key}': {', '.join(map(str, local))} holds no rows (a valid '{cfg['path']}' file "
                        f"without data); point `datasets.{key}.data_files` at a file with text rows")
    try:
        ds = datasets.load_dataset(**kwargs)
    except Exception as exc:  # offline cache miss, missing file, unknown config: one message with what to do
        if local:
            empty = [str(f) for f, n in rows.items() if n == 0]
            if empty:  # one empty file among several: the loader fails on it, not on the others
                raise DataError(f"dataset '{key}': {', '.join(empty)} holds no rows (a valid '{cfg['path']}' file "
                                f"without data); remove it from `datasets.{key}.data_files`") from exc
            raise DataError(f"dataset '{key}': {', '.join(map(str, local))} could not be read as '{cfg['path']}' data "
                            f"({type(exc).__name__}: {exc}); the file is damaged, truncated or of another "
                            "format: replace it") from exc
        raise DataError(
            f"dataset '{key}' could not be loaded with {kwargs}: {type(exc).__name__}: {exc}. "
            "Without network access, point `datasets." + key + ".path` (or `data_files`) at local files, "
            "or pre-fill the resources folder.") from exc
    column = cfg.get("text_column", "text")
    if column not in ds.column_names:
        raise DataError(f"dataset '{key}' has no column '{column}'; its columns are {ds.column_names}. "
                        f"Set `datasets.{key}.text_column`.")
    texts = ds[column]
    if cfg.get("rows"):
        start, stop = cfg["rows"]
        if stop > len(texts):
            raise DataError(f"dataset '{key}' has {len(texts)} rows, fewer than rows: [{start}, {stop}]")
        texts = texts[start:stop]
    if not texts:
        raise DataError(f"dataset '{key}' has no rows (source: {kwargs.get('data_files') or kwargs['path']})")
    with atomic_file(out_path, seal=True) as tmp:
        pq.write_table(pa.table({"text": texts}), tmp)
        # Before the parquet's rename: a crash leaves at worst a record without its file, which the next fetch
        # rewrites (a record is only read beside an existing file).
        write_json(dataset_record_path(out_path), dataset_record(cfg, key, rows=len(texts)))
    return len(texts)


def _row_count(path: Path, loader: str) -> int | None:
    """Rows of a local data file when that is cheap to know (a parquet footer; a json or text file of blanks only),
    else None: a valid file with no rows gets its own message rather than "damaged"."""
    if path.suffix == ".parquet" or loader == "parquet":
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(path).metadata.num_rows
        except (OSError, ValueError):  # not a parquet file (ArrowInvalid is a ValueError): the loader says so
            return None
    if loader in ("json", "text") or path.suffix in (".json", ".jsonl", ".txt"):
        with open(path, "rb") as f:
            head = f.read(1 << 16)
        empty = (b"", b"[]") if loader == "json" or path.suffix in (".json", ".jsonl") else (b"",)
        if len(head) < (1 << 16) and head.strip() in empty:
            return 0
    return None


def _local_files(cfg: dict) -> list[Path]:
    return [Path(f).expanduser() for f in dataset_local_files(cfg)]


def read_texts(path: str | Path) -> list[str]:
    """The text rows of a dataset artifact (parquet written by `fetch_dataset`), verified first."""
    import pyarrow.parquet as pq

    verify(path)
    try:
        return pq.read_table(path).column("text").to_pylist()
    except Exception as exc:
        raise DataError(f"{path} is not a readable dataset file ({type(exc).__name__}: {exc}); delete it and rerun "
                        "the workflow to fetch it again") from exc


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text).input_ids


# ------------------------------------------------------------------------------------------------ samplers

def sample_documents(texts: list[str], tokenizer, n: int, seqlen: int, seed: int, accept: str = ">=",
                     what: str = "calibration") -> tuple[torch.Tensor, dict]:
    """GPTQ's C4 sampler: draw a document uniformly until one is long enough, then a uniform window of it.

    `accept` is '>=' (GPTQ, NeUQI) or '>' (UniQuanF eval): which documents count as long enough. A document of
    exactly `seqlen` tokens gives start 0 (the reference code would crash on that draw).
    """
    ok = (lambda m: m >= seqlen) if accept == ">=" else (lambda m: m > seqlen)
    _require_enough(texts, tokenizer, n, seqlen, ok, what)
    rng = random.Random(seed)
    windows, docs = [], []
    for _ in range(n):
        while True:
            i = rng.randint(0, len(texts) - 1)
            ids = _encode(tokenizer, texts[i])
            if ok(len(ids)):
                break
        start = rng.randint(0, len(ids) - seqlen - 1) if len(ids) > seqlen else 0
        windows.append(ids[start:start + seqlen])
        docs.append(i)
    manifest = {"sampler": "documents", "accept": accept, "seed": seed, "documents": len(set(docs)),
                "draws": docs}
    return torch.tensor(windows, dtype=torch.long), manifest


def _require_enough(texts, tokenizer, n, seqlen, ok, what) -> None:
    """Fail loudly unless the long-enough documents hold n x seqlen tokens (scans only as far as needed)."""
    need, have, eligible = n * seqlen, 0, 0
    for i in range(0, len(texts), 256):
        for ids in tokenizer(texts[i:i + 256]).input_ids:
            if ok(len(ids)):
                have += len(ids)
                eligible += 1
        if have >= need:
            return
    raise DataError(
        f"the {what} text is too short for {n} windows of {seqlen} tokens: its {len(texts)} documents hold only "
        f"{eligible} long enough ({have} tokens < {need}). Lower nsamples or seqlen, or use a larger dataset.")


def sample_concat(texts: list[str], tokenizer, n: int, seqlen: int, seed: int, join: str = "\n\n",
                  what: str = "calibration") -> tuple[torch.Tensor, dict]:
    """Windows at uniform random starts in the joined, tokenized text (GPTQ's WikiText-2 calibration)."""
    ids = _encode(tokenizer, join.join(texts))
    if len(ids) < n * seqlen + 1:
        raise DataError(f"the {what} text has {len(ids)} tokens, too few for {n} windows of {seqlen} tokens")
    rng = random.Random(seed)
    starts = [rng.randint(0, len(ids) - seqlen - 1) for _ in range(n)]
    windows = [ids[s:s + seqlen] for s in starts]
    return torch.tensor(windows, dtype=torch.long), {"sampler": "concat", "seed": seed, "text_tokens": len(ids)}


def sample_chunks(texts: list[str], tokenizer, n: int, seqlen: int, batch: int = 1000,
                  what: str = "calibration") -> tuple[torch.Tensor, dict]:
    """Hugging Face's run_clm grouping (UniQuanF's calibration): every document tokenized (with the tokenizer's
    special tokens), concatenated within consecutive batches of `batch` documents, each batch cut into windows with
    its remainder dropped; the first n windows, in order (no randomness)."""
    windows = []
    for b0 in range(0, len(texts), batch):
        ids = [t for doc in tokenizer(texts[b0:b0 + batch]).input_ids for t in doc]
        windows.extend(ids[s:s + seqlen] for s in range(0, len(ids) - seqlen + 1, seqlen))
        if len(windows) >= n:
            break
    if len(windows) < n:
        raise DataError(f"the {what} text holds {len(windows)} windows of {seqlen} tokens in batches of {batch} "
                        f"documents, fewer than {n}")
    return torch.tensor(windows[:n], dtype=torch.long), {"sampler": "chunks", "batch_documents": batch}


def calibration_windows(texts: list[str], tokenizer, ds_cfg: dict, n: int, seqlen: int, seed: int):
    sampler = ds_cfg.get("calibration_sampler", "documents")
    if sampler == "documents":
        return sample_documents(texts, tokenizer, n, seqlen, seed, ds_cfg.get("accept", ">="))
    if sampler == "chunks":
        return sample_chunks(texts, tokenizer, n, seqlen)
    return sample_concat(texts, tokenizer, n, seqlen, seed, ds_cfg.get("join", "\n\n"))


def part_seed(seed: int, part: str) -> int:
    """A mixture part's own seed, keyed by its name: adding or reweighting another part leaves its draws as they
    were (only its count changes)."""
    return int(hashlib.sha256(f"{seed}:{part}".encode()).hexdigest()[:15], 16)


class _TemplateTokenizer:
    """Encodes chat-formatted text without adding special tokens again: the template already holds them (a second
    BOS would change every window)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, text):
        return self.tokenizer(text, add_special_tokens=False)


def chat_formatted(texts: list[str], tokenizer, what: str) -> list[str]:
    """Each document as one user turn in the tokenizer's chat template (how instruct models see text)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{what} asks for chat_template: true, but this model's tokenizer has no chat template "
                        "(no chat_template in tokenizer_config.json, no chat_template.jinja); calibrate it on plain "
                        "text (drop chat_template) or give the model a tokenizer with one")
    return [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False) for t in texts]


def mixture_windows(texts: dict[str, list[str]], tokenizer, mixture: dict, n: int, seqlen: int, seed: int):
    """Calibration windows of a mixture `{"parts": {dataset: weight}, "chat_template": bool, "datasets": {dataset:
    cfg}}`: each part's share of n (`mixture_counts`) drawn by its own dataset's sampler with its own seed
    (`part_seed`), the windows then shuffled together with `seed`. The manifest records each window's part."""
    if set(texts) != set(mixture["parts"]):
        raise DataError(f"a mixture of parts {sorted(mixture['parts'])} was given the texts of {sorted(texts)}")
    if mixture.get("chat_template"):
        texts = {k: chat_formatted(v, tokenizer, f"calibration mixture part '{k}'") for k, v in texts.items()}
        tokenizer = _TemplateTokenizer(tokenizer)
    counts = mixture_counts(mixture["parts"], n)
    windows, manifests, origin = [], {}, []
    for part, count in counts.items():
        if count == 0:
            raise DataError(f"calibration mixture part '{part}' gets 0 of {n} windows at weight "
                            f"{mixture['parts'][part]}; raise nsamples or its weight")
        w, manifests[part] = calibration_windows(texts[part], tokenizer, mixture["datasets"][part], count, seqlen,
                                                 part_seed(seed, part))
        manifests[part].pop("draws", None)
        windows.append(w)
        origin += [part] * count
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return torch.cat(windows)[order], {"sampler": "mixture", "seed": seed, "counts": counts,
                                       "chat_template": bool(mixture.get("chat_template")), "parts": manifests,
                                       "window_parts": [origin[i] for i in order]}


def eval_windows(texts: list[str], tokenizer, ds_cfg: dict, seqlen: int) -> tuple[torch.Tensor, dict]:
    """All evaluation windows of a dataset under its protocol, shape (n_windows, seqlen).

    contiguous: rows joined by `join`, tokenized once, optionally truncated to `max_tokens`, cut into
    non-overlapping windows (remainder dropped) - GPTQ's WikiText-2 and c4_new protocols.
    documents: `nwindows` random windows of random long-enough documents with `seed` - GPTQ's/NeUQI's C4.
    """
    mode = ds_cfg.get("eval_windows", "contiguous")
    if mode == "documents":
        windows, info = sample_documents(texts, tokenizer, ds_cfg.get("nwindows", 256), seqlen,
                                         ds_cfg.get("seed", 0), ds_cfg.get("accept", ">="), what="evaluation")
        info.pop("draws")
        return windows, {"windows_from": "documents", **info}
    join = ds_cfg.get("join", "\n\n")
    ids = _encode(tokenizer, join.join(texts))
    total = len(ids)
    if ds_cfg.get("max_tokens"):
        ids = ids[: ds_cfg["max_tokens"]]
    count = len(ids) // seqlen
    if count == 0:
        raise DataError(f"the evaluation text has {len(ids)} tokens, fewer than one window of {seqlen}")
    windows = torch.tensor(ids[: count * seqlen], dtype=torch.long).view(count, seqlen)
    return windows, {"windows_from": "contiguous", "join": join, "text_tokens": total,
                     "max_tokens": ds_cfg.get("max_tokens")}
