"""Shared fixtures: tiny models built in the test (random weights are fine for mechanics), a tiny tokenizer, and the
path of the real assets for quality tests (../shared/assets, or $QUANTLIB_ASSETS)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

from quantlib.artifacts.integrity import CHECKSUMS, seal_dir, seal_file, verify

# Tests never reach the Hugging Face hub: every model and dataset is built here or read from the assets folder.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("QUANTLIB_ASSETS", REPO.parent / "shared" / "assets")).resolve()
SMOL_DIR = ASSETS / "models" / "HuggingFaceTB--SmolLM2-135M-Instruct--Q4_1-gguf"
SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

_WORDS = ("the quick brown fox jumps over lazy dog model weight quantization grid scale zero point layer block "
          "hessian error token window sample data text paper table result bits group channel solver").split()


def corpus(n_docs: int, seed: int = 0, min_words: int = 20, max_words: int = 200) -> list[str]:
    """Deterministic pseudo-text: enough structure for a BPE tokenizer, cheap to generate."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(min_words, max_words))]
        docs.append(" ".join(words).capitalize() + ".")
    return docs


def build_tokenizer(out_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(300, seed=1), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.save_pretrained(out_dir)
    return fast


def tiny_config(family: str, vocab: int = 300):
    import transformers as T

    common = dict(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=512)
    if family == "llama":
        return T.LlamaConfig(intermediate_size=128, num_key_value_heads=2, **common)
    if family == "mistral":
        return T.MistralConfig(intermediate_size=128, num_key_value_heads=2, **common)
    if family == "qwen2":
        return T.Qwen2Config(intermediate_size=128, num_key_value_heads=2, **common)
    if family == "qwen3":  # per-head RMSNorms of the queries and keys
        return T.Qwen3Config(intermediate_size=128, num_key_value_heads=2, head_dim=16, **common)
    if family == "opt":
        return T.OPTConfig(ffn_dim=128, word_embed_proj_dim=64, **common)
    if family == "gpt_neox":
        return T.GPTNeoXConfig(intermediate_size=128, **common)
    if family == "gemma3_text":  # sliding-window and global layers alternating, a window shorter than the windows
        return T.Gemma3TextConfig(intermediate_size=128, num_key_value_heads=2, head_dim=16, sliding_window=8,
                                  layer_types=["sliding_attention", "full_attention"], **common)
    if family == "gpt2":
        return T.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4)
    raise ValueError(family)


def tiny_model(family: str = "llama", seed: int = 0, vocab: int = 300):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, vocab), attn_implementation="sdpa")
    model.config.use_cache = False
    return model.eval()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A saved tiny Llama with its tokenizer: a model directory like resources/models/{model}."""
    d = tmp_path_factory.mktemp("tiny-llama")
    build_tokenizer(d)
    tiny_model("llama").save_pretrained(d)
    seal_dir(d)  # an artifact as fetch_model writes it: readers refuse one without its checksums
    return d


@pytest.fixture(scope="session")
def text_files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("text")
    files = {}
    for name, seed, n in (("train", 2, 400), ("test", 3, 120)):
        path = d / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus(n, seed)))
        files[name] = path
    return files


def calib_tokens(n: int = 16, seqlen: int = 32, vocab: int = 300, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (n, seqlen), generator=g)


def sealed_model_dir(folder: Path, blocks: int = 4) -> Path:
    """A tiny Llama of `blocks` blocks with its tokenizer, saved in `folder` and sealed like the workflow's models."""
    build_tokenizer(folder)
    model = tiny_model("llama")
    model.config.num_hidden_layers = blocks
    type(model)(model.config).eval().save_pretrained(folder)
    seal_dir(folder)
    return folder


def sealed_windows(folder: Path, n: int = 8, seqlen: int = 32, seed: int = 0) -> Path:
    """Calibration windows saved and sealed as the workflow's calibration job writes them (jobs refuse a file
    without its checksum record)."""
    path = Path(folder) / "windows.pt"
    torch.save(calib_tokens(n, seqlen, seed=seed), path)
    seal_file(path, path)
    return path


def quantize_save_reload(model, spec, tok_dir: Path, out: Path, **save_kwargs) -> tuple[object, dict, dict]:
    """Quantizes `model` in place on `calib_tokens(8)`, saves it with the tokenizer in `tok_dir` to `out`, loads it
    back and checks that the reloaded model gives exactly the same logits. Returns (the quantize report, the saved
    per-layer quantization metadata, the saved diagnostics)."""
    from quantlib.checkpoint.reader import load_quantized
    from quantlib.checkpoint.writer import save_quantized
    from quantlib.runner.walk import quantize_model

    report = quantize_model(model, spec, calib_tokens(8), progress=False)
    save_quantized(model, spec, report, out, tok_dir, **save_kwargs)
    loaded = load_quantized(out)
    x = calib_tokens(2, 16, seed=5)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    layers = json.loads((out / "config.json").read_text())["quantization_config"]["layers"]
    return report, layers, json.loads((out / "diagnostics.json").read_text())


requires_assets = pytest.mark.skipif(not (SMOL_DIR / SMOL_GGUF).exists(),
                                     reason=f"real model not found under {ASSETS} (set QUANTLIB_ASSETS)")


def write_task_files(out_dir: Path, n: int = 12, seed: int = 5) -> dict[str, Path]:
    """Tiny copies of lm-eval tasks in the Hugging Face field names (like ../shared/assets/.../hf_schema)."""
    rng = random.Random(seed)
    out_dir.mkdir(parents=True, exist_ok=True)

    def words(k):
        return " ".join(rng.choice(_WORDS) for _ in range(k))

    rows = {
        "piqa": [{"goal": words(6), "sol1": words(5), "sol2": words(7), "label": i % 2} for i in range(n)],
        "arc_easy": [{"id": f"q{i}", "question": words(8) + "?",
                      "choices": {"text": [words(rng.randint(1, 4)) for _ in range(4)], "label": list("ABCD")},
                      "answerKey": "ABCD"[i % 4]} for i in range(n)],
        "winogrande": [{"sentence": f"{words(4)} _ {words(3)}.", "option1": words(1), "option2": words(1),
                        "answer": "12"[i % 2]} for i in range(n)],
        "lambada_openai": [{"text": words(rng.randint(10, 20))} for _ in range(n)],
    }
    files = {}
    for task, items in rows.items():
        files[task] = out_dir / f"{task}.jsonl"
        files[task].write_text("".join(json.dumps(r) + "\n" for r in items))
    return files


@pytest.fixture(scope="session")
def task_files(tmp_path_factory) -> dict[str, Path]:
    return write_task_files(tmp_path_factory.mktemp("tasks"))


def without_timing(obj):
    """A diagnostics record without its timing fields (quantlib.checkpoint.writer.TIMING_FIELDS), at any depth."""
    from quantlib.checkpoint.writer import TIMING_FIELDS
    if isinstance(obj, dict):
        return {k: without_timing(v) for k, v in obj.items() if k not in TIMING_FIELDS}
    if isinstance(obj, list):
        return [without_timing(v) for v in obj]
    return obj


def assert_same_output(got, want) -> None:
    """Two checkpoints equal file by file, byte for byte, but diagnostics.json's timing fields (and its checksum in
    checksums.json): what a resumed job must write."""
    files = sorted(p.relative_to(got).as_posix() for p in got.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(want).as_posix() for p in want.rglob("*") if p.is_file())
    for rel in files:
        a, b = (got / rel).read_bytes(), (want / rel).read_bytes()
        if rel == "diagnostics.json":
            assert without_timing(json.loads(a)) == without_timing(json.loads(b))
        elif rel == CHECKSUMS:
            a, b = json.loads(a)["files"], json.loads(b)["files"]
            assert {k: v for k, v in a.items() if k != "diagnostics.json"} == {
                k: v for k, v in b.items() if k != "diagnostics.json"}
        else:
            assert a == b, rel
    verify(got)


def statistic_files(folder) -> dict:
    """A statistics artifact's files as comparable values: bytes, but the manifest without its `seconds` (and the
    manifest's checksum)."""
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            rel = p.relative_to(folder).as_posix()
            if rel == "manifest.json":
                files[rel] = {k: v for k, v in json.loads(p.read_text()).items() if k != "seconds"}
            elif rel == CHECKSUMS:
                files[rel] = {k: v for k, v in json.loads(p.read_text())["files"].items() if k != "manifest.json"}
            else:
                files[rel] = p.read_bytes()
    return files
