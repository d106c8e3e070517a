"""Perplexity with the protocol of GPTQ (Frantar et al. 2023), which NeUQI, GuidedQuant, QuantEase and UniQuanF
all use.

Each window of `seqlen` tokens is scored independently (no BOS added per window); the loss predicts tokens 2..L
of each window; ppl = exp(sum of NLL / (n_windows * (seqlen - 1))). The protocol is written into every result.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from quantlib.access.adapters import adapter_for
from quantlib.access.blocks import BlockAccess
from quantlib.stats.capture import States, block_inputs
from quantlib.stats.streamed import final_states


def perplexity(model, windows: torch.Tensor, max_windows: int | None = None, batch_size: int = 4,
               device: str = "cpu", progress: bool = True) -> dict:
    if max_windows:
        windows = windows[:max_windows]
    n, seqlen = windows.shape
    total_nll = 0.0
    model.to(device)
    with torch.no_grad():
        for s in tqdm(range(0, n, batch_size), desc="perplexity", disable=not progress, mininterval=5):
            batch = windows[s:s + batch_size].to(device)
            total_nll += _window_nll(model, batch)
    return _result(total_nll, n, seqlen)


def _window_nll(model, batch: torch.Tensor) -> float:
    logits = model(batch, use_cache=False).logits.float()
    # Shifted labels with the last position ignored: slicing the logits instead would copy them
    # (batch x seqlen x vocab floats) before the loss reads them.
    labels = torch.full_like(batch, -100)
    labels[:, :-1] = batch[:, 1:]
    return float(F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100,
                                 reduction="sum"))


def _result(total_nll: float, n: int, seqlen: int) -> dict:
    mean_nll = total_nll / (n * (seqlen - 1))
    return {"ppl": math.exp(mean_nll), "mean_nll": mean_nll, "windows": n, "seqlen": seqlen,
            "tokens_scored": n * (seqlen - 1)}


def perplexity_by_block(model, windows: torch.Tensor, max_windows: int | None = None, batch_size: int = 4,
                        device: str = "cpu", progress: bool = True, access=None, streams: str = "memory") -> dict:
    """The same protocol with one decoder block in memory at a time: every window's hidden states go through block
    i before block i+1 is read (`access`: the runner's `BlockAccess`, lazy for a model on disk), kept in memory
    or on disk (`streams`); then the model's own forward, each block stood in for by one that hands back the final
    states of the batch (`quantlib.stats.streamed.final_states`), gives the logits (the family's final norm and
    head, whatever they are). Batches are the same as `perplexity`'s, so the figures agree to float rounding."""
    access = access or BlockAccess(model)
    if max_windows:
        windows = windows[:max_windows]
    n, seqlen = windows.shape
    blocks = adapter_for(model).block_list(model)
    folder = Path(tempfile.mkdtemp(prefix="quantlib-ppl-")) if streams == "disk" else None
    try:
        with torch.no_grad():
            with access.outer(device):
                states = States(block_inputs(model, blocks, windows, batch_size, device), streams, folder, device)
            for i in tqdm(range(len(blocks)), desc="perplexity", disable=not progress, mininterval=5):
                block = access.open(i, device)
                states = states.through(block)
                access.close(i, block)
            total_nll = 0.0
            with access.outer(device, head=True), final_states(blocks, states.tuple_output) as feed:
                for k, s in enumerate(range(0, n, batch_size)):
                    feed(states.hidden[k])
                    total_nll += _window_nll(model, windows[s:s + batch_size].to(device))
            states.hidden.drop()
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    return _result(total_nll, n, seqlen)
