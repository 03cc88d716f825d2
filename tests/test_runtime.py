"""Runtime API and the generate / chat CLI on the default model."""
import numpy as np
import pytest
from click.testing import CliRunner

from a2ats_lite import Runtime
from a2ats_lite.cli import main
from a2ats_lite.errors import ContextOverflowError, DeviceError
from a2ats_lite.runtime import check_device


@pytest.fixture(scope="module")
def rt(default_model):
    with Runtime(default_model, n_ctx=256, seed=7) as r:
        yield r


def test_greedy_generation_is_the_argmax_of_eval_logits(rt):
    prompt = rt.tokenize("The capital of France is")
    text = rt.generate(prompt, max_tokens=6, temperature=0)
    ids = rt.tokenize(text, add_bos=False)
    # the first generated token is the argmax of the prompt's last logits
    logits = rt.eval_logits(prompt)
    assert logits.shape == (len(prompt), rt.config.n_vocab) and logits.dtype == np.float32
    assert ids[0] == int(np.argmax(logits[-1]))
    assert rt.timings.prompt_tokens == len(prompt) and rt.timings.gen_tokens >= 1


def test_batch_equals_separate_generations(rt):
    prompts = ["Once upon a time", "def fibonacci(n):", "The three primary colours are"]
    batch = rt.generate(prompts, max_tokens=8, temperature=0)
    assert isinstance(batch, list) and len(batch) == 3
    for p, out in zip(prompts, batch):
        assert out == rt.generate(p, max_tokens=8, temperature=0)


def test_same_seed_same_output(rt):
    a = rt.generate("My favourite food is", max_tokens=10, temperature=1.0, seed=42)
    b = rt.generate("My favourite food is", max_tokens=10, temperature=1.0, seed=42)
    assert a == b


def test_stream_pieces_join_to_generate(rt):
    pieces = list(rt.stream("Water boils at", max_tokens=10, temperature=0))
    assert all(isinstance(p, str) and "\ufffd" not in p for p in pieces)
    assert "".join(pieces) == rt.generate("Water boils at", max_tokens=10, temperature=0)


def test_stop_string_is_not_emitted(rt):
    full = rt.generate("1, 2, 3, 4,", max_tokens=12, temperature=0)
    stop = full.strip()[:2]
    out = rt.generate("1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[stop])
    assert stop not in out and full.startswith(out)
    assert rt.last_finish_reasons == ["stop"]


def test_context_overflow_is_a_clear_error(rt):
    with pytest.raises(ContextOverflowError, match="does not fit the context size 256"):
        rt.generate("word " * 400, max_tokens=4)
    out = rt.generate("word " * 400, max_tokens=4, temperature=0, truncate=True)
    assert isinstance(out, str)


def test_bad_token_ids_and_options(rt):
    with pytest.raises(ValueError, match="out of range"):
        rt.eval_logits([2, 10**7])
    with pytest.raises(TypeError, match="unknown generation option"):
        rt.generate("x", max_tokenz=3)


def test_chat_uses_fallback_template_for_base_model(rt):
    ids = rt.chat_prompt([{"role": "user", "content": "Hello"}])
    assert ids.count(rt.tokenizer.bos_id) == 1 and ids[0] == rt.tokenizer.bos_id
    assert "Hello" in rt.detokenize(ids)
    assert isinstance(rt.chat([{"role": "user", "content": "Hello"}], max_tokens=4), str)


def test_cuda_without_gpu_is_one_clear_error():
    try:
        import cupy
    except ImportError:
        with pytest.raises(DeviceError, match="needs CuPy"):
            check_device("cuda")
        return
    try:
        if cupy.cuda.runtime.getDeviceCount() > 0:
            pytest.skip("a CUDA GPU is present")
    except Exception:
        pass
    # CuPy installed (the cuda-test extra) but no driver / device: one clear line
    with pytest.raises(DeviceError, match="no usable CUDA GPU|no CUDA GPU found"):
        check_device("cuda")


def test_cli_generate(default_model):
    r = CliRunner().invoke(main, ["generate", str(default_model), "-p", "The capital of France is",
                                  "-n", "8", "--temp", "0", "-c", "128"])
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("The capital of France is") and len(r.stdout) > 30
    assert "tok/s" in r.stderr and "prompt" in r.stderr


def test_cli_generate_errors_exit_2(default_model, tmp_path):
    cases = [
        ["generate", str(tmp_path / "none.gguf"), "-p", "x"],
        ["generate", str(default_model), "-p", "x", "--device", "cuda"],
        ["generate", str(default_model)],
        ["generate", str(default_model), "-p", "x", "--temp", "-1"],
        ["generate", str(default_model), "-p", "word " * 200, "-c", "64"],
    ]
    for args in cases:
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 2, (args, r.output)
        assert "Traceback" not in r.output


def test_cli_chat_session(default_model):
    r = CliRunner().invoke(main, ["chat", str(default_model), "-c", "256", "-n", "6", "--temp", "0"],
                           input="Hello there\n/reset\nWhat is two plus two?\n/exit\n")
    assert r.exit_code == 0, r.output
    assert r.stderr.count("[conversation cleared]") == 1
    assert r.stdout.count("> ") >= 3


def test_cli_chat_ctrl_d_exits(default_model):
    r = CliRunner().invoke(main, ["chat", str(default_model), "-c", "128"], input="")
    assert r.exit_code == 0
