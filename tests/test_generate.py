"""`python -m medjax.generate` on a tiny PathChat checkpoint: the streamed answer is what `generate` returns for the
same prompt, image and sampling settings, with the timing line on stderr; bad input stops with one line. And
`TokenStream` (jitted prefill + one decode step per token) gives `generate`'s tokens, stopping at EOS."""
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from medjax import config as config_lib
from medjax import generate as generate_lib
from medjax import provenance
from medjax.checkpoint import save_params
from medjax.nn.llama import Llama
from medjax.tasks import build_task

QUESTION = "What is the most likely diagnosis?"


@pytest.fixture(scope="module")
def checkpoint(demo_roots, tmp_path_factory):
    """A params directory laid out as a training workdir's (config.json + provenance) for pathchat_stage2 tiny."""
    demo = demo_roots("pathology_chat")
    config = config_lib.get_config("pathchat_stage2", "tiny", [f"data.dir={demo}"])
    task = build_task(config, log=lambda *_: None)
    params = jax.device_get(nn.unbox(jax.jit(task.init_params)(jax.random.key(3))))
    directory = str(tmp_path_factory.mktemp("pathchat_tiny"))
    save_params(directory, params, provenance.run_record(config))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({"variant": "tiny", "data": {"dir": demo}}, f)
    return directory, task, params, os.path.join(demo, "tiles", "00017.png")


def test_cli_streams_what_generate_returns(checkpoint, capsys):
    directory, task, params, image = checkpoint
    argv = ["--exp", "pathchat_stage2", "--params", directory, "--image", image, "--prompt", QUESTION,
            "--max-new-tokens", "6", "--temperature", "0.8", "--top-p", "0.9", "--seed", "5"]
    assert generate_lib.main(argv) == 0
    out, err = capsys.readouterr()
    ids = task.prompt_ids(QUESTION, "test")[None]
    tokens = np.asarray(generate_lib.generate(task.model, {"params": params}, ids,
                                              pixel_values=task.pixels(image)[None], max_new_tokens=6,
                                              temperature=0.8, top_p=0.9, eos_token_id=task.tokenizer.eos_token_id,
                                              rng=jax.random.key(5)))
    assert out == task.tokenizer.decode(tokens[0, ids.shape[1]:], skip_special_tokens=True) + "\n"
    assert "time to first token" in err and "tokens/s decoding" in err and "compiled prefill + decode step" in err


@pytest.mark.parametrize("change, message", [
    (("--image", "missing.png"), "missing.png: --image file not found"),
    (("--exp", "mrm_retina"), "medjax.generate answers with PathChat / LLaVA experiments"),
])
def test_cli_bad_input_is_one_line(checkpoint, capsys, change, message):
    directory, _, _, image = checkpoint
    argv = ["--exp", "pathchat_stage2", "--params", directory, "--image", image, "--prompt", QUESTION]
    argv[argv.index(change[0]) + 1] = change[1]
    assert generate_lib.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_token_stream_matches_generate_and_stops_at_eos():
    model = Llama(vocab_size=40, width=16, depth=2, num_heads=2, mlp_dim=24)
    variables = model.init(jax.random.key(0), np.zeros((1, 4), np.int32))
    ids = np.random.default_rng(0).integers(3, 40, size=(2, 5)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :2] = 0  # left padding
    expected = np.asarray(generate_lib.generate(model, variables, ids, attention_mask=mask, max_new_tokens=7))
    eos = int(expected[0, 7])  # row 0's third new token: row 0 stops there, row 1 goes on
    stopped = np.asarray(generate_lib.generate(model, variables, ids, attention_mask=mask, max_new_tokens=7,
                                               eos_token_id=eos))
    stream = generate_lib.TokenStream(model, variables, ids, attention_mask=mask, max_new_tokens=7, eos_token_id=eos)
    streamed = np.stack(list(stream), axis=1)
    np.testing.assert_array_equal(streamed, stopped[:, 5:])
    first = list(expected[0, 5:]).index(eos)
    assert (streamed[0, first:] == eos).all() and stream.compile_seconds > 0
    np.testing.assert_array_equal(np.stack(list(stream), axis=1), streamed)  # a stream can be iterated again
    again = generate_lib.TokenStream(model, variables, ids, attention_mask=mask, max_new_tokens=7, eos_token_id=eos)
    assert again.compile_seconds < stream.compile_seconds  # the compiled programs are reused


def test_bench_generate_prints_ttft_and_tokens_per_second(checkpoint, capsys):
    from medjax.bench import generate as bench_generate

    directory, task, _, _ = checkpoint
    bench_generate.main(["--variant", "tiny", "--set", f"data.dir={task.root}", "--new-tokens", "3", "--repeats", "1",
                         "--params", directory])
    header, _, row = capsys.readouterr().out.strip().splitlines()[-3:]
    cells = dict(zip([c.strip() for c in header.split("|")[1:-1]], [c.strip() for c in row.split("|")[1:-1]]))
    assert cells["exp"] == "pathchat_stage2" and cells["new"] == "3" and cells["prompt"] == "36"
    assert float(cells["TTFT ms"]) > 0 and float(cells["decode tok/s/row"]) > 0 and float(cells["program tok/s"]) > 0
