"""Generation: sampling, the KV caches, and the decode loop behind `VisionLanguageModel.generate`.

The decoder's forward serves every phase. Its attention calls `cache.update(layer, k, v)`, which
stores the new keys and values and returns the ones to attend to:

- `KVCache` attends to the slots written so far, [0, length): eager prefill and decoding.
- `StaticKVCache` keeps every shape fixed: its length is a device tensor, writes go through
  `index_copy_`, and attention reads the whole buffer with the unwritten slots masked. One
  compiled decode step (torch.compile; CUDA graphs on GPU) then serves every token.

`generate(compile=True)` on CPU with float32 weights runs `nanovlm.accel.fused_decode` (the
decode step as one C++ call) over a `KVCache` instead, where that extension can be built.
"""

from __future__ import annotations

import torch

from nanovlm.models.language_model import causal_mask, count_positions

# Compiled decoding pads its cache to a multiple of this, so nearby prompt lengths share one
# compiled step.
STATIC_MULTIPLE = 128


class KVCache:
    """Keys and values of every block, preallocated: [n_layers, B, n_kv_heads, max_len, head_dim].

    A forward calls `append` once (reserving slots [length, length + T) for its T tokens), then
    each block's `update` writes its keys and values there; nothing is concatenated.
    `key_mask` [B, max_len] (True = real token) exists only when the prompt had padding;
    `next_position` [B] is each row's next RoPE position (a device tensor: decoding never syncs
    with the host).
    """

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0
        self.key_mask: torch.Tensor | None = None
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=device)

    def append(self, attention_mask: torch.Tensor | None, T: int):
        """Reserve the next T slots -> positions [B, T] of the new tokens, and the mask (or None)
        and is_causal of their queries over the keys `update` returns."""
        B, past = self.k.shape[1], self.length
        if past + T > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {past} are used and {T} more were given.")
        if attention_mask is not None:
            if attention_mask.shape not in ((B, T), (B, past + T)):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected "
                                 f"[B, T] = [{B}, {T}] or [B, cached + T] = [{B}, {past + T}].")
            if self.key_mask is None:   # later slots stay True: generated tokens are real
                self.key_mask = torch.ones(B, self.max_len, dtype=torch.bool, device=self.k.device)
            self.key_mask[:, past + T - attention_mask.shape[1]:past + T] = attention_mask.bool()
        positions = count_positions(attention_mask, B, T, self.k.device, start=self.next_position)
        self.length, self.next_position = past + T, positions[:, -1] + 1
        if self.key_mask is None:
            return (positions, *causal_mask(None, T, past, self.k.device))
        if attention_mask is None and T == 1:   # a decode step: one real token sees every real key
            return positions, self.key_mask[:, None, None, :past + 1], False
        return (positions, *causal_mask(self.key_mask[:, :past + T], T, past, self.k.device))

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store `layer`'s keys and values [B, Hkv, T, hd] in the reserved slots -> every key and
        value cached, [B, Hkv, length, hd]."""
        start, end = self.length - k.shape[2], self.length
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class StaticKVCache(KVCache):
    """A `KVCache` whose shapes do not change from one forward to the next: `length` is a 0-dim
    device tensor, advanced in place, and every query reads all `max_len` slots, those not
    written yet masked out (they add exact zeros). There is no host-side capacity check;
    `generate` sizes the cache. An attention_mask, if any, must cover the new tokens ([B, T])."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.length = torch.zeros((), dtype=torch.long, device=self.k.device)

    def reset(self) -> None:
        """Empty it for another generation (old slots are masked, so no zeroing)."""
        self.length.zero_()
        self.next_position.zero_()
        self.key_mask = None

    def append(self, attention_mask: torch.Tensor | None, T: int):
        B, device = self.k.shape[1], self.k.device
        slots = self.length + torch.arange(T, device=device)                  # [T]
        if attention_mask is not None:
            if self.key_mask is None:
                self.key_mask = torch.ones(B, self.max_len, dtype=torch.bool, device=device)
            self.key_mask.index_copy_(1, slots, attention_mask[:, -T:].bool())
        positions = count_positions(attention_mask, B, T, device, start=self.next_position)
        self.length.add_(T)
        self.next_position.copy_(positions[:, -1] + 1)
        keys = torch.arange(self.max_len, device=device)
        mask = (keys[None, :] <= slots[:, None])[None]                         # [1, T, max_len]
        if self.key_mask is not None:   # real keys, and always itself (see causal_mask)
            mask = (mask & self.key_mask[:, None, :]) | (keys[None, :] == slots[:, None])   # [B, T, max_len]
        return positions, mask[:, None], False

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = k.shape[2]
        slots = self.length - T + torch.arange(T, device=k.device)
        self.k[layer].index_copy_(2, slots, k.to(self.k.dtype))
        self.v[layer].index_copy_(2, slots, v.to(self.v.dtype))
        return self.k[layer], self.v[layer]                                     # [B, Hkv, max_len, hd]


def sample_next_token(logits: torch.Tensor, greedy: bool = False, temperature: float = 1.0,
                      top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]: argmax, or a sample after temperature, top-k and top-p."""
    if greedy or temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass
        # (so the most likely token always stays).
        drop = probs.cumsum(dim=-1) - probs > top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1).squeeze(-1)


def decode(decoder: torch.nn.Module, token: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """One decode step: a token per row [B] through the cached decoder -> final hidden [B, D]."""
    return decoder(token[:, None], kv_cache=cache)[:, 0]


@torch.inference_mode()
def generate(model, input_ids: torch.Tensor, images=None, attention_mask: torch.Tensor | None = None,
             max_new_tokens: int = 32, greedy: bool = False, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, eos_token_id: int | None = None, eos_check_interval: int = 4,
             compile: bool = False) -> torch.Tensor:
    """`VisionLanguageModel.generate` (documented there): new token ids [B, max_new_tokens]."""
    B, T = input_ids.shape
    if attention_mask is not None and not bool(attention_mask[:, -1].all()):
        raise ValueError("generate needs left padding: attention_mask[:, -1] must be 1 for every row.")
    fill = eos_token_id if eos_token_id is not None else 0
    out = torch.full((B, max_new_tokens), fill, dtype=torch.long, device=input_ids.device)
    if max_new_tokens <= 0:
        return out
    attention_mask = model.check_inputs(input_ids, images, attention_mask)
    decoder = model.decoder
    fused = _fused_decoder(decoder) if compile else None
    if compile and fused is None:
        cache = _reused_static_cache(model, B, -(-(T + max_new_tokens) // STATIC_MULTIPLE) * STATIC_MULTIPLE)
    else:
        cache = decoder.new_kv_cache(B, T + max_new_tokens)
    hidden = decoder(model.embed(input_ids, images), attention_mask=attention_mask, kv_cache=cache)   # [B, T, D]
    logits = decoder.head(hidden[:, -1])                                       # [B, V]

    def eager_step(token: torch.Tensor, i: int) -> torch.Tensor:
        return decode(decoder, token, cache)
    step = _compiled_step(model, cache, fused, max_new_tokens) if compile else eager_step
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    for i in range(max_new_tokens):
        token = sample_next_token(logits, greedy, temperature, top_k, top_p)  # [B]
        if eos_token_id is not None:
            token = token.masked_fill(finished, eos_token_id)
            finished |= token == eos_token_id
        out[:, i] = token
        if i == max_new_tokens - 1:
            break
        if eos_token_id is not None and (i + 1) % eos_check_interval == 0 and bool(finished.all()):
            break
        logits = decoder.head(step(token, i))
    return out


def _fused_decoder(decoder):
    """The C++ decode step over `decoder`'s weights, or None (not float32 on CPU, or not buildable)."""
    from nanovlm.accel import fused_decode   # builds a C++ extension on first use

    return fused_decode.fused_decoder(decoder)


def _compiled_step(model, cache: KVCache, fused, n_steps: int):
    """The compiled decode loop's step, (token [B], step index) -> final hidden [B, D]: the fused
    C++ step (its RoPE tables for all `n_steps` computed here, once), or `decode` compiled."""
    decoder = model.decoder
    if fused is not None:
        positions = cache.next_position[:, None] + torch.arange(n_steps, device=cache.k.device)
        cos, sin = (t[:, :, 0].contiguous() for t in decoder.rotary_embd(positions, cache.k.dtype))   # [B, n, hd]

        def fused_step(token: torch.Tensor, i: int) -> torch.Tensor:
            hidden = fused.step(token, cache.k, cache.v, cache.key_mask, cache.length, cos, sin, i)
            cache.length += 1
            return hidden
        return fused_step

    cuda = cache.k.device.type == "cuda"
    if cuda:   # CUDA graphs replay on fixed addresses
        for tensor in (cache.k, cache.v, cache.key_mask, cache.length, cache.next_position):
            if tensor is not None:
                torch._dynamo.mark_static_address(tensor)
    if getattr(model, "_compiled_decode", None) is None:
        model._compiled_decode = torch.compile(decode, fullgraph=True, dynamic=False,
                                               mode="reduce-overhead" if cuda else None)
    if not cuda:
        return lambda token, i: model._compiled_decode(decoder, token, cache)

    def graph_step(token: torch.Tensor, i: int) -> torch.Tensor:
        torch.compiler.cudagraph_mark_step_begin()
        return model._compiled_decode(decoder, token, cache).clone()   # a replay overwrites its outputs
    return graph_step


def _reused_static_cache(model, batch_size: int, max_len: int) -> StaticKVCache:
    """One static cache per (batch size, length, dtype, device), kept on the model: the compiled
    step (and its CUDA graph) is built for its tensors. Emptied here."""
    weight = model.decoder.token_embedding.weight
    key = (batch_size, max_len, weight.dtype, weight.device)
    caches = model.__dict__.setdefault("_static_caches", {})
    if key not in caches:
        caches.clear()   # one shape at a time: the memory of a cache is the model's to hold
        caches[key] = model.decoder.new_kv_cache(batch_size, max_len, static=True)
    cache = caches[key]
    cache.reset()
    return cache
