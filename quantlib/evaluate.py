"""Perplexity with the protocol of GPTQ (Frantar et al. 2023), which NeUQI, GuidedQuant, QuantEase and UniQuanF
all use.

Each window of `seqlen` tokens is scored independently (no BOS added per window); the loss predicts tokens 2..L
of each window; ppl = exp(sum of NLL / (n_windows * (seqlen - 1))). The protocol is written into every result.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


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
            logits = model(batch, use_cache=False).logits.float()
            # Shifted labels with the last position ignored: slicing the logits instead would copy them
            # (batch x seqlen x vocab floats) before the loss reads them.
            labels = torch.full_like(batch, -100)
            labels[:, :-1] = batch[:, 1:]
            nll = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100,
                                  reduction="sum")
            total_nll += float(nll)
    mean_nll = total_nll / (n * (seqlen - 1))
    return {"ppl": math.exp(mean_nll), "mean_nll": mean_nll, "windows": n, "seqlen": seqlen,
            "tokens_scored": n * (seqlen - 1)}
