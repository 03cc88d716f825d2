"""`a2ats-lite eval`: every KV policy on the same generated inputs.

Tasks (all generated offline):
  recall    teacher-forced decode over the tail of a long natural text: share of the
            exact softmax mass on the selected tokens (attention recall), overlap of the
            selection with the oracle's, per full-attention layer; and perplexity of the tail
  agree     greedy continuation of the same text vs dense: tokens equal before the first divergence
  passkey   a 5-digit key hidden at a chosen depth of a filler haystack, asked for at the end
  niah_single, niah_multikey
            RULER-style needle in a haystack of natural text: "One of the special magic
            numbers for <key> is: <7 digits>." at a chosen depth (multikey: 3 more needles
            with other keys spread through the text as distractors), then asked for the
            number of <key>; a hit when the greedy answer contains it

One dense prefill serves every policy: prefill attention is exact under every
policy, so the prefix's pre-RoPE K/V are captured once and replayed into each
policy's cache (append only: no model products), and decoding starts from the
same logits. Policies differ only in decode-time selection.

KV cache types (run's cache_type_k / _v, llama.cpp's names): the policies' caches
(buffers and host stores alike) hold them, the replayed prefix quantized as it is
written; the shared prefill itself runs in f32. Bytes per step count the rows as
stored (q8_0: 34 bytes per 32 values).
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field

import numpy as np

from .kv.registry import needs_calibration

TASKS = ("recall", "passkey", "niah_single", "niah_multikey")
NEEDLE_KEYS = ("apple", "river", "candle", "marble", "falcon", "violet", "anchor", "meadow",
               "copper", "lantern", "harbor", "cedar", "pepper", "glacier", "saddle", "orchid")
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")


@dataclass
class Record:
    task: str
    policy: str
    ctx: int
    metrics: dict = field(default_factory=dict)


def top_k_kl(top_ids, top_logits, lse, logits) -> np.ndarray:
    """KL(reference || ours) per row, from a reference that kept only its top ids.

    top_ids, top_logits (m, k): the reference's k best ids and logits per row; lse (m,):
    its log-sum-exp over the whole vocabulary; logits (m, n_vocab): ours. The divergence
    is over the k listed ids plus one bucket for the remaining mass (llama.cpp reference
    files, ../shared/reference)."""
    lp = top_logits.astype(np.float64) - lse[:, None]
    mx = logits.max(1, keepdims=True).astype(np.float64)
    our_lse = mx[:, 0] + np.log(np.exp(logits - mx).sum(1))
    lq = np.take_along_axis(logits, top_ids, 1).astype(np.float64) - our_lse[:, None]
    rest_p = np.clip(1 - np.exp(lp).sum(1), 1e-12, None)
    rest_q = np.clip(1 - np.exp(lq).sum(1), 1e-12, None)
    return (np.exp(lp) * (lp - lq)).sum(1) + rest_p * (np.log(rest_p) - np.log(rest_q))


# -- selection metrics ----------------------------------------------------------------
def attention_recall(q, k_all, selected, scale) -> float:
    """Share of the exact softmax mass that lands on `selected` (float64).

    q (d,) or (h, d) post-RoPE queries of one KV head's group, k_all (T, d) that head's
    post-RoPE keys (every position the query sees), selected: positions. With several
    query heads, the mean over heads."""
    from .ops import softmax
    q = np.atleast_2d(np.asarray(q, dtype=np.float64))
    p = softmax(scale * (q @ np.asarray(k_all, dtype=np.float64).T), axis=1)   # (h, T)
    idx = np.unique(np.asarray(selected, dtype=np.int64))
    return float(p[:, idx].sum(axis=1).mean())


def selection_overlap(a, b) -> float:
    """|a & b| / |b|: the share of reference selection b (e.g. the oracle's) that a also has."""
    a, b = np.unique(np.asarray(a)), np.unique(np.asarray(b))
    return 1.0 if len(b) == 0 else float(len(np.intersect1d(a, b, assume_unique=True)) / len(b))


def oracle_select(q, k_all, sinks, window, K) -> np.ndarray:
    """The oracle's positions for one KV head: sinks + window + union over the query heads
    q (h, d) (post-RoPE) of the top-K exact scores against k_all (T, d) among the rest."""
    T = len(k_all)
    lo = min(sinks, T)
    hi = max(lo, T - window)
    if hi - lo <= K:
        return np.arange(T)
    sc = np.atleast_2d(q) @ np.asarray(k_all[lo:hi]).T
    top = np.argpartition(-sc, K - 1, axis=1)[:, :K]
    return np.concatenate([np.arange(lo), np.unique(top) + lo, np.arange(hi, T)])


def selection_bytes(pol, L, T: int, key_bytes: int) -> dict:
    """What one decode step of policy pol reads, for one KV head of full-attention layer L
    at context T, to CHOOSE its tokens (the attended K/V rows are counted apart):
    coded policies the candidates' codes (M * 2 bytes each) and the group's LUTs
    (group * M * C * 4; their codebook, C * d * 4, is reported apart as 'codebook'),
    exact scorers (oracle, wrope) every candidate key (key_bytes each, as stored), quest its
    pages' min and max."""
    lo, hi = pol.candidates(T)
    d = L.head_dim
    if hasattr(pol, "step_bytes"):                      # a2ats, vq
        return pol.step_bytes(L, T)
    if pol.name in ("oracle", "wrope"):
        return {"keys": (hi - lo) * key_bytes}
    if pol.name == "quest":
        n_pages = (hi - 1) // pol.page - lo // pol.page + 1 if hi > lo else 0
        return {"pages": 2 * n_pages * d * 4}
    return {}


class SelectionMetrics:
    """KV observer: at every decode selection, the attention recall of the selection and
    its overlap with the oracle's, per layer (through the cache's public keys()); and the
    bytes the step reads (selection_bytes + the attended K/V rows + re-rank keys)."""

    def __init__(self, kv):
        self.kv, self.log = kv, []           # [(layer, recall, overlap)]
        self.bytes: dict = {}                # what -> bytes summed over selections
        self._reranked = 0

    def on_select(self, layer, seq, position, q_rot, sel):
        kv, pol = self.kv, self.kv.policy
        L = kv.layers[layer]
        keys = kv.keys(layer, seq)[:position + 1]                  # (T, G, d) post-RoPE
        K = pol.k_budget(len(keys))
        recalls, overlaps = [], []
        st = kv.storage                      # bytes of a stored key row and value row
        krow, vrow = st.type_k.row_bytes(L.head_dim), st.type_v.row_bytes(L.head_dim)
        for g, chosen in enumerate(sel):
            heads = q_rot[g * L.group:(g + 1) * L.group]          # already scaled
            recalls.append(attention_recall(heads, keys[:, g], chosen, 1.0))
            overlaps.append(selection_overlap(chosen, oracle_select(heads, keys[:, g], pol.sinks,
                                                                    pol.window, K)))
            self._add("kv_rows", len(chosen) * (krow + vrow))
            for what, n in selection_bytes(pol, L, len(keys), krow).items():
                self._add(what, n)
        stats = getattr(pol, "stats", None)
        if stats is not None:          # exact re-rank: the candidate keys it gathered
            self._add("rerank_keys", (stats["reranked_rows"] - self._reranked) * krow)
            self._reranked = stats["reranked_rows"]
        self.log.append((layer, float(np.mean(recalls)), float(np.mean(overlaps))))

    def _add(self, what, n):
        self.bytes[what] = self.bytes.get(what, 0) + int(n)

    def bytes_per_step(self) -> dict:
        """Mean bytes per decode step (all full-attention layers and KV heads): 'total'
        (codes + LUTs + attended K/V rows + re-rank keys + exact-score keys + pages) and
        each part; 'codebook' (the LUTs' source, read from device memory) is not in total."""
        n_layers = len({l for l, _, _ in self.log})
        steps = len(self.log) / n_layers if n_layers else 0
        if not steps:
            return {}
        out = {f"bytes_{k}": v / steps for k, v in self.bytes.items()}
        out["bytes_per_step"] = sum(v for k, v in self.bytes.items() if k != "codebook") / steps
        return out


def dense_bytes_per_step(layers, Ts, cache_types=("f32", "f32")) -> float:
    """Dense reads every K/V row of the full-attention layers (rows of the cache types
    (K, V)): mean over the steps' Ts."""
    from .kv.storage import KVType
    kt, vt = (KVType(t) for t in cache_types)
    full = [L for L in layers if L.window is None]
    per_t = sum(L.n_kv_heads * (kt.row_bytes(L.head_dim) + vt.row_bytes(L.head_dim)) for L in full)
    return float(np.mean(Ts)) * per_t


def _make_kv(rt, policy, budget, variants=None, rerank=None, cache_types=("f32", "f32")):
    """variants: label -> (policy name, extra parameters) (e.g. a sidecar's calib, rerank);
    cache_types: the (K, V) KV cache types."""
    from .kv import make_kv_cache
    name, extra = (variants or {}).get(policy, (policy, {}))
    params = {} if name == "dense" else {"budget": budget}
    if needs_calibration(name):
        params.update(rt.kv_params_for(name, dict(extra)))
        if rerank is not None and "rerank" not in extra:
            params["rerank"] = rerank
    elif name != "dense":
        params.update(extra)
    return make_kv_cache(name, rt.model.attn_layers, rt.n_ctx, backend=rt.model.B,
                         cache_type=cache_types[0], cache_type_v=cache_types[1], **params)


@dataclass
class Prefix:
    """A finished dense prefill: per layer the pre-RoPE K and V, and the last logits."""
    kv: list            # layer -> (k (n, G, d), v (n, G, d))
    logits: np.ndarray  # (n_vocab,)
    n: int


class _Capture:
    """KV observer keeping the pre-RoPE K/V a prefill writes."""

    def __init__(self):
        self.layers: dict = {}

    def on_write(self, layer, seq, positions, k_pre, v):
        self.layers.setdefault(layer, []).append((np.array(k_pre), np.array(v)))


def prefill_once(rt, tokens) -> Prefix:
    from .kv import make_kv_cache
    kv = make_kv_cache("dense", rt.model.attn_layers, rt.n_ctx, backend=rt.model.B)
    cap = _Capture()
    kv.observers.append(cap)
    seq = kv.add_sequence()
    try:
        logits = rt.model.forward([np.asarray(tokens)], [seq], kv)[0]
    finally:
        kv.close()
    layers = [(np.concatenate([k for k, _ in cap.layers[i]]), np.concatenate([v for _, v in cap.layers[i]]))
              for i in range(len(rt.model.attn_layers))]
    return Prefix(layers, logits, len(tokens))


def start_from(rt, kv, prefix: Prefix) -> int:
    """A new sequence in kv holding the prefix, without running the model."""
    return rt.model.load_prefix(kv, prefix.kv)


def recall_and_agreement(rt, policy, prefix: Prefix, tail, budget, variants=None,
                         rerank=None, cache_types=("f32", "f32")) -> tuple[dict, list[int]]:
    """Teacher-forced decode of `tail` after the shared prefix, then len(tail) greedy tokens."""
    kv = _make_kv(rt, policy, budget, variants, rerank, cache_types)
    metrics = SelectionMetrics(kv)
    kv.observers.append(metrics)
    log = metrics.log
    steps = len(tail)
    try:
        seq = start_from(rt, kv, prefix)
        logits = prefix.logits
        nll = []
        for t in tail:
            nll.append(-float(logits[t] - logits.max() - math.log(np.exp(logits - logits.max()).sum())))
            logits = rt.model.forward([np.array([t])], [seq], kv)[0]
        greedy = []
        for _ in range(steps):
            greedy.append(int(np.argmax(logits)))
            logits = rt.model.forward([np.array([greedy[-1]])], [seq], kv)[0]
    finally:
        kv.close()
    m = {"ppl": math.exp(float(np.mean(nll)))}
    if log:
        arr = np.array(log)
        m["attention_recall"] = float(arr[:, 1].mean())
        m["oracle_overlap"] = float(arr[:, 2].mean())
        m["recall_per_layer"] = {int(l): float(arr[arr[:, 0] == l, 1].mean()) for l in np.unique(arr[:, 0])}
        m.update(metrics.bytes_per_step())
    elif policy == "dense":
        m["attention_recall"] = m["oracle_overlap"] = 1.0
        m["bytes_per_step"] = m["bytes_kv_rows"] = dense_bytes_per_step(
            rt.model.attn_layers, prefix.n + 1 + np.arange(2 * steps), cache_types)
    return m, greedy


def passkey_prompt(tok, ctx, depth, rng) -> tuple[list[int], str]:
    key = f"{rng.randrange(10000, 99999)}"
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    question = " What is the pass key? The pass key is"
    fill_ids = tok.encode(FILLER, add_bos=False)
    n_fill = max(0, ctx - len(tok.encode(needle + question, add_bos=False)) - 8)
    hay = (fill_ids * (n_fill // len(fill_ids) + 1))[:n_fill]
    cut = int(len(hay) * depth)
    ids = ([tok.bos_id] if tok.bos_id is not None else []) + hay[:cut] + \
        tok.encode(needle, add_bos=False) + hay[cut:] + tok.encode(question, add_bos=False)
    return ids, key


def needle_prompt(tok, ctx, text_ids, depth, rng, n_needles=1) -> tuple[list[int], str]:
    """RULER-style: needles "One of the special magic numbers for KEY is: VALUE." in a
    haystack of natural text (text_ids, a slice chosen by rng), the asked needle at
    `depth`, the n_needles - 1 distractors (other keys) at random depths.
    Returns (ids of a ctx-token prompt, the asked value)."""
    keys = rng.sample(NEEDLE_KEYS, n_needles)
    values = [f"{rng.randrange(10**6, 10**7)}" for _ in keys]
    needles = [tok.encode(f" One of the special magic numbers for {k} is: {v}. ", add_bos=False)
               for k, v in zip(keys, values)]
    head = tok.encode("Some special magic numbers are hidden within the following text. Make "
                      "sure to memorize them. I will quiz you about the numbers afterwards.\n",
                      add_bos=False)
    question = tok.encode(f"\nWhat is the special magic number for {keys[0]} mentioned in the "
                          f"provided text? The special magic number for {keys[0]} mentioned in "
                          f"the provided text is", add_bos=False)
    bos = [tok.bos_id] if tok.bos_id is not None else []
    n_hay = ctx - len(bos) - len(head) - len(question) - sum(map(len, needles))
    if n_hay < 16:
        raise ValueError(f"context {ctx} is too short for {n_needles} needles")
    start = rng.randrange(max(1, len(text_ids) - n_hay))
    hay = (text_ids * (n_hay // max(1, len(text_ids)) + 2))[start:start + n_hay]
    cuts = [int(n_hay * depth)] + [rng.randrange(n_hay) for _ in needles[1:]]
    for cut, needle in sorted(zip(cuts, needles), key=lambda c: -c[0]):   # back to front
        hay = hay[:cut] + needle + hay[cut:]
    return bos + head + hay + question, values[0]


def answer_accuracy(rt, policy, prompts, budget, n_tokens=10, variants=None, rerank=None,
                    cache_types=("f32", "f32")) -> float:
    """prompts: [(Prefix, answer)] prefilled once; share whose greedy continuation under
    the policy contains the answer."""
    hits = []
    for prefix, key in prompts:
        kv = _make_kv(rt, policy, budget, variants, rerank, cache_types)
        try:
            seq = start_from(rt, kv, prefix)
            logits = prefix.logits
            out = []
            for _ in range(n_tokens):
                out.append(int(np.argmax(logits)))
                logits = rt.model.forward([np.array([out[-1]])], [seq], kv)[0]
        finally:
            kv.close()
        hits.append(key in rt.tokenizer.decode(out))
    return float(np.mean(hits))


def run(rt, policies, contexts, budget, samples, steps=16, depths=(0.1, 0.5, 0.9), seed=0,
        progress=None, tasks=TASKS, variants=None, rerank=None, cache_type_k="f32",
        cache_type_v=None) -> list[Record]:
    """tasks: a subset of TASKS ('recall' also gives 'agree'). variants: label -> (policy
    name, extra parameters): labels in `policies` that name a variant run that policy with
    those parameters (several sidecars or re-rank factors on the same prompts). rerank:
    the exact re-rank factor of the coded policies (a2ats, vq) without their own (None:
    the sidecar's recommendation, else off). cache_type_k / _v: the policies' KV cache
    types (f32, f16, q8_0, q4_0; _v None: K's)."""
    cache_types = (cache_type_k, cache_type_k if cache_type_v is None else cache_type_v)
    from .corpus import natural_text
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown eval task {sorted(unknown)[0]!r}; choose from {', '.join(TASKS)}")
    text_ids = rt.tokenizer.encode(natural_text("eval"), add_bos=False)
    records = []
    jobs = [(c, i) for c in contexts for i in range(samples)]
    for ctx, i in progress(jobs, desc="eval") if progress else jobs:
        rng = random.Random(seed + i)
        prefix = None
        if "recall" in tasks:
            start = (i * 7919) % max(1, len(text_ids) - ctx)
            tokens = [rt.tokenizer.bos_id] + text_ids[start:start + ctx - 1]
            prefix = prefill_once(rt, tokens[:-steps])
        prompts = {}        # task -> [(Prefix, answer)], each prompt prefilled once for all policies
        if "passkey" in tasks:
            prompts["passkey"] = [passkey_prompt(rt.tokenizer, ctx, d, rng) for d in depths]
        for task, n in (("niah_single", 1), ("niah_multikey", 4)):
            if task in tasks:
                prompts[task] = [needle_prompt(rt.tokenizer, ctx, text_ids, d, rng, n) for d in depths]
        prompts = {t: [(prefill_once(rt, ids), ans) for ids, ans in ps] for t, ps in prompts.items()}
        dense_greedy = None  # agreement is measured against dense, which runs first
        for policy in sorted(policies, key=lambda p: p != "dense"):
            if prefix is not None:
                m, greedy = recall_and_agreement(rt, policy, prefix, tokens[-steps:], budget,
                                                 variants, rerank, cache_types)
                if policy == "dense":
                    dense_greedy = greedy
                records.append(Record("recall", policy, ctx, m))
                if dense_greedy is not None:
                    same = next((j for j, (a, b) in enumerate(zip(greedy, dense_greedy)) if a != b), steps)
                    records.append(Record("agree", policy, ctx, {"tokens_before_divergence": same}))
            for task, ps in prompts.items():
                acc = answer_accuracy(rt, policy, ps, budget, n_tokens=8 if task == "passkey" else 12,
                                      variants=variants, rerank=rerank, cache_types=cache_types)
                records.append(Record(task, policy, ctx, {f"{task}_accuracy": acc}))
    return _average(records)


def _average(records: list[Record]) -> list[Record]:
    """One record per task x policy x context: the mean of each scalar metric over samples."""
    groups: dict = {}
    for r in records:
        groups.setdefault((r.task, r.policy, r.ctx), []).append(r.metrics)
    out = []
    for (task, policy, ctx), ms in groups.items():
        keys = [k for k, v in ms[0].items() if isinstance(v, (int, float))]
        agg = {k: float(np.mean([m[k] for m in ms])) for k in keys}
        agg["samples"] = len(ms)
        out.append(Record(task, policy, ctx, agg))
    return out


# (task, metric, table header, plotted): the one list the table and the plots follow
METRICS = (("recall", "attention_recall", "recall", True),
           ("recall", "oracle_overlap", "oracle overlap", True),
           ("recall", "ppl", "ppl", False),
           ("recall", "bytes_per_step", "KB/step", False),
           ("agree", "tokens_before_divergence", "agree (tokens)", False),
           ("passkey", "passkey_accuracy", "passkey", True),
           ("niah_single", "niah_single_accuracy", "niah single", True),
           ("niah_multikey", "niah_multikey_accuracy", "niah multikey", True))


def table(records: list[Record]) -> str:
    rows: dict = {}
    for r in records:
        rows.setdefault((r.ctx, r.policy), {}).update(r.metrics)
    cols = [(m, head) for _, m, head, _ in METRICS if any(m in row for row in rows.values())]
    pw = max([8] + [len(p) for _, p in rows])
    lines = [f"{'ctx':>6} {'policy':<{pw}}" + "".join(f"{head:>16}" for _, head in cols)]
    for (ctx, policy), row in sorted(rows.items()):
        cells = "".join(f"{row[m] / 1024:>16.1f}" if m == "bytes_per_step" and m in row else
                        f"{row[m]:>16.4f}" if m in row else f"{'-':>16}" for m, _ in cols)
        lines.append(f"{ctx:>6} {policy:<{pw}}{cells}")
    return "\n".join(lines)


def write_json(records, path, meta) -> None:
    with open(path, "w") as f:
        json.dump({"meta": meta, "records": [r.__dict__ for r in records]}, f, indent=2)


def plot(records, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    metrics = [(t, m) for t, m, _, plotted in METRICS
               if plotted and any(r.task == t for r in records)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    for ax, (task, metric) in zip(axes[0], metrics):
        for policy in sorted({r.policy for r in records}):
            pts = sorted((r.ctx, r.metrics[metric]) for r in records
                         if r.task == task and r.policy == policy and metric in r.metrics)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=policy)
        ax.set_xlabel("context (tokens)")
        ax.set_title(metric.replace("_", " "))
        ax.set_xscale("log", base=2)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
