"""A KV cache for decoding that writes each new token in place instead of re-concatenating.

transformers' ``DynamicCache`` appends a decode step's keys and values with ``torch.cat``, which
copies the layer's whole cache every token: decoding C tokens copies O(C * (L + C)) rows per
layer, and on a CPU that is a fresh allocation (page faults) each time. `decode_cache` returns a
``DynamicCache`` whose full-attention layers keep a buffer with room for `reserve` more tokens and
hand out views of it; the cache behaves as a ``DynamicCache`` otherwise (batch repeat/select,
crop, sliding-window layers untouched). Measured on the 2-core AMD EPYC (AVX2) machine of README,
16 rows x 64 tokens of SmolLM2-135M in float32, with `skinny_linear` on: sampling 6.25 s -> 5.8 s.
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def _reserving_layer_class():
    from transformers.cache_utils import DynamicLayer

    class ReservingLayer(DynamicLayer):
        """A ``DynamicLayer`` whose keys/values are views of a buffer with spare room."""

        reserve = 0

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n, q = self.get_seq_length(), key_states.shape[-2]
            if n == 0:  # the pre-fill: kept as given (it is usually repeated per group next)
                self.keys, self.values, self._kv_buf = key_states, value_states, None
                return self.keys, self.values
            buf = getattr(self, "_kv_buf", None)
            # the keys may have been replaced (batch select / repeat, reorder): then start a new buffer
            if buf is None or buf[0].shape[-2] < n + q or buf[0].data_ptr() != self.keys.data_ptr() \
                    or buf[0].shape[:2] != key_states.shape[:2]:
                shape = (*key_states.shape[:2], n + q + self.reserve, key_states.shape[-1])
                buf = (key_states.new_empty(shape), value_states.new_empty(shape))
                if n:
                    buf[0][..., :n, :] = self.keys
                    buf[1][..., :n, :] = self.values
                self._kv_buf = buf
            buf[0][..., n:n + q, :] = key_states
            buf[1][..., n:n + q, :] = value_states
            self.keys, self.values = buf[0][..., :n + q, :], buf[1][..., :n + q, :]
            return self.keys, self.values

    return ReservingLayer


def decode_cache(config, reserve: int):
    """A ``DynamicCache`` for `config` whose plain (full-attention) layers reserve room for
    `reserve` tokens beyond what they hold when they first grow."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=config)
    cls = _reserving_layer_class()
    for i, layer in enumerate(getattr(cache, "layers", None) or []):
        if type(layer) is DynamicLayer and not layer.is_initialized:
            cache.layers[i] = cls()
    set_reserve(cache, reserve)
    return cache


def set_reserve(cache, reserve: int) -> None:
    """Room the reserving layers of `cache` leave for tokens still to come, when they next
    need a new buffer (after a batch select, say)."""
    cls = _reserving_layer_class()
    for layer in getattr(cache, "layers", None) or []:
        if isinstance(layer, cls):
            layer.reserve = reserve
