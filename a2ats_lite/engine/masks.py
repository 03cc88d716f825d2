"""The constrained rows of one step: their grammar masks, computed while the forward pass
runs (llguidance fills them on its own threads with the GIL released), applied to each
row's logits before sampling. Unconstrained rows are never touched.

    masks = StepMasks.start([r for r in sampled if r.matcher], n_vocab)
    logits = model.step(...)                      # meanwhile the masks are filled
    row = masks.apply(r, logits_row)              # disallowed tokens at -inf (a copy)
"""
from __future__ import annotations

import numpy as np


class StepMasks:
    def __init__(self, rows: dict, bitmask, future):
        self._rows, self._bitmask, self._future = rows, bitmask, future

    @classmethod
    def start(cls, requests: list, n_vocab: int) -> "StepMasks":
        """Begin filling the masks of these requests' next tokens (each has a matcher)."""
        if not requests:
            return cls({}, None, None)
        from ..structured import allocate_bitmask, fill_masks
        bitmask = allocate_bitmask(len(requests), n_vocab)            # (R, ceil(V / 32))
        rows = {r.rid: i for i, r in enumerate(requests)}
        return cls(rows, bitmask, fill_masks([(r.matcher, i) for i, r in enumerate(requests)],
                                             bitmask))

    def wait(self) -> None:
        """Every mask written (call before the matchers advance, even on a failed step)."""
        if self._future is not None:
            self._future.result()
            self._future = None

    def apply(self, r, row: np.ndarray) -> np.ndarray:
        """r's logits row with the tokens its grammar forbids at -inf (row itself when r
        is unconstrained)."""
        i = self._rows.get(r.rid)
        if i is None:
            return row
        from ..structured import apply_bitmask
        self.wait()
        out = np.array(row, dtype=np.float32)
        apply_bitmask(out, self._bitmask[i])
        return out
