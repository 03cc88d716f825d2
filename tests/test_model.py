"""The forward pass: tiny random models against a float64 reference (every
architecture switch), decode == prefill, batched == separate, and the default
model against llama.cpp's logits (shared/reference)."""
import json
import math

import numpy as np
import pytest

from a2ats_lite.config import ModelConfig
from a2ats_lite.evaluate import top_k_kl
from a2ats_lite.errors import ContextOverflowError, ModelError, TokenizerError
from a2ats_lite.kv import make_kv_cache
from a2ats_lite.backend.cpu import QMatrix
from a2ats_lite.model import Model

# --------------------------------------------------------------------------- tiny models


def tiny_config(arch: str, **kw) -> ModelConfig:
    gemma = arch == "gemma3"
    base = dict(
        arch=arch, n_vocab=97, n_embd=32, n_layer=3, n_head=4, n_head_kv=2, head_dim=8, n_ff=48,
        n_ctx_train=256, norm_eps=1e-6, rope_base=1e6 if gemma else 10000.0, rope_base_swa=10000.0,
        rope_pairing="adjacent" if arch == "llama" else "half", rope_n_rot=8, rope_freq_scale=1.0,
        rope_scaling_type="none", sliding_window=5 if gemma else None, swa_pattern=3 if gemma else None,
        attn_scale=8 ** -0.5, embd_scale=math.sqrt(32) if gemma else 1.0,
        act="gelu_tanh" if gemma else "silu", qk_norm=arch in ("qwen3", "gemma3"),
        attn_bias=arch == "qwen2", post_norms=gemma, tied_embeddings=arch != "llama",
        final_logit_softcap=None)
    base.update(kw)
    return ModelConfig(**base)


ARCH_CONFIGS = {
    "llama": dict(rope_freq_scale=0.5, final_logit_softcap=5.0),    # untied output, softcap
    "qwen2": dict(rope_n_rot=4),                                      # biases, partial rotary
    "qwen3": dict(n_head_kv=1),                                       # q/k norm, GQA group 4
    "gemma3": dict(),                                                 # window 5, layers 0,1 slide
}


def random_arrays(c: ModelConfig, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    qd, kvd = c.n_head * c.head_dim, c.n_head_kv * c.head_dim

    def mat(n_out, n_in):
        return (rng.standard_normal((n_out, n_in)) / math.sqrt(n_in)).astype(np.float32)

    def norm(n):
        return (1.0 + 0.3 * rng.standard_normal(n)).astype(np.float32)

    a = {"token_embd.weight": mat(c.n_vocab, c.n_embd), "output_norm.weight": norm(c.n_embd)}
    if not c.tied_embeddings:
        a["output.weight"] = mat(c.n_vocab, c.n_embd) * 4
    for i in range(c.n_layer):
        p = f"blk.{i}."
        a.update({p + "attn_norm.weight": norm(c.n_embd), p + "attn_q.weight": mat(qd, c.n_embd),
                  p + "attn_k.weight": mat(kvd, c.n_embd), p + "attn_v.weight": mat(kvd, c.n_embd),
                  p + "attn_output.weight": mat(c.n_embd, qd), p + "ffn_norm.weight": norm(c.n_embd),
                  p + "ffn_gate.weight": mat(c.n_ff, c.n_embd), p + "ffn_up.weight": mat(c.n_ff, c.n_embd),
                  p + "ffn_down.weight": mat(c.n_embd, c.n_ff)})
        if c.attn_bias:
            for t, n in (("q", qd), ("k", kvd), ("v", kvd)):
                a[p + f"attn_{t}.bias"] = (0.5 * rng.standard_normal(n)).astype(np.float32)
        if c.qk_norm:
            a[p + "attn_q_norm.weight"] = norm(c.head_dim)
            a[p + "attn_k_norm.weight"] = norm(c.head_dim)
        if c.post_norms:
            a[p + "post_attention_norm.weight"] = norm(c.n_embd)
            a[p + "post_ffw_norm.weight"] = norm(c.n_embd)
    return a


def reference_forward64(c: ModelConfig, arrays: dict, tokens) -> np.ndarray:
    """Logits (n, n_vocab) of a fresh sequence, float64, written straight from the
    architecture description (independent of model.py, ops.py, rope.py and kv/)."""
    A = {k: np.asarray(v, dtype=np.float64) for k, v in arrays.items()}
    tokens = np.asarray(tokens)
    n, H, G, d = len(tokens), c.n_head, c.n_head_kv, c.head_dim
    pos = np.arange(n, dtype=np.float64)

    def rms(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + c.norm_eps) * w

    def rope(x, base, scale):                  # x (n, heads, d); complex rotation of pairs
        r = c.rope_n_rot
        ang = (pos * scale)[:, None] * base ** (-np.arange(0, r, 2) / r)
        rot = np.exp(1j * ang)[:, None, :]
        out = x.copy()
        if c.rope_pairing == "half":
            z = (x[..., : r // 2] + 1j * x[..., r // 2: r]) * rot
            out[..., : r // 2], out[..., r // 2: r] = z.real, z.imag
        else:
            z = (x[..., 0:r:2] + 1j * x[..., 1:r:2]) * rot
            out[..., 0:r:2], out[..., 1:r:2] = z.real, z.imag
        return out

    def act(x):
        if c.act == "silu":
            return x / (1 + np.exp(-x))
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

    x = A["token_embd.weight"][tokens] * np.float32(c.embd_scale)
    for i in range(c.n_layer):
        p = f"blk.{i}."
        swa = bool(c.sliding_window and c.swa_pattern and (i + 1) % c.swa_pattern != 0)
        h = rms(x, A[p + "attn_norm.weight"])
        q, k, v = (h @ A[p + f"attn_{t}.weight"].T for t in "qkv")
        if c.attn_bias:
            q, k, v = q + A[p + "attn_q.bias"], k + A[p + "attn_k.bias"], v + A[p + "attn_v.bias"]
        q, k, v = q.reshape(n, H, d), k.reshape(n, G, d), v.reshape(n, G, d)
        if c.qk_norm:
            q, k = rms(q, A[p + "attn_q_norm.weight"]), rms(k, A[p + "attn_k_norm.weight"])
        base, scale = (c.rope_base_swa, 1.0) if swa else (c.rope_base, c.rope_freq_scale)
        q, k = rope(q, base, scale), rope(k, base, scale)
        rel = pos[:, None] - pos[None, :]
        visible = (rel >= 0) & ((rel < c.sliding_window) if swa else True)
        att = np.zeros((n, H, d))
        for hh in range(H):
            g = hh // (H // G)
            s = np.where(visible, q[:, hh] @ k[:, g].T * c.attn_scale, -np.inf)
            pr = np.exp(s - s.max(1, keepdims=True))
            att[:, hh] = pr / pr.sum(1, keepdims=True) @ v[:, g]
        o = att.reshape(n, H * d) @ A[p + "attn_output.weight"].T
        if c.post_norms:
            o = rms(o, A[p + "post_attention_norm.weight"])
        x = x + o
        h = rms(x, A[p + "ffn_norm.weight"])
        f = (act(h @ A[p + "ffn_gate.weight"].T) * (h @ A[p + "ffn_up.weight"].T)) @ A[p + "ffn_down.weight"].T
        if c.post_norms:
            f = rms(f, A[p + "post_ffw_norm.weight"])
        x = x + f
    out = A.get("output.weight", A["token_embd.weight"])
    logits = rms(x, A["output_norm.weight"]) @ out.T
    if c.final_logit_softcap:
        logits = c.final_logit_softcap * np.tanh(logits / c.final_logit_softcap)
    return logits


def _fresh(model, n_ctx=256):
    kv = make_kv_cache("dense", model.attn_layers, n_ctx)
    return kv, kv.add_sequence()


@pytest.mark.parametrize("arch", sorted(ARCH_CONFIGS))
def test_tiny_model_matches_float64_reference(arch):
    c = tiny_config(arch, **ARCH_CONFIGS[arch])
    arrays = random_arrays(c, seed=len(arch))
    tokens = np.random.default_rng(1).integers(0, c.n_vocab, 23)
    model = Model.from_arrays(c, arrays, n_batch=7)    # 4 chunks: queries see earlier chunks
    kv, s = _fresh(model)
    ours = model.forward([tokens], [s], kv, logits="all")[0]
    ref = reference_forward64(c, arrays, tokens)
    assert ours.shape == (23, c.n_vocab) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=2e-4 * np.abs(ref).max())
    assert kv.length(s) == 23


def test_sliding_window_hides_far_tokens():
    # every layer slides: position t depends only on tokens >= t - n_layer * (window - 1)
    c = tiny_config("gemma3", swa_pattern=100, sliding_window=4)
    model = Model.from_arrays(c, random_arrays(c, seed=5), n_batch=6)
    rng = np.random.default_rng(2)
    a = rng.integers(0, c.n_vocab, 30)
    b = a.copy()
    b[:3] = (b[:3] + 1) % c.n_vocab                    # change the first three tokens
    kva, sa = _fresh(model)
    kvb, sb = _fresh(model)
    la = model.forward([a], [sa], kva, logits="all")[0]
    lb = model.forward([b], [sb], kvb, logits="all")[0]
    reach = c.n_layer * (c.sliding_window - 1)         # 9: first position that cannot see token 2
    assert np.abs(la[:3] - lb[:3]).max() > 1e-3        # the change is visible nearby
    np.testing.assert_allclose(la[2 + reach + 1:], lb[2 + reach + 1:], rtol=0, atol=1e-6)
    assert np.abs(la[2 + reach] - lb[2 + reach]).max() > 1e-6


@pytest.mark.parametrize("arch", ["gemma3", "llama"])
def test_tiny_decode_and_batched_decode_match_prefill(arch):
    c = tiny_config(arch, **ARCH_CONFIGS[arch])
    arrays = random_arrays(c, seed=9)
    model = Model.from_arrays(c, arrays, n_batch=5)
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, c.n_vocab, n) for n in (3, 11, 7)]
    steps = 6
    conts = [rng.integers(0, c.n_vocab, steps) for _ in prompts]
    # all three prompts in one forward call, then decode steps carrying all three at once
    kv = make_kv_cache("dense", model.attn_layers, 64)
    seqs = [kv.add_sequence() for _ in prompts]
    first = model.forward(prompts, seqs, kv, logits="last")
    got = [[f] for f in first]
    for t in range(steps):
        out = model.forward([x[t:t + 1] for x in conts], seqs, kv, logits="last")
        for i, o in enumerate(out):
            got[i].append(o)
    for i, (p, x) in enumerate(zip(prompts, conts)):
        full = np.concatenate([p, x])
        ref = reference_forward64(c, arrays, full)[len(p) - 1:]
        np.testing.assert_allclose(np.stack(got[i]), ref, rtol=1e-4, atol=2e-4 * np.abs(ref).max())
        assert kv.length(seqs[i]) == len(full)


def test_forward_rejects_bad_input():
    c = tiny_config("qwen3")
    model = Model.from_arrays(c, random_arrays(c, seed=1))
    kv = make_kv_cache("dense", model.attn_layers, 8)
    s = kv.add_sequence()
    with pytest.raises(TokenizerError):
        model.forward([np.array([1, c.n_vocab])], [s], kv)
    with pytest.raises(TokenizerError):
        model.forward([np.array([-1])], [s], kv)
    with pytest.raises(ContextOverflowError):
        model.forward([np.arange(9)], [s], kv)
    with pytest.raises(ValueError):
        model.forward([np.array([], dtype=np.int64)], [s], kv)
    assert kv.length(s) == 0                               # nothing half-written
    arrays = random_arrays(c, seed=1)
    del arrays["blk.1.ffn_up.weight"]
    with pytest.raises(ModelError, match="blk.1.ffn_up.weight"):
        Model.from_arrays(c, arrays)
    arrays = random_arrays(c, seed=1)
    arrays["blk.0.attn_k.weight"] = arrays["blk.0.attn_k.weight"][:, :-1]
    with pytest.raises(ModelError, match="shape"):
        Model.from_arrays(c, arrays)


def test_logit_rows_and_rollback_after_error():
    c = tiny_config("gemma3")
    model = Model.from_arrays(c, random_arrays(c, seed=3), n_batch=4)
    toks = np.random.default_rng(6).integers(0, c.n_vocab, 10)
    kv, s = _fresh(model)
    full = model.forward([toks], [s], kv, logits="all")[0]
    kv, s = _fresh(model)
    picked = model.forward([toks], [s], kv, logits=[[7, 2, 9, 2]])[0]   # caller's order kept
    np.testing.assert_allclose(picked, full[[7, 2, 9, 2]], rtol=1e-5, atol=1e-5)

    # a policy failing half-way through a chunk leaves the cache as it was before the call
    kv, s = _fresh(model)
    model.forward([toks[:6]], [s], kv, logits="none")
    real_write, calls = kv.write, []

    def failing(layer, *a):
        calls.append(layer)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_write(layer, *a)

    kv.write = failing          # the second layer's write fails: the first layer's is undone
    with pytest.raises(KeyboardInterrupt):
        model.forward([toks[6:]], [s], kv)
    kv.write = real_write
    assert kv.length(s) == 6
    rest = model.forward([toks[6:]], [s], kv, logits="all")[0]
    np.testing.assert_allclose(rest, full[6:], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not in this KV cache"):
        model.forward([toks], [s + 7], kv)


def test_qmatrix_quantized_paths_agree():
    # Q8_0 weights: the int8 product (repacked blocks, int8 activations) at every row count,
    # the float32 product of the kept f32 copy and the row lookup all agree with the f32
    # weights (int8 activations: ~1e-2 of |x||w|)
    from gguf import quants
    from gguf.constants import GGMLQuantizationType
    rng = np.random.default_rng(8)
    w = rng.standard_normal((80, 64)).astype(np.float32)
    raw = quants.quantize(w, GGMLQuantizationType.Q8_0).reshape(-1)
    deq = quants.dequantize(raw.reshape(80, -1), GGMLQuantizationType.Q8_0).astype(np.float64)
    for keep in (True, False):
        m = QMatrix("w", GGMLQuantizationType.Q8_0, 80, 64, raw, keep_f32=keep)
        for n in (1, 3, 40, 100):
            x = rng.standard_normal((n, 64)).astype(np.float32)
            exact = keep
            mag = np.abs(x) @ np.abs(deq).T
            assert np.all(np.abs(m.apply(x) - x @ deq.T) <= (1e-5 if exact else 1e-2) * mag + 1e-6)
        ids = np.array([79, 0, 5])
        np.testing.assert_allclose(m.rows(ids), deq[ids], rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- default model

NEAR_TIE = 1.0   # logits: a swap counts as a near-tie when both sides' margins add up to less
# Against llama.cpp's reference, per K/V cache type: (mean KL per prompt, near-tie margin sum,
# share of positions whose argmax may differ). f32, f16 and q8_0 share one set. q4_0 (16 levels
# per value) moves logits further, as it does in llama.cpp: llama.cpp 0.3.36's own q4_0 K/V
# cache (flash attention, 2 threads) against this reference on the development machine: mean
# KL up to 0.129 per prompt, 65 of 436 positions differing, margins summing to 3.0 at worst
# (ours with q4_0: 0.087, 61, 3.6). q4_0's limits sit above both.
LIMITS = {"f32": (0.02, NEAR_TIE, 0.05), "f16": (0.02, NEAR_TIE, 0.05),
          "q8_0": (0.02, NEAR_TIE, 0.05), "q4_0": (0.15, 5.0, 0.20)}


@pytest.fixture(scope="module")
def gemma(default_model):
    from a2ats_lite.gguf import GGUFFile
    f = GGUFFile(default_model)
    return Model.from_gguf(f, n_batch=512)


@pytest.fixture(scope="module")
def gemma_q(default_model):
    """The same model with quantized layer matrices: decode goes through native.matmul_q."""
    from a2ats_lite.gguf import GGUFFile
    return Model.from_gguf(GGUFFile(default_model), n_batch=512, f32_layers=False)


@pytest.fixture(scope="module")
def reference(shared_dir):
    path = shared_dir / "reference" / "gemma3-270m-q4_k_m.npz"
    if not path.is_file():
        pytest.skip(f"llama.cpp reference logits missing: {path}")
    names = list(json.loads((shared_dir / "reference" / "prompts.json").read_text()))
    return names, np.load(path)


class Compared(dict):
    """prompt name -> figures, and the K/V cache type's LIMITS."""
    limits: tuple


@pytest.fixture(scope="module", params=list(LIMITS))
def compared(gemma, reference, request):
    """Per prompt: our logits at the reference positions and the comparison figures, with
    each K/V cache type (llama.cpp's reference used f16 K/V)."""
    names, ref = reference
    out = Compared()
    out.limits = LIMITS[request.param]
    for name in names:
        toks, pos = ref[name + ".tokens"], ref[name + ".positions"]
        kv = make_kv_cache("dense", gemma.attn_layers, len(toks), cache_type=request.param)
        s = kv.add_sequence()
        ours = gemma.forward([toks], [s], kv, logits=[pos])[0]          # (m, n_vocab)
        top_ids, top_logits, lse = ref[name + ".top_ids"], ref[name + ".top_logits"], ref[name + ".logsumexp"]
        kl = top_k_kl(top_ids, top_logits, lse, ours)   # KL(llama.cpp || ours)
        am = ours.argmax(1)
        swaps = []
        for i in np.flatnonzero(am != top_ids[:, 0]):
            j = np.flatnonzero(top_ids[i] == am[i])
            theirs = float(top_logits[i, 0] - top_logits[i, j[0]]) if j.size else np.inf
            mine = float(ours[i, am[i]] - ours[i, top_ids[i, 0]])
            swaps.append((int(pos[i]), theirs, mine))
        out[name] = dict(n=len(toks), kl=kl, swaps=swaps)
    return out


def test_reference_covers_long_prompt(compared):
    assert "ledger_long" in compared and compared["ledger_long"]["n"] > 2 * 512


def test_logits_close_to_llama_cpp(compared):
    for name, r in compared.items():
        assert np.all(np.isfinite(r["kl"])), name
        assert r["kl"].mean() < compared.limits[0], f"{name}: mean KL {r['kl'].mean():.4f}"


def test_greedy_matches_llama_cpp_except_near_ties(compared):
    # Any disagreement must be a near-tie for BOTH runtimes (their margin for their pick
    # plus ours for ours < NEAR_TIE); the strict test below lists them.
    # (Our float32 pass is within 5e-5 of a float64 evaluation of the same weights, which
    # disagrees with llama.cpp at the same positions: the swaps are llama.cpp's rounding.)
    _, near_tie, share = compared.limits
    for name, r in compared.items():
        for p, theirs, mine in r["swaps"]:
            assert theirs + mine < near_tie, (f"{name} position {p}: llama.cpp prefers its token by "
                                              f"{theirs:.3f}, we prefer ours by {mine:.3f}")
    n_swaps = sum(len(r["swaps"]) for r in compared.values())
    n_pos = sum(len(r["kl"]) for r in compared.values())
    assert n_swaps <= share * n_pos, f"{n_swaps} of {n_pos} positions disagree"


@pytest.mark.xfail(reason="not reachable by a faithful implementation: llama.cpp 0.3.36 itself, on an "
                          "AVX-512 machine, differs from this reference's argmax at 16 of 436 "
                          "positions (11 with flash attention); we differ at 12. Its 8-bit "
                          "activation quantization makes its logits depend on the SIMD path. "
                          "Reproduce: python bench/compare_reference.py (with llama-cpp-python)",
                   strict=False)
def test_greedy_matches_llama_cpp_everywhere(compared):
    swaps = {name: r["swaps"] for name, r in compared.items() if r["swaps"]}
    assert not swaps, swaps


def test_decode_matches_prefill_default_model(gemma, gemma_q, reference):
    # prefill (f32 BLAS) vs token-by-token decode on the quantized blocks (matmul_q, whose
    # SIMD kernels quantize activations to int8 as llama.cpp does): the same distribution
    # up to that rounding, and the same argmax unless it is a near-tie
    _, ref = reference
    toks = ref["prose.tokens"][:24]
    kv = make_kv_cache("dense", gemma.attn_layers, 64)
    s = kv.add_sequence()
    pre = gemma.forward([toks], [s], kv, logits="all")[0][-4:]           # (4, n_vocab)
    kv2 = make_kv_cache("dense", gemma_q.attn_layers, 64)
    s2 = kv2.add_sequence()
    gemma_q.forward([toks[:20]], [s2], kv2, logits="none")
    dec = np.stack([gemma_q.forward([toks[t:t + 1]], [s2], kv2)[0] for t in range(20, 24)])
    lp = pre - np.log(np.exp(pre - pre.max(1, keepdims=True)).sum(1, keepdims=True)) - pre.max(1, keepdims=True)
    lq = dec - np.log(np.exp(dec - dec.max(1, keepdims=True)).sum(1, keepdims=True)) - dec.max(1, keepdims=True)
    kl = (np.exp(lp) * (lp - lq)).sum(1)
    assert kl.max() < 0.02, kl
    for p_row, d_row in zip(pre, dec):
        a, b = int(p_row.argmax()), int(d_row.argmax())
        assert a == b or (p_row[a] - p_row[b]) + (d_row[b] - d_row[a]) < NEAR_TIE


def test_batched_decode_equals_separate_default_model(gemma_q, reference):
    _, ref = reference
    prompts = [ref["capital.tokens"], ref["code.tokens"][:9], ref["mixed.tokens"][:5]]
    nxt = [np.array([t]) for t in (1000, 2000, 3000)]
    kv = make_kv_cache("dense", gemma_q.attn_layers, 64)
    seqs = [kv.add_sequence() for _ in prompts]
    gemma_q.forward(prompts, seqs, kv, logits="none")     # 20 rows: one prefill chunk
    together = gemma_q.forward(nxt, seqs, kv)             # one decode step, 3 rows
    for p, x, got in zip(prompts, nxt, together):
        kv1 = make_kv_cache("dense", gemma_q.attn_layers, 64)
        s1 = kv1.add_sequence()
        gemma_q.forward([p], [s1], kv1, logits="none")
        alone = gemma_q.forward([x], [s1], kv1)[0]
        np.testing.assert_allclose(got, alone, rtol=0, atol=1e-3)
