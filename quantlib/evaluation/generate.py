"""Text generation from any checkpoint the workflow writes (a quantlib checkpoint, a packed one, or a full-precision
model): a quick look at what a quantized model says, next to its perplexity. Greedy decoding or sampling (temperature,
top-k, top-p) through transformers' `generate`, seeded, streaming each piece of text as it is decoded; an instruct
model's prompt can be wrapped in its chat template."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from quantlib.errors import ConfigError

SAMPLERS = ("greedy", "sample")


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: `greedy` (the most likely one) or `sample` (from the distribution sharpened by
    `temperature` and cut to the `top_k` most likely tokens (0: all) and to the smallest set of probability mass
    `top_p`)."""

    sampler: str = "greedy"
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"sampler '{self.sampler}' is not one of {', '.join(SAMPLERS)}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0: no cut), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p is a probability mass in (0, 1], got {self.top_p}")

    def generate_kwargs(self) -> dict:
        if self.sampler == "greedy":
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p}


def prompt_ids(tokenizer, prompt: str, chat: bool = False) -> torch.Tensor:
    """The prompt's token ids, (1, n); with `chat`, the prompt as a user turn of the tokenizer's chat template."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("chat formatting needs a tokenizer with a chat template, and this one has none; drop "
                              "the chat option or use an instruct model's tokenizer")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=False)
        return ids if isinstance(ids, torch.Tensor) else torch.tensor([ids])
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        raise ConfigError("the prompt is empty: give some text to continue")
    return ids


class _Stream:
    """transformers' streamer interface: decodes the new tokens as they come and hands each new piece of text to
    `on_text` (the text decoded so far minus what was handed before, so pieces never split a character)."""

    def __init__(self, tokenizer, on_text: Callable[[str], None], skip: int):
        self.tokenizer, self.on_text, self.skip = tokenizer, on_text, skip
        self.ids: list[int] = []
        self.sent = ""

    def put(self, value: torch.Tensor) -> None:
        values = value.reshape(-1).tolist()
        if self.skip:  # the prompt comes first, once
            self.skip = 0
            return
        self.ids += values
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if len(text) > len(self.sent) and not text.endswith("\ufffd"):
            self.on_text(text[len(self.sent):])
            self.sent = text

    def end(self) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if len(text) > len(self.sent):
            self.on_text(text[len(self.sent):])
            self.sent = text


def generate(model, tokenizer, prompt: str, max_new_tokens: int = 64, sampling: Sampling | None = None,
             seed: int = 0, chat: bool = False, on_text: Callable[[str], None] | None = None,
             device: str = "cpu") -> str:
    """Continue `prompt` with at most `max_new_tokens` tokens; returns the new text (special tokens removed).
    `on_text(piece)` is called with each piece of text as it is decoded (streaming). Seeded: the same seed, model
    and prompt give the same text on the same hardware."""
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    sampling = sampling or Sampling()
    ids = prompt_ids(tokenizer, prompt, chat).to(device)
    model.to(device).eval()
    streamer = _Stream(tokenizer, on_text, skip=1) if on_text is not None else None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # transformers samples from torch's global generator
    try:
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 pad_token_id=pad, streamer=streamer, **sampling.generate_kwargs())
    finally:
        torch.random.set_rng_state(generator_state)
    return tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
