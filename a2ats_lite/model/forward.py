"""The forward pass, once for every architecture and backend (llama2.c's run.c
shape): embedding, the layer loop, the logits of the rows that need them.

Arithmetic is the backend's (B); the KV cache stores and selects; dense attention
is done here from what the cache hands out, retrieval attention by one call of the
cache per layer (kv.sparse_attend: the selection, then the backend's sparse
attention). Per-architecture differences are switches of ModelConfig (biases,
q/k norms, post norms, gates, soft-capping, sliding windows, RoPE pairing and bases).
"""
from __future__ import annotations

import numpy as np

from ..backend.base import Backend
from ..batch import Batch


def forward(w, layers, batch: Batch, kv, B: Backend):
    """Run one step's rows; returns the backend's logits (len(batch.logit_rows), n_vocab)."""
    c = w.config
    x = B.embed(w.token_embd, batch.tokens, c.embd_scale)         # (N, n_embd)
    for lw, L in zip(w.layers, layers):
        x = block(c, lw, L, x, batch, kv, B)
    if len(batch.logit_rows) == 0:
        return None
    h = B.rms_norm(B.take_rows(x, batch.logit_rows), w.output_norm, c.norm_eps)   # (m, n_embd)
    y = B.matmul(w.output, h)                                                   # (m, n_vocab)
    if c.final_logit_softcap:
        y = B.softcap(y, c.final_logit_softcap)
    return y


def block(c, lw, L, x, batch: Batch, kv, B: Backend):
    """One transformer layer on the stacked rows x (N, n_embd)."""
    N, H, G, d, eps = x.shape[0], c.n_head, c.n_head_kv, c.head_dim, c.norm_eps

    # attention
    h = B.rms_norm(x, lw.attn_norm, eps)                                  # (N, n_embd)
    q = B.matmul(lw.attn_q, h, lw.attn_q_bias).reshape(N, H, d)
    k = B.matmul(lw.attn_k, h, lw.attn_k_bias).reshape(N, G, d)
    v = B.matmul(lw.attn_v, h, lw.attn_v_bias).reshape(N, G, d)
    if lw.attn_q_norm is not None:                                        # per-head RMS norm, pre-RoPE
        q = B.rms_norm(q, lw.attn_q_norm, eps)
        k = B.rms_norm(k, lw.attn_k_norm, eps)
    att = attention(B, L, q, k, v, batch, kv)                            # (N, H, d)
    o = B.matmul(lw.attn_output, att.reshape(N, H * d))                  # (N, n_embd)
    if lw.post_attention_norm is not None:
        o = B.rms_norm(o, lw.post_attention_norm, eps)
    x = B.add(x, o)

    # feed-forward: down(act(gate(h)) * up(h))
    h = B.rms_norm(x, lw.ffn_norm, eps)
    f = B.matmul(lw.ffn_down, B.gated(B.matmul(lw.ffn_gate, h), B.matmul(lw.ffn_up, h), c.act))
    if lw.post_ffw_norm is not None:
        f = B.rms_norm(f, lw.post_ffw_norm, eps)
    return B.add(x, f)


def store_kv(B: Backend, L, kv, batch: Batch, k_pre, v):
    """Rotate the new keys and hand every sequence's rows to the cache; -> k (N, G, d)."""
    k = B.rope(k_pre, batch.positions, L.rope)                            # (N, G, d)
    if batch.decode_only:                                                 # one row each: one call
        kv.write_decode(L.index, batch.seq_ids, batch.positions, k_pre, k, v)
        return k
    for i, seq in enumerate(batch.seq_ids):
        r = batch.rows(i)
        kv.write(L.index, seq, batch.start(i), k_pre[r], k[r], v[r])
    return k


def attention(B: Backend, L, q_pre, k_pre, v, batch: Batch, kv):
    """Store the step's keys and values, then attend. q_pre (N, H, d), k_pre/v (N, G, d)."""
    store_kv(B, L, kv, batch, k_pre, v)
    return attend(B, L, q_pre, batch, kv)


def attend(B: Backend, L, q_pre, batch: Batch, kv):
    """Causal (+ window) attention of the step's rows over what the cache holds: every
    cached position, except decode rows of retrieval layers, which attend the policy's
    selection in one backend call for every sequence and KV head. -> (N, H, d)"""
    q = B.rope(q_pre, batch.positions, L.rope)                            # (N, H, d)
    if kv.observers:
        for i, seq in enumerate(batch.seq_ids):
            r = batch.rows(i)
            kv.notify_query(L.index, seq, batch.positions[r], q_pre[r])
    retrieves = kv.retrieves(L.index)
    # decode rows (one query per sequence) attend in one backend call for the whole step;
    # prefill chunks one call per sequence. On the CPU both are the same native kernel,
    # whose rows' numbers depend neither on the chunking nor on the rest of the step
    # (prefix reuse, batch invariance)
    every = batch.n_rows == batch.n_seqs            # one row each: no gather, no scatter
    if every:
        rows, seqs, positions = None, list(batch.seq_ids), batch.positions   # (a decode step)
    else:
        rowwise = [i for i in range(batch.n_seqs) if batch.n_tokens(i) == 1]
        out = B.empty(q.shape, np.float32)
        for i, seq in enumerate(batch.seq_ids):                           # prefill chunks
            if i in rowwise:
                continue
            r = batch.rows(i)
            hi = int(batch.positions[r.stop - 1]) + 1
            K, V, pos0 = kv.view(L.index, seq, hi)                        # (G, T, d) each
            out[r] = B.attention(q[r], K, V, batch.positions[r], pos0, L.window, L.scale)
        if not rowwise:
            return out
        rows = np.concatenate([np.arange(batch.offsets[i], batch.offsets[i + 1]) for i in rowwise])
        seqs = [batch.seq_ids[i] for i in rowwise for _ in range(batch.n_tokens(i))]
        positions = batch.positions[rows]
    qs = q if every else q[rows]                                          # (S, H, d) one query each
    S, H, d = qs.shape
    qg = qs.reshape(S, L.n_kv_heads, L.group, d)
    if retrieves:
        # the policy's selection, then one fused gather + attention call for every sequence
        T = positions + 1                                                 # positions each query sees
        o = kv.sparse_attend(L, seqs, q_pre.copy() if every else q_pre[rows],
                             B.scale(qs, L.scale), qg, T)
    else:
        # every visible cached row, read in place: one call for every query and KV head
        if every:                                                         # distinct sequences
            bufs = [kv.buffer(L.index, s) for s in seqs]
        else:
            by_seq = {s: kv.buffer(L.index, s) for s in set(seqs)}
            bufs = [by_seq[s] for s in seqs]
        o = B.decode_attention(qg, bufs, positions, L.window, L.scale)
    if every:
        return o.reshape(S, H, d)
    out[rows] = o.reshape(S, H, d)
    return out


def load_prefix(B: Backend, layers, kv, prefix_kv) -> int:
    """A new sequence in kv (any policy) holding a finished prefill, without the model.

    prefix_kv: per layer (k_pre (n, G, d), v (n, G, d)) as the forward pass handed them
    to the cache during a dense prefill (an observer's on_write). Prefill attention is
    exact under every policy, so a policy's state after a prefill depends only on these:
    replaying them equals running the prefill under that policy, at the cost of the
    writes (RoPE, store rows, codes, page bounds). Returns the sequence id."""
    seq = kv.add_sequence()
    n = len(prefix_kv[0][0])
    batch = Batch.make([seq], [np.zeros(n, np.int64)], [0])
    for L, (k, v) in zip(layers, prefix_kv):
        if len(k) != n or len(v) != n:
            raise ValueError(f"prefix layer {L.index} holds {len(k)} keys / {len(v)} values, "
                             f"layer 0 holds {n}")
        store_kv(B, L, kv, batch, np.asarray(k, np.float32), np.asarray(v, np.float32))
    kv.advance(seq, n)
    kv.compact(seq)   # sliding-window layers: back to their window's size
    return seq
