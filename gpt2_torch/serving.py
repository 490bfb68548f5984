"""The decoding serve.py runs (gpt2_common/batching.py's decode loop): rows decoded together one token at a time,
each with its own prompt and settings, rows joining a running batch and leaving it as they come and go. Built on the
sampler of gpt2_torch/sample.py: the same prefill and decoding step; `token_stream` is one row of it. The mirror of
gpt2_jax/serving.py.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from gpt2_common.tokenizer import EOT_TOKEN
from gpt2_torch.model import GPT, KVCache
from gpt2_torch.sample import (DecodeState, Settings, decode_step, for_cpu_decoding, grow_cache, load_model,
                               settings, start)

class RowBatch:
    """Rows decoded together one token at a time, each with its own prompt and settings (serve.py's batch):
    `step()` gives the next token of every live row, `add(prompts, how)` lets rows join at the next step, `free(rows)`
    drops rows whose completion is over (its stop, its length, its client gone) from the batch at once, so that
    they stop costing work (eager torch has no compiled shapes to keep, where gpt2_jax's RowBatch moves in
    power-of-two sizes). Rows are named by the order they came in (0, 1, ... from the first prompts). The model
    must be in eval mode."""

    def __init__(self, model: GPT, prompts: Sequence[Sequence[int]], how: Settings, use_cache: bool = True):
        self.model, self.use_cache, self.rows, self.state, self.how, self.named = model, use_cache, [], None, None, 0
        self.add(prompts, how)

    @torch.inference_mode()
    def add(self, prompts: Sequence[Sequence[int]], how: Settings) -> list[int]:
        """Rows that join at the next step (their prompts prefilled now): their names. `how`: their Settings, or
        one gpt2_common.batching.Sampling a prompt."""
        if not isinstance(how, Settings):
            how = from_sampling(how, self.how.stop_token, self.state.window.device)
        names = list(range(self.named, self.named + len(prompts)))
        self.named += len(prompts)
        new = start(self.model, prompts, self.use_cache and (self.state is None or self.state.cache is not None))
        old = self.state
        if old is None:
            self.state, self.how = new, how
        else:
            longest = max(old.longest, new.longest)
            cache = None
            if old.cache is not None and new.cache is not None:  # one cache, as wide as the wider
                span = max(old.cache.k.size(2), new.cache.k.size(2))
                cache = KVCache(*(torch.cat(pair, dim=1) for pair in zip(grow_cache(old.cache, span),
                                                                          grow_cache(new.cache, span))))
            self.state = DecodeState(torch.cat([old.window, new.window]), torch.cat([old.length, new.length]),
                                     longest, cache, torch.cat([old.done, new.done]), old.step)
            self.how = self.how.join(how)
        self.rows += names
        return names

    @torch.inference_mode()
    def step(self) -> list[int]:
        """The next token of each live row, in the order of self.rows."""
        self.state, token = decode_step(self.model, self.state, self.how, self.use_cache)
        return token.tolist()

    @torch.inference_mode()
    def free(self, rows) -> None:
        """Drops these rows from the batch."""
        gone = set(rows)
        keep = [i for i, row in enumerate(self.rows) if row not in gone]
        if len(keep) == len(self.rows) or not keep:
            self.rows = [self.rows[i] for i in keep]
            return
        index = torch.tensor(keep, device=self.state.window.device)
        state = self.state
        cache = None if state.cache is None else KVCache(state.cache.k[:, index], state.cache.v[:, index])
        self.state = DecodeState(state.window[index], state.length[index], state.longest, cache, state.done[index],
                                 state.step)
        self.how = self.how.take(keep)
        self.rows = [self.rows[i] for i in keep]


def from_sampling(sampling, stop_token: int | None, device: torch.device | str = "cpu") -> Settings:
    """The Settings of rows given one gpt2_common.batching.Sampling each (serve.py's requests)."""
    return settings(len(sampling), [s.temperature for s in sampling], [s.top_k for s in sampling],
                    [s.top_p for s in sampling], stop_token, [s.seed for s in sampling], [s.sample for s in sampling],
                    device)


def token_stream(model: GPT, prompt: Sequence[int], max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: int | None = 0, top_p: float | None = 1.0, seed: int = 0,
                 stop_token: int | None = EOT_TOKEN, use_cache: bool = True) -> Iterator[int]:
    """The continuation of one prompt, token by token as each is drawn (the stop token ends it and is not
    yielded): the same tokens as generate() for the same arguments. The model must be in eval mode."""
    device = next(model.parameters()).device
    rows = RowBatch(model, [prompt], settings(1, temperature, top_k, top_p, stop_token, seed, device=device),
                    use_cache)
    for _ in range(max_new_tokens):
        token = rows.step()[0]
        if token == stop_token:
            return
        yield token


def make_decoder(config, weights, device: str | None = None, precision: str = "fp32"):
    """`start(prompts, sampling) -> RowBatch` for gpt2_common.batching (what serve.py's decode loop runs), from a
    Config and canonical weights; `sampling` has one gpt2_common.batching.Sampling a prompt (temperature, top_k,
    top_p, seed, sample). Rows stop at <|endoftext|>."""
    model = load_model(config, weights, device, precision)
    model = for_cpu_decoding(model) if model.lm_head.weight.is_cpu else model
    device = model.lm_head.weight.device
    stop = EOT_TOKEN if config.model.vocab_size > EOT_TOKEN else None

    def start(prompts: Sequence[Sequence[int]], sampling) -> RowBatch:
        return RowBatch(model, prompts, from_sampling(sampling, stop, device))

    return start
