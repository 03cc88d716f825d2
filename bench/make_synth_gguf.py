"""Write a synthetic GGUF model (random weights, real shapes) to benchmark long context.

    python bench/make_synth_gguf.py --shape llama-3.2-1b --type q4_0 -o /tmp/l1b.gguf
    python bench/make_synth_gguf.py --shape tiny --type f16 --vocab 512 -o tiny.gguf
    python bench/make_synth_gguf.py --shape llama-3.1-8b --layers 2 -o 8b-2layers.gguf

Shapes are the named architectures' real dimensions (layers, widths, heads, KV
heads, head dim, FFN width, RoPE base), so the KV cache per token is exactly
the real model's; the weights are random, so the text is gibberish. No weights
are downloaded. The file is a GGUF v3 for this runtime and llama.cpp (checked
with gguf-py's GGUFReader, and loaded and run by llama-cpp-python 0.3.36 for the
tiny, qwen2.5-0.5b and llama-3.2-1b shapes, with the same token ids as ours): llama.cpp's
tensor names and metadata keys, a small SentencePiece-style
vocabulary ('llama' tokenizer: <unk> <s> </s>, the 256 byte tokens, then word
pieces with descending scores), llama.context_length >= 131072 by default.

Weights: Q4_0 / Q8_0 blocks share one fixed f16 scale per tensor and carry
uniform random quants whose mean is zero (Q4_0 nibbles 1..15 and 8 twice, i.e.
values -7..7; Q8_0 values -127..127), F16 is Gaussian. The scale gives every
element the standard deviation of a sane initialisation:
  q/k/v/gate/up     1/sqrt(n_in)                 (unit-RMS outputs from the RMS-normed input)
  attn_output/down  1/sqrt(n_in) / sqrt(2 n_layer)  (residual branches, GPT-2 style)
  token_embd        1 (untied) or n_embd**-0.25 (tied: also the output matrix)
  output            1/sqrt(n_embd)               (logits ~ N(0, 1))
so the residual stream's RMS stays O(1) through every layer (see --check) and
attention scores are N(0, 1) (not uniform). Norms are 1.0; qwen2's q/k/v
biases are N(0, 0.1^2).

The file is streamed: GGUFWriter writes the header, metadata and tensor index;
the tensor data is generated with numpy in chunks of 8M elements and appended,
so an 8B-shape file (3.7 GiB with the 4096-token vocabulary) is written with
about 60 MB of resident memory.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

import gguf
from gguf import GGMLQuantizationType as QT
from gguf import GGUFWriter, LlamaFileType

CHUNK_ELEMS = 1 << 23          # elements generated per chunk (~4.5 MB of Q4_0, 32 MB of f32 temp)


@dataclass(frozen=True)
class Shape:
    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    rope_base: float
    norm_eps: float
    attn_bias: bool = False     # qwen2: q/k/v biases
    tied: bool = False          # no output.weight: the embedding is the output matrix
    hf_name: str = ""


SHAPES = {
    "llama-3.2-1b": Shape("llama", 16, 2048, 32, 8, 64, 8192, 500000.0, 1e-5,
                          hf_name="Llama-3.2-1B"),
    "llama-3.1-8b": Shape("llama", 32, 4096, 32, 8, 128, 14336, 500000.0, 1e-5,
                          hf_name="Llama-3.1-8B"),
    "qwen2.5-0.5b": Shape("qwen2", 24, 896, 14, 2, 64, 4864, 1000000.0, 1e-6,
                          attn_bias=True, tied=True, hf_name="Qwen2.5-0.5B"),
    "tiny": Shape("llama", 2, 64, 4, 2, 16, 128, 10000.0, 1e-5, hf_name="tiny"),
}

TYPES = {"q4_0": (QT.Q4_0, LlamaFileType.MOSTLY_Q4_0),
         "q8_0": (QT.Q8_0, LlamaFileType.MOSTLY_Q8_0),
         "f16": (QT.F16, LlamaFileType.MOSTLY_F16)}

# -- quantized random blocks ---------------------------------------------------------------
# Q4_0 value = d * (nibble - 8); nibble 0 is remapped to 8 so the values are -7..7,
# symmetric (mean 0): an all-ones bias component would otherwise dominate every matrix.
_Q4_LUT = np.arange(256, dtype=np.uint16)
_lo, _hi = _Q4_LUT & 15, _Q4_LUT >> 4
_lo[_lo == 0], _hi[_hi == 0] = 8, 8
_Q4_LUT = (_lo | (_hi << 4)).astype(np.uint8)
Q4_STD = math.sqrt(2 * sum(k * k for k in range(1, 8)) / 16)          # 4.18
Q8_STD = math.sqrt(2 * sum(k * k for k in range(1, 128)) / 256)       # 73.5 (-128 -> 0)


def _f16_bytes(x: float) -> np.ndarray:
    return np.frombuffer(np.float16(x).tobytes(), np.uint8)


def _quant_scale(std: float, qstd: float) -> float:
    d = float(np.float16(std / qstd))
    if not np.isfinite(d) or d == 0:
        raise ValueError(f"scale {std / qstd:g} is not representable in f16")
    return d


def random_chunk(rng: np.random.Generator, qtype: QT, n: int, std: float) -> np.ndarray:
    """n elements (n % block == 0) of random weights of the given std, as raw GGUF bytes."""
    if qtype == QT.F16:
        return (rng.standard_normal(n, dtype=np.float32) * np.float32(std)).astype(np.float16).view(np.uint8)
    if qtype == QT.F32:
        return (rng.standard_normal(n, dtype=np.float32) * np.float32(std)).view(np.uint8)
    if qtype == QT.Q4_0:
        nb = n // 32
        out = np.empty((nb, 18), np.uint8)
        out[:, :2] = _f16_bytes(_quant_scale(std, Q4_STD))
        out[:, 2:] = _Q4_LUT[rng.integers(0, 256, (nb, 16), dtype=np.uint8)]
        return out.reshape(-1)
    if qtype == QT.Q8_0:
        nb = n // 32
        out = np.empty((nb, 34), np.uint8)
        out[:, :2] = _f16_bytes(_quant_scale(std, Q8_STD))
        q = rng.integers(-127, 128, (nb, 32), dtype=np.int8)
        out[:, 2:] = q.view(np.uint8)
        return out.reshape(-1)
    raise ValueError(f"unsupported tensor type {qtype.name}")


def nbytes_of(qtype: QT, n_elems: int) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    assert n_elems % block == 0, (qtype, n_elems)
    return n_elems // block * size


# -- vocabulary ----------------------------------------------------------------------------
_WORDS = """the of and to a in is it you that he was for on are with as I his they be at one
have this from or had by not word but what some we can out other were all there when up use
your how said an each she which do their time if will way about many then them write would
like so these her long make thing see him two has look more day could go come did number sound
no most people my over know water than call first who may down side been now find any new work
part take get place made live where after back little only round man year came show every good
me give our under name very through just form sentence great think say help low line differ turn
cause much mean before move right boy old too same tell does set three want air well also play
small end put home read hand port large spell add even land here must big high such follow act
why ask men change went light kind off need house picture try us again animal point mother world
near build self earth father head stand own page should country found answer school grow study
still learn plant cover food sun four between state keep eye never last let thought city tree
cross farm hard start might story saw far sea draw left late run while press close night real
life few north open seem together next white children begin got walk example ease paper group
always music those both mark often letter until mile river car feet care second book carry took
science eat room friend began idea fish mountain stop once base hear horse cut sure watch color
face wood main enough plain girl usual young ready above ever red list though feel talk bird soon
body dog family direct pose leave song measure door product black short numeral class wind
question happen complete ship area half rock order fire south problem piece told knew pass since
top whole king space heard best hour better true during hundred five remember step early hold
west ground interest reach fast verb sing listen six table travel less morning ten simple several
vowel toward war lay against pattern slow center love person money serve appear road map rain
rule govern pull cold notice voice unit power town fine certain fly fall lead cry dark machine
note wait plan figure star box noun field rest correct able pound done beauty drive stood contain
front teach week final gave green quick develop ocean warm free minute strong special mind behind
clear tail produce fact street inch multiply nothing course stay wheel full force blue object
decide surface deep moon island foot system busy test record boat common gold possible plane
stead dry wonder laugh thousand ago ran check game shape equate hot miss brought heat snow tire
bring yes distant fill east paint language among model context token memory cache attention
""".split()
_SUBWORDS = """s ed ing er ly es tion al ent ion ic ity ment ness able ous ive ful less ist ism
ize ure ance ence ant ary ory th he in an re on at en nd ti es or te of ed is it ar st to nt ng
se ha as ou io le ve co me de hi ri ro ic ne ea ra ce li ch ll be ma si om ur un pre dis con com
pro ex per sub inter trans over under""".split()
_LETTERS = "etaoinshrdlcumwfgypbvkjxqz"
_PUNCT = ".,;:!?'\"-()[]{}/\\@#$%^&*_+=<>|~`"


def _pieces():
    """Word pieces in score order: merge bases, words (with their prefixes), then n-grams."""
    sp = "\u2581"
    yield sp
    singles = list(_LETTERS) + list(_LETTERS.upper()) + list("0123456789") + list(_PUNCT)
    yield from singles
    for c in singles:
        yield sp + c

    def closure(w):
        for k in range(2, len(w) + 1):
            yield w[:k]
    for w in _WORDS:
        yield from closure(sp + w)
    for w in _WORDS[:80]:
        yield from closure(sp + w[:1].upper() + w[1:])
    for w in _SUBWORDS:
        yield from closure(w)
    for n in range(2, 8):   # filler: letter n-grams, frequent letters first (never runs out)
        for i in range(len(_LETTERS) ** n):
            g, j = [], i
            for _ in range(n):
                g.append(_LETTERS[j % 26])
                j //= 26
            g = "".join(reversed(g))
            yield g
            yield sp + g


def make_vocab(n_vocab: int):
    """-> (tokens, scores float32, token types int32)."""
    if n_vocab < 300:
        raise ValueError(f"--vocab must be at least 300 (3 specials + 256 bytes + pieces), got {n_vocab}")
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    seen = set(tokens)
    n_fixed = len(tokens)
    for p in _pieces():
        if len(tokens) >= n_vocab:
            break
        if p not in seen:
            seen.add(p)
            tokens.append(p)
    types += [1] * (len(tokens) - n_fixed)
    scores = np.zeros(len(tokens), np.float32)
    scores[n_fixed:] = -np.arange(len(tokens) - n_fixed, dtype=np.float32)
    return tokens, scores, np.array(types, np.int32)


# -- the file ------------------------------------------------------------------------------
def tensor_plan(s: Shape, wtype: QT, n_vocab: int):
    """[(name, numpy shape (n_out, n_in) or (n,), ggml type, std, kind)] in file order."""
    qd, kvd = s.n_head * s.head_dim, s.n_head_kv * s.head_dim
    res = 1.0 / math.sqrt(2 * s.n_layer)
    emb_std = s.n_embd ** -0.25 if s.tied else 1.0
    plan = [("token_embd.weight", (n_vocab, s.n_embd), wtype, emb_std, "w")]
    for i in range(s.n_layer):
        p = f"blk.{i}."
        plan.append((p + "attn_norm.weight", (s.n_embd,), QT.F32, 1.0, "ones"))
        for nm, n_out in (("attn_q", qd), ("attn_k", kvd), ("attn_v", kvd)):
            plan.append((p + nm + ".weight", (n_out, s.n_embd), wtype, 1 / math.sqrt(s.n_embd), "w"))
            if s.attn_bias:
                plan.append((p + nm + ".bias", (n_out,), QT.F32, 0.1, "w"))
        plan += [
            (p + "attn_output.weight", (s.n_embd, qd), wtype, res / math.sqrt(qd), "w"),
            (p + "ffn_norm.weight", (s.n_embd,), QT.F32, 1.0, "ones"),
            (p + "ffn_gate.weight", (s.n_ff, s.n_embd), wtype, 1 / math.sqrt(s.n_embd), "w"),
            (p + "ffn_up.weight", (s.n_ff, s.n_embd), wtype, 1 / math.sqrt(s.n_embd), "w"),
            (p + "ffn_down.weight", (s.n_embd, s.n_ff), wtype, res / math.sqrt(s.n_ff), "w"),
        ]
    plan.append(("output_norm.weight", (s.n_embd,), QT.F32, 1.0, "ones"))
    if not s.tied:
        plan.append(("output.weight", (n_vocab, s.n_embd), wtype, 1 / math.sqrt(s.n_embd), "w"))
    return plan


def write_synth_gguf(path, shape: str = "tiny", wtype: str = "q4_0", n_ctx: int = 131072,
                     n_vocab: int = 4096, seed: int = 0, n_layers: int | None = None,
                     progress: bool = False) -> dict:
    """Write the file; returns {'path', 'bytes', 'seconds', 'n_tensors', 'n_params'}."""
    t0 = time.perf_counter()
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    if wtype not in TYPES:
        raise ValueError(f"unknown type {wtype!r}; choose from {', '.join(TYPES)}")
    s = SHAPES[shape]
    if n_layers is not None:
        if n_layers < 1:
            raise ValueError("--layers must be >= 1")
        s = replace(s, n_layer=n_layers)
    if n_ctx < 1:
        raise ValueError("--ctx must be positive")
    if seed < 0:
        raise ValueError("--seed must be >= 0")
    qtype, ftype = TYPES[wtype]
    tokens, scores, ttypes = make_vocab(n_vocab)
    n_vocab = len(tokens)
    plan = tensor_plan(s, qtype, n_vocab)

    path = Path(path)
    w = GGUFWriter(path, s.arch)
    layers = "" if s.n_layer == SHAPES[shape].n_layer else f" ({s.n_layer} layers)"
    w.add_name(f"synthetic {s.hf_name}{layers} {wtype.upper()}")
    w.add_string("general.description", "random weights with real shapes, made by "
                 "a2ats-lite bench/make_synth_gguf.py (not a trained model)")
    w.add_uint32("general.file_type", int(ftype))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(n_ctx)
    w.add_embedding_length(s.n_embd)
    w.add_block_count(s.n_layer)
    w.add_feed_forward_length(s.n_ff)
    w.add_head_count(s.n_head)
    w.add_head_count_kv(s.n_head_kv)
    w.add_key_length(s.head_dim)
    w.add_value_length(s.head_dim)
    w.add_rope_dimension_count(s.head_dim)
    w.add_rope_freq_base(s.rope_base)
    w.add_layer_norm_rms_eps(s.norm_eps)
    w.add_vocab_size(n_vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores.tolist())
    w.add_token_types(ttypes.tolist())
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(True)

    for name, shp, qt, _, _ in plan:
        n = int(np.prod(shp))
        np_dtype = {QT.F32: np.float32, QT.F16: np.float16}.get(qt, np.float32)
        w.add_tensor_info(name, shp, np.dtype(np_dtype), nbytes_of(qt, n),
                          raw_dtype=None if qt in (QT.F32, QT.F16) else qt)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        fout = w.fout[0]
        align = w.data_alignment

        def pad():
            fout.write(b"\0" * (-fout.tell() % align))

        pad()
        data_start = fout.tell()
        total = sum(nbytes_of(qt, int(np.prod(shp))) for _, shp, qt, _, _ in plan)
        written, n_params, last_report = 0, 0, time.perf_counter()
        for k, (name, shp, qt, std, kind) in enumerate(plan):
            n = int(np.prod(shp))
            n_params += n
            rng = np.random.default_rng([seed, k])        # per tensor: reproducible, order-free
            if kind == "ones":
                fout.write(np.ones(n, np.float32).tobytes())
            else:
                block = gguf.GGML_QUANT_SIZES[qt][0]
                step = max(block, CHUNK_ELEMS // block * block)
                for a in range(0, n, step):
                    fout.write(random_chunk(rng, qt, min(step, n - a), std).data)
            written += nbytes_of(qt, n)
            pad()
            if progress and time.perf_counter() - last_report > 2:
                last_report = time.perf_counter()
                print(f"  {written / 2**30:6.2f} / {total / 2**30:.2f} GiB  ({name})", file=sys.stderr)
        size = fout.tell()
    except BaseException:
        w.close()
        path.unlink(missing_ok=True)      # no half-written model left behind
        raise
    w.close()
    if os.path.getsize(path) != size:
        raise RuntimeError(f"{path}: wrote {size} bytes but the file has {os.path.getsize(path)}")
    return {"path": str(path), "bytes": size, "seconds": time.perf_counter() - t0,
            "n_tensors": len(plan), "n_params": n_params, "data_offset": data_start}


# -- checks --------------------------------------------------------------------------------
def check_activations(path, prompt: str = "The quick brown fox jumps over the lazy dog.",
                      n_ctx: int = 256) -> dict:
    """Run the prompt through this runtime: per-layer residual RMS and the logits' stats."""
    root = Path(__file__).resolve().parent.parent
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from gguf.quants import dequantize

    from a2ats_lite.gguf import GGUFFile
    from a2ats_lite.runtime import Runtime

    rt = Runtime(str(path), n_ctx=n_ctx, seed=0)
    try:
        ids = rt.tokenize(prompt)
        rms = []

        def host_rms(y, B=None):
            y = B.to_host(y) if B is not None and hasattr(B, "to_host") else y
            return float(np.sqrt(np.mean(np.square(np.asarray(y), dtype=np.float64))))

        # trace the layer function: a2ats_lite.model.forward.block(c, lw, L, x, batch, kv, B)
        # (the current layout), else the older Model._block(layer, x, ...) method
        try:
            import a2ats_lite.model.forward as owner
            name = "block"
        except ImportError:
            owner, name = getattr(rt, "model", None), "_block"
        fn = getattr(owner, name, None)
        if fn is None:
            rms = None
        elif name == "block":
            def traced(*a, **kw):
                y = fn(*a, **kw)
                rms.append(host_rms(y, a[6] if len(a) > 6 else kw.get("B")))
                return y
        else:
            def traced(*a, **kw):
                y = fn(*a, **kw)
                rms.append(host_rms(y))
                return y
        if fn is not None:
            setattr(owner, name, traced)
        try:
            logits = rt.eval_logits(ids)
        finally:
            if fn is not None:
                setattr(owner, name, fn)
    finally:
        rt.close()
    with GGUFFile(path) as f:
        t = f.tensors["token_embd.weight"]
        raw = f.tensor_data(t.name).reshape(t.shape[0], -1)[np.asarray(ids)]
        emb = dequantize(raw, QT(t.ggml_type)).astype(np.float64)
    return {"n_tokens": len(ids), "embd_rms": float(np.sqrt(np.mean(emb * emb))),
            "layer_rms": rms, "logits_finite": bool(np.isfinite(logits).all()),
            "logits_std": float(logits.std())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--type", dest="wtype", choices=sorted(TYPES), default="q4_0")
    ap.add_argument("--ctx", type=int, default=131072, help="context_length metadata (default 131072)")
    ap.add_argument("--vocab", type=int, default=4096, help="vocabulary size (default 4096)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=None,
                    help="write only N layers (real widths; for tests and quick runs)")
    ap.add_argument("--check", action="store_true",
                    help="afterwards, run a prompt in a2ats-lite: residual RMS per layer, logits")
    ap.add_argument("-o", "--output", required=True)
    a = ap.parse_args(argv)
    try:
        r = write_synth_gguf(a.output, a.shape, a.wtype, a.ctx, a.vocab, a.seed, a.layers,
                             progress=True)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {r['path']}: {r['bytes'] / 2**20:.1f} MiB ({r['bytes']} bytes), "
          f"{r['n_tensors']} tensors, {r['n_params'] / 1e6:.1f} M parameters, "
          f"in {r['seconds']:.2f} s ({r['bytes'] / 2**20 / max(r['seconds'], 1e-9):.0f} MiB/s)")
    if a.check:
        c = check_activations(a.output)
        print(f"check: {c['n_tokens']} tokens, embedding RMS {c['embd_rms']:.3f}, residual RMS "
              f"per layer {' '.join(f'{v:.2f}' for v in c['layer_rms'] or ['?'])}, logits finite "
              f"{c['logits_finite']} (std {c['logits_std']:.2f})")
        if not c["logits_finite"]:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
