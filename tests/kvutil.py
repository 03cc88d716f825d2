"""Drive one layer of a KVCache the way the forward pass does (store, attend, advance),
for tests of the KV storage and selection policies without a model."""
import numpy as np

from a2ats_lite.batch import Batch
from a2ats_lite.model.forward import attend as _attend
from a2ats_lite.model.forward import store_kv


def _batch(seq, positions):
    positions = np.asarray(positions, dtype=np.int64)
    return Batch.make([seq], [np.zeros(len(positions), np.int64)], [int(positions[0])])


def append(kv, layer, seq, k, v, positions):
    """Store pre-RoPE keys k and values v (n, G, d) of positions for one layer."""
    L = kv.layers[layer]
    store_kv(kv.B, L, kv, _batch(seq, positions), np.asarray(k, np.float32), np.asarray(v, np.float32))


def attend(kv, layer, seq, q, positions):
    """Attention of pre-RoPE queries q (n, H, d) at positions, as the forward pass does."""
    return _attend(kv.B, kv.layers[layer], np.asarray(q, np.float32), _batch(seq, positions), kv)


class Selections:
    """Observer keeping each (layer, seq)'s last decode selection (per KV head)."""

    def __init__(self, kv):
        self.last = {}
        kv.observers.append(self)

    def on_select(self, layer, seq, position, q_rot, sel):
        self.last[(layer, seq)] = sel

    def __getitem__(self, key):
        return self.last[key]

    def __contains__(self, key):
        return key in self.last

    def __bool__(self):
        return bool(self.last)
