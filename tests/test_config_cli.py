"""ModelConfig from metadata, and the CLI's one-line errors (exit status 2)."""
import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from a2ats_lite.cli import main
from a2ats_lite.config import ModelConfig
from a2ats_lite.errors import ModelError


def _md(arch, **extra):
    md = {"general.architecture": arch, f"{arch}.embedding_length": 512,
          f"{arch}.attention.head_count": 8, f"{arch}.attention.head_count_kv": 2,
          f"{arch}.block_count": 4, f"{arch}.feed_forward_length": 1024,
          f"{arch}.context_length": 4096, f"{arch}.rope.freq_base": 500000.0,
          "tokenizer.ggml.tokens": ["a"] * 100}
    md.update({f"{arch}.{k}": v for k, v in extra.items()})
    return md


def test_llama_config():
    c = ModelConfig.from_metadata(_md("llama"), tensor_names={"output.weight", "rope_freqs.weight"})
    assert (c.n_head, c.n_head_kv, c.head_dim, c.group) == (8, 2, 64, 4)
    assert c.rope_pairing == "adjacent" and c.rope_scaling_type == "llama3"
    assert not c.tied_embeddings and c.act == "silu" and not c.is_swa(0)
    assert c.attn_layers()[3].rope.base == 500000.0


def test_qwen2_biases_and_qwen3_qk_norm():
    q2 = ModelConfig.from_metadata(_md("qwen2"), tensor_names={"blk.0.attn_q.bias"})
    q3 = ModelConfig.from_metadata(_md("qwen3"), tensor_names={"blk.0.attn_q_norm.weight"})
    assert q2.attn_bias and not q2.qk_norm and q2.rope_pairing == "half" and q2.tied_embeddings
    assert q3.qk_norm and not q3.attn_bias


def test_gemma3_sliding_layers_and_rope_bases():
    c = ModelConfig.from_metadata(_md("gemma3", **{"attention.sliding_window": 512, "block_count": 12}))
    swa = [c.is_swa(i) for i in range(12)]
    assert swa == [True] * 5 + [False] + [True] * 5 + [False]
    layers = c.attn_layers()
    assert layers[0].window == 512 and layers[0].rope.base == 10000.0
    assert layers[5].window is None and layers[5].rope.base == 500000.0
    assert c.embd_scale == pytest.approx(np.sqrt(512)) and c.act == "gelu_tanh" and c.post_norms


def test_linear_rope_scaling_applies_to_global_layers_only():
    c = ModelConfig.from_metadata(_md("gemma3", **{"attention.sliding_window": 8,
                                                   "rope.scaling.type": "linear",
                                                   "rope.scaling.factor": 8.0}))
    assert c.layer_rope(5).freq_scale == 0.125 and c.layer_rope(0).freq_scale == 1.0


def test_unknown_architecture_lists_supported():
    with pytest.raises(ModelError, match="supported: llama, qwen2, qwen3, gemma3"):
        ModelConfig.from_metadata(_md("mamba"))


def test_bad_head_counts():
    with pytest.raises(ModelError, match="not a multiple"):
        ModelConfig.from_metadata(_md("llama", **{"attention.head_count_kv": 3}))


def test_info_on_default_model(default_model):
    r = CliRunner().invoke(main, ["info", str(default_model)])
    assert r.exit_code == 0, r.output
    assert "gemma3" in r.output and "262144" in r.output and "Q4_K" in r.output
    assert "chat template" in r.output and "none" in r.output


@pytest.mark.parametrize("content, problem", [
    (None, "no such file"), (b"hello", "not a GGUF file"),
    (b"GGUF\x03\x00\x00\x00" + b"\xff" * 16, "truncated"),
])
def test_info_bad_input_one_line_exit_2(tmp_path, content, problem):
    p = tmp_path / "m.gguf"
    if content is not None:
        p.write_bytes(content)
    r = CliRunner().invoke(main, ["info", str(p)])
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and problem in lines[0] and str(p) in lines[0]
    assert "Traceback" not in r.output


def test_info_unsupported_architecture_exit_2(tmp_path):
    p = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(p), "mamba")
    w.add_tensor("x", np.ones(4, np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    r = CliRunner().invoke(main, ["info", str(p)])
    assert r.exit_code == 2 and "unsupported architecture 'mamba'" in r.output
