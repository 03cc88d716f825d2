"""`a2ats-lite eval` end to end on a short context of the default model."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from a2ats_lite.cli import main
from a2ats_lite.evaluate import passkey_prompt


def test_eval_writes_one_record_per_task_policy_context(default_model, tmp_path):
    out = tmp_path / "ev.json"
    r = CliRunner().invoke(main, ["eval", str(default_model), "--kv", "dense,oracle,window",
                                  "--ctx", "160", "--budget", "8", "--steps", "3",
                                  "--json", str(out), "--plot", str(tmp_path / "ev.png")])
    assert r.exit_code == 0, r.output
    recs = json.loads(out.read_text())["records"]
    keys = {(x["task"], x["policy"], x["ctx"]) for x in recs}
    tasks = ("recall", "agree", "passkey", "niah_single", "niah_multikey")
    assert keys == {(t, p, 160) for t in tasks for p in ("dense", "oracle", "window")}
    by = {(x["task"], x["policy"]): x["metrics"] for x in recs}
    assert by[("recall", "dense")]["attention_recall"] == 1.0
    for p in ("oracle", "window"):
        assert 0 < by[("recall", p)]["attention_recall"] <= 1.0
    # the oracle's selection is the ceiling on the share of softmax mass
    assert by[("recall", "oracle")]["attention_recall"] >= by[("recall", "window")]["attention_recall"]
    assert by[("recall", "oracle")]["oracle_overlap"] == 1.0
    assert (tmp_path / "ev.png").stat().st_size > 1000
    assert "oracle overlap" in r.stdout and "niah multikey" in r.stdout


def test_eval_rejects_unknown_policy(default_model):
    r = CliRunner().invoke(main, ["eval", str(default_model), "--kv", "dense,magic"])
    assert r.exit_code == 2 and "unknown policy 'magic'" in r.output


def test_eval_tasks_option_and_unknown_task(default_model, tmp_path):
    out = tmp_path / "ev.json"
    r = CliRunner().invoke(main, ["eval", str(default_model), "--kv", "dense", "--ctx", "200",
                                  "--tasks", "niah_single", "--json", str(out)])
    assert r.exit_code == 0, r.output
    recs = json.loads(out.read_text())["records"]
    assert [(x["task"], x["policy"]) for x in recs] == [("niah_single", "dense")]
    assert 0.0 <= recs[0]["metrics"]["niah_single_accuracy"] <= 1.0
    r = CliRunner().invoke(main, ["eval", str(default_model), "--tasks", "recall,magic"])
    assert r.exit_code == 2 and "unknown task 'magic'" in r.output


def test_needle_prompt_places_needles(default_model):
    import random

    from a2ats_lite.corpus import natural_text
    from a2ats_lite.evaluate import needle_prompt
    from a2ats_lite.tokenizer import Tokenizer
    tok = Tokenizer.from_gguf(default_model)
    text = tok.encode(natural_text("eval")[:20000], add_bos=False)
    for n, depth in ((1, 0.2), (4, 0.7)):
        ids, value = needle_prompt(tok, 600, text, depth, random.Random(n), n)
        assert len(ids) == 600 and ids[0] == tok.bos_id
        s = tok.decode(ids)
        assert s.count("One of the special magic numbers for") == n
        asked = s[s.rindex("What is the special magic number for ") + 37:].split()[0]
        needle = f"One of the special magic numbers for {asked} is: {value}."
        assert s.count(needle) == 1 and s.count(value) == 1
        body = s.index("afterwards.") , s.index("\nWhat is")
        assert abs((s.index(needle) - body[0]) / (body[1] - body[0]) - depth) < 0.1
    with pytest.raises(ValueError, match="too short"):
        needle_prompt(tok, 60, text, 0.5, random.Random(0), 4)


def test_passkey_prompt_hides_the_key_at_depth(default_model):
    from a2ats_lite.tokenizer import Tokenizer
    import random
    tok = Tokenizer.from_gguf(default_model)
    ids, key = passkey_prompt(tok, 300, 0.5, random.Random(1))
    text = tok.decode(ids)
    assert key in text and abs(len(ids) - 300) < 20
    assert 0.3 < text.index(key) / len(text) < 0.7


def test_shared_prefill_equals_prefilling_under_each_policy():
    from types import SimpleNamespace

    from test_model import random_arrays, tiny_config

    from a2ats_lite.evaluate import prefill_once, start_from
    from a2ats_lite.kv import make_kv_cache
    from a2ats_lite.model import Model

    c = tiny_config("gemma3")
    model = Model.from_arrays(c, random_arrays(c, seed=2))
    rt = SimpleNamespace(model=model, n_ctx=128)
    toks = np.random.default_rng(0).integers(0, c.n_vocab, 50)
    prefix = prefill_once(rt, toks)
    for policy in ("oracle", "quest", "window"):
        a = make_kv_cache(policy, model.attn_layers, 128, budget=3, sinks=2, window=4)
        b = make_kv_cache(policy, model.attn_layers, 128, budget=3, sinks=2, window=4)
        sa = start_from(rt, a, prefix)
        sb = b.add_sequence()
        np.testing.assert_allclose(model.forward([toks], [sb], b)[0], prefix.logits, rtol=1e-5, atol=1e-5)
        for t in (5, 9, 13):
            la = model.forward([np.array([t])], [sa], a)[0]
            lb = model.forward([np.array([t])], [sb], b)[0]
            np.testing.assert_allclose(la, lb, rtol=1e-5, atol=1e-5)


def test_top_k_kl_is_the_kl_of_the_bucketed_distributions():
    from a2ats_lite.evaluate import top_k_kl
    rng = np.random.default_rng(11)
    ref = rng.standard_normal((5, 300)) * 3
    ours = (ref + 0.3 * rng.standard_normal((5, 300))).astype(np.float32)
    lse = np.log(np.exp(ref).sum(1))
    p = np.exp(ref - lse[:, None])
    q = np.exp(ours.astype(np.float64))
    q /= q.sum(1, keepdims=True)
    order = np.argsort(-ref, axis=1)
    # every id listed: the exact KL(p || q)
    full = top_k_kl(order, np.take_along_axis(ref, order, 1), lse, ours)
    np.testing.assert_allclose(full, (p * np.log(p / q)).sum(1), rtol=1e-5, atol=1e-7)
    # 20 ids listed: the KL of the distributions with the other 280 merged into one bucket
    top = order[:, :20]
    part = top_k_kl(top, np.take_along_axis(ref, top, 1), lse, ours)
    pt, qt = np.take_along_axis(p, top, 1), np.take_along_axis(q, top, 1)
    pr, qr = 1 - pt.sum(1), 1 - qt.sum(1)
    expect = (pt * np.log(pt / qt)).sum(1) + pr * np.log(pr / qr)
    np.testing.assert_allclose(part, expect, rtol=1e-4, atol=1e-7)
    assert np.all(part <= full + 1e-9)
