"""Packing one decoder block at a time (quantlib.checkpoint.pack.writer): one shard per block and one for the rest,
equal tensor by tensor to converting the whole checkpoint at once, one block's tensors in memory at a time, the old
single-file checkpoints still packed, a refusal mid-way leaving nothing, and the memory model's figures."""

from __future__ import annotations

import json
import re
import weakref

import pytest
import torch
from conftest import build_tokenizer, tiny_config

from quantlib.access.lazy import INDEX, WeightSource
from quantlib.artifacts.integrity import seal_dir
from quantlib.catalog.pack_formats import pack_format
from quantlib.catalog.spec import QuantSpec
from quantlib.checkpoint.pack.load import load_packed
from quantlib.checkpoint.pack.writer import pack_checkpoint
from quantlib.checkpoint.reader import load_quantized, read_representations
from quantlib.checkpoint.writer import SHARD, save_quantized
from quantlib.errors import ConfigError
from quantlib.runner.walk import quantize_model

BLOCKS = 4


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """Quantized tiny Llamas of BLOCKS decoder blocks by short name (RTN: no calibration), made once."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("blocks")
    build_tokenizer(root / "tok")
    cache = {}

    def make(name: str):
        if name not in cache:
            torch.manual_seed(0)
            config = tiny_config("llama")
            config.num_hidden_layers = BLOCKS
            model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
            spec = QuantSpec.parse(name)
            save_quantized(model, spec, quantize_model(model, spec, None, progress=False), root / name, root / "tok")
            cache[name] = root / name
        return cache[name]

    return make


def whole_checkpoint_at_once(src, fmt: str, dtype: str, stat_dtype: str) -> dict:
    """The tensors of the single-file pack of before: the whole checkpoint read, every layer converted."""
    qcfg = json.loads((src / "config.json").read_text())["quantization_config"]
    state, reps = read_representations(src, qcfg)
    writer = pack_format(fmt).writer()
    writer.check(reps)
    writer.sym = all(bool((rep.grid.zero == 2 ** (rep.grid.bits - 1)).all()) for rep in reps.values()) \
        if fmt in ("ct", "gptq") else None
    out = {k: v.to(getattr(torch, dtype)) if v.is_floating_point() else v for k, v in state.items()}
    for layer, rep in reps.items():
        tensors = writer.layer_tensors(layer, rep, getattr(torch, stat_dtype))
        out.update({f"{layer}.{leaf}": v for leaf, v in tensors.items()})
    return out


def logits(model) -> torch.Tensor:
    tokens = torch.randint(4, 300, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("fmt,name", [("ct", "tiny.rtn.w4g32"), ("ct", "tiny.rtn.w4g32.sym"),
                                      ("gptq", "tiny.rtn.w3g32"), ("anyprec", "tiny.rtn.w3"),
                                      ("bcq", "tiny.rtn.w3g32")])
def test_one_shard_per_block_equal_to_packing_the_whole_checkpoint(fmt, name, quantized, tmp_path):
    src = quantized(name)
    report = pack_checkpoint(src, tmp_path / "p", fmt, "float16", "float16")
    shards = [SHARD.format(k, BLOCKS + 1) for k in range(1, BLOCKS + 2)]
    assert sorted(p.name for p in (tmp_path / "p").glob("*.safetensors")) == shards
    index = json.loads((tmp_path / "p" / INDEX).read_text())["weight_map"]
    for key, shard in index.items():
        m = re.match(r"model\.layers\.(\d+)\.", key)
        assert shard == shards[int(m.group(1)) if m else BLOCKS], key
    got, ref = WeightSource(tmp_path / "p").state(), whole_checkpoint_at_once(src, fmt, "float16", "float16")
    assert got.keys() == ref.keys()
    for key in ref:
        assert got[key].dtype == ref[key].dtype and torch.equal(got[key], ref[key]), key
    assert report["file_bytes"] == sum((tmp_path / "p" / s).stat().st_size for s in shards)
    assert report["quantized_layers"] == 7 * BLOCKS
    if fmt != "bcq":  # bcq: sums of signed powers of two times s, equal up to float32 rounding (test_pack.py)
        pack_checkpoint(src, tmp_path / "p32", fmt, "float32", "float32")
        assert torch.equal(logits(load_packed(tmp_path / "p32", backend="torch")), logits(load_quantized(src)))


def test_packing_holds_one_block_at_a_time(quantized, tmp_path, monkeypatch):
    """Every tensor read from the checkpoint is tracked until it is freed: when a part (a block, or what lies outside
    the blocks) is read, no tensor of another part is alive. Reading the whole checkpoint would hold all of them."""
    src = quantized("tiny.rtn.w4g32")
    alive, most, reads = {}, [0], []
    read = WeightSource.read

    def part(key: str) -> str:
        m = re.match(r"model\.layers\.(\d+)\.", key)
        return m.group(1) if m else "outer"

    def freed(p: str) -> None:
        alive[p] -= 1

    def tracked(self, keys):
        out = read(self, keys)
        reads.append({part(k) for k in out})
        for key, tensor in out.items():
            alive[part(key)] = alive.get(part(key), 0) + 1
            weakref.finalize(tensor, freed, part(key))
        most[0] = max(most[0], sum(1 for n in alive.values() if n))
        return out

    monkeypatch.setattr(WeightSource, "read", tracked)
    pack_checkpoint(src, tmp_path / "ct", "ct", "float16", "float16")
    monkeypatch.undo()
    assert most[0] == 1, f"tensors of {most[0]} parts of the checkpoint were in memory at once"
    assert all(len(parts) == 1 for parts in reads) and len(reads) == 2 * BLOCKS + 1  # the survey's, then the pack's
    assert not any(alive.values())


def test_a_single_file_checkpoint_packs_the_same(quantized, tmp_path):
    """A quantized checkpoint of one model.safetensors (written before the sharded layout) packs to the same shards."""
    import shutil

    from safetensors.torch import save_file

    src = quantized("tiny.rtn.w3g32")
    single = tmp_path / "single"
    shutil.copytree(src, single)
    state = WeightSource(single).state()
    for f in [*single.glob("*.safetensors"), single / INDEX, single / "checksums.json"]:
        f.unlink()
    save_file(state, str(single / "model.safetensors"), metadata={"format": "pt"})
    seal_dir(single)
    for fmt in ("ct", "bcq"):
        pack_checkpoint(src, tmp_path / f"{fmt}-sharded", fmt, "float32", "float32")
        pack_checkpoint(single, tmp_path / f"{fmt}-single", fmt, "float32", "float32")
        a, b = WeightSource(tmp_path / f"{fmt}-sharded"), WeightSource(tmp_path / f"{fmt}-single")
        assert a.files == b.files and len(set(b.files.values())) == BLOCKS + 1
        sa, sb = a.state(), b.state()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_refusal_found_in_a_later_block_leaves_nothing(quantized, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    shutil.copytree(quantized("tiny.rtn.w4g32"), src)
    shard = src / SHARD.format(3, BLOCKS + 1)  # block 2's
    state = load_file(str(shard))
    state["model.layers.2.mlp.up_proj.scales"] = state["model.layers.2.mlp.up_proj.scales"] * 1e9
    save_file(state, str(shard), metadata={"format": "pt"})
    (src / "checksums.json").unlink()
    seal_dir(src)
    with pytest.raises(ConfigError, match=r"layer 'model\.layers\.2\.mlp\.up_proj': its scales do not fit"):
        pack_checkpoint(src, tmp_path / "out", "ct", "float16", "float16")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


# ------------------------------------------------------------------------------------------------ memory model

LLAMA2_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
             "num_key_value_heads": 32, "vocab_size": 32000, "num_hidden_layers": 32, "tie_word_embeddings": False}


def test_the_pack_memory_model_is_one_block_not_the_model():
    from quantlib.jobs.memory import MB, plan_pack
    from quantlib.jobs.requests import request_mb

    spec = QuantSpec.parse("m.rtn.w4g128.pack-ct")
    plan = plan_pack(LLAMA2_7B, spec, {"dtype": "float16", "stat_dtype": "float16"}, {})
    deeper = plan_pack({**LLAMA2_7B, "num_hidden_layers": 80}, spec, {}, {})
    assert plan.phases == deeper.phases  # the number of blocks does not count
    assert 0.8e9 < plan.phases["block"] < 3e9 and plan.peak < 4e9  # one block; the model itself is 27 GB in float32
    assert plan.phases["outer"] == 2 * 32000 * 4096 * (4 + 2)  # as stored (float32) and in float16
    cfg = {"compute": {}, "pack": {"dtype": "float16", "stat_dtype": "float16"}}
    assert request_mb("pack", LLAMA2_7B, spec, cfg) == max(2000, int(1.5 * plan.peak / MB))
    anyprec = plan_pack(LLAMA2_7B, QuantSpec.parse("m.rtn.w4.pack-anyprec"), {}, {})
    assert anyprec.phases["block"] > plan.phases["block"]  # the bit planes are built for the whole matrix


def test_the_pack_step_refuses_a_memory_budget_below_its_peak_before_reading_weights(tmp_path):
    from quantlib.jobs.steps import pack

    src = tmp_path / "q"  # a config and no weights: a refusal that read anything would be another error
    src.mkdir()
    (src / "config.json").write_text(json.dumps(LLAMA2_7B))
    with pytest.raises(ConfigError, match=r"compute.max_memory is 1,000 MB, but packing m.rtn.w4g128.pack-ct needs "
                                          r"[\d,]+ MB: runtime .*block .*outer"):
        pack("m.rtn.w4g128.pack-ct", src, tmp_path / "out", {}, {"max_memory": "1000MB"})
    assert not (tmp_path / "out").exists()
