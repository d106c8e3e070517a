"""Calibration mixtures and chat-template calibration: windows from each part in the declared proportion, seeded,
each part's draws its own; the template applied without a second set of special tokens; bad mixtures refused."""

from __future__ import annotations

import copy
import random

import pytest
import torch
import yaml

from conftest import REPO, build_tokenizer
from quantlib.access.datasets import mixture_windows, sample_chunks
from quantlib.catalog.names import mixture_counts
from quantlib.config.experiment import Experiment
from quantlib.errors import ConfigError, DataError

TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} [end]{% endfor %}"


def _letters_text(letters: str, n_docs: int, seed: int) -> list[str]:
    """Documents written only in `letters`: a window decodes to letters of one part alone."""
    rng = random.Random(seed)
    return [" ".join("".join(rng.choice(letters) for _ in range(rng.randint(2, 7))) for _ in range(120))
            for _ in range(n_docs)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def _mixture(parts: dict, sampler: str = "documents", chat: bool = False) -> dict:
    return {"parts": parts, "chat_template": chat, "datasets": dict.fromkeys(parts, {"calibration_sampler": sampler})}


def _source_of(tok, window: torch.Tensor) -> str:
    letters = set(tok.decode(window.tolist()).replace(" ", ""))
    if letters <= set("abcdefghijklm"):
        return "first"
    assert letters <= set("nopqrstuvwxyz"), letters
    return "second"


@pytest.mark.parametrize("parts,n,expected", [
    ({"a": 3, "b": 1}, 8, {"a": 6, "b": 2}),
    ({"a": 1, "b": 1, "c": 1}, 10, {"a": 4, "b": 3, "c": 3}),  # the remainder to the part listed first
    ({"a": 0.7, "b": 0.2, "c": 0.1}, 7, {"a": 5, "b": 1, "c": 1}),  # 4.9, 1.4, 0.7: largest remainders win
    ({"a": 1}, 5, {"a": 5}),
])
def test_mixture_counts_are_proportional_and_sum_to_n(parts, n, expected):
    assert mixture_counts(parts, n) == expected


def test_windows_come_from_each_part_in_proportion(tok):
    texts = {"first": _letters_text("abcdefghijklm", 40, 0), "second": _letters_text("nopqrstuvwxyz", 40, 1)}
    windows, manifest = mixture_windows(texts, tok, _mixture({"first": 3, "second": 1}), 16, 24, seed=0)
    assert windows.shape == (16, 24)
    sources = [_source_of(tok, w) for w in windows]
    assert sources.count("first") == 12 and sources.count("second") == 4
    assert manifest["window_parts"] == sources and manifest["counts"] == {"first": 12, "second": 4}
    assert sources != sorted(sources)  # shuffled together, not one part after the other
    again, _ = mixture_windows(texts, tok, _mixture({"first": 3, "second": 1}), 16, 24, seed=0)
    other, _ = mixture_windows(texts, tok, _mixture({"first": 3, "second": 1}), 16, 24, seed=1)
    assert torch.equal(windows, again) and not torch.equal(windows, other)
    # A part's draws are its own: reweighting the mixture changes how many it gives, not which ones come first.
    fewer, m2 = mixture_windows(texts, tok, _mixture({"first": 1, "second": 1}), 16, 24, seed=0)
    first_of = lambda w, m: [tuple(x.tolist()) for x, p in zip(w, m["window_parts"]) if p == "first"]  # noqa: E731
    assert set(first_of(fewer, m2)) <= set(first_of(windows, manifest))


def test_chat_template_formats_each_document_once(tok):
    texts = {"first": _letters_text("abcdefghijklm", 8, 0)}
    templated = copy.deepcopy(tok)
    templated.chat_template = TEMPLATE
    windows, manifest = mixture_windows(texts, templated, _mixture({"first": 1}, "chunks", chat=True), 2, 16, 0)
    plain, _ = sample_chunks(texts["first"], tok, 2, 16)
    assert manifest["chat_template"] is True
    decoded = [tok.decode(w.tolist()) for w in windows]
    assert any(d.startswith("[user] ") for d in decoded), decoded  # the first chunk opens the first document's turn
    assert not torch.equal(windows, plain)
    with pytest.raises(DataError, match="no chat template"):
        mixture_windows(texts, tok, _mixture({"first": 1}, chat=True), 2, 16, 0)


def _cfg() -> dict:
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    cfg["mixtures"] = {"c4wiki": {"parts": {"c4": 3, "wikitext2": 1}, "label": "C4 + WikiText-2"}}
    cfg["methods"] = [{"id": "ldlq", "solver": "ldlq", "bits": [3], "group_size": [64],
                       "calibration": {"dataset": "c4wiki", "nsamples": 8, "seqlen": 64}}]
    cfg["tables"] = {}
    return cfg


def test_a_mixture_is_a_calibration_dataset_of_its_own_name():
    exp = Experiment(_cfg())
    spec = exp.spec("smollm2-135m", "ldlq", 3, 64)
    assert spec.short_name() == "smollm2-135m.c4wiki.n8.L64.ldlq.w3g64"
    assert exp.calibration_datasets("c4wiki") == ["c4", "wikitext2"]
    source = exp.calibration_source("c4wiki")
    assert source["parts"] == {"c4": 3, "wikitext2": 1} and source["chat_template"] is False
    assert source["datasets"]["c4"] == exp.dataset_cfg("c4")
    assert exp.calibration_source("c4") == exp.dataset_cfg("c4")  # a plain dataset: unchanged (no rerun)


@pytest.mark.parametrize("edit,message", [
    (lambda c: c["mixtures"]["c4wiki"]["parts"].update(nowhere=1), "mixtures.c4wiki.parts: unknown dataset"),
    (lambda c: c["mixtures"].update(c4={"parts": {"wikitext2": 1}}), "also a dataset key"),
    (lambda c: c["mixtures"]["c4wiki"]["parts"].update(c4=0), "c4"),
    (lambda c: c["mixtures"]["c4wiki"].update(parts={}), "parts"),
    (lambda c: c["mixtures"]["c4wiki"]["parts"].update(wikitext2=0.01), "parts no windows"),
    (lambda c: c["mixtures"].update({"c4.wiki": {"parts": {"c4": 1}}}), "no dots"),
])
def test_bad_mixtures_are_refused(edit, message):
    cfg = _cfg()
    edit(cfg)
    with pytest.raises(ConfigError, match=message):
        Experiment(cfg)
