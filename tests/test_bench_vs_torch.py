"""The logic of `python -m medjax.bench vs-torch` and `memory`: alternating order, the ratio, argument and
child-output parsing, HLO buffer parsing, and that the two step sides run the same AdamW step (a linear
model with the same weights follows the same losses). No timed assertions."""
import json
import sys

import numpy as np
import pytest

from medjax.bench import _timing, memory, vs_torch
from medjax.bench.step_pair import jax_side, max_abs_difference, torch_side


def test_alternating_times_interleaves_and_times_each_call():
    calls, ticks = [], iter(range(100))
    runs = {"medjax": lambda: calls.append("medjax"), "torch": lambda: calls.append("torch")}
    times = _timing.alternating_times(runs, warmup=1, repeats=3, clock=lambda: float(next(ticks)))
    assert calls == ["medjax", "torch"] * 4  # one warm-up round, then three timed rounds, alternating
    assert times == {"medjax": [1.0, 1.0, 1.0], "torch": [1.0, 1.0, 1.0]}  # one tick per timed call
    with pytest.raises(ValueError, match="repeats >= 1"):
        _timing.alternating_times(runs, warmup=0, repeats=0)


def test_time_summary_and_speedup():
    summary = _timing.TimeSummary.of([3.0, 1.0, 2.0, 10.0])
    assert (summary.median, summary.min, summary.max) == (2.5, 1.0, 10.0)
    assert vs_torch.speedup(6.0, 2.0) == 3.0  # torch / medjax: > 1 when medjax is faster
    assert vs_torch.speedup(None, 2.0) is None and vs_torch.speedup(1.0, 0.0) is None
    rows = vs_torch.report_rows({"medjax": [2.0, 2.0], "torch": [5.0, 4.0, 6.0]},
                                {"medjax": [1.0, 0.5], "torch": [1.0, 0.6]},
                                {"medjax": {"compiled_peak_bytes": 2**30, "peak_rss_bytes": 3 * 2**30},
                                 "torch": {"error": "exit 1: killed"}}, {"medjax": 9.0, "torch": 1.0})
    assert rows[0][:7] == ["medjax", "9.0", "2.000", "2.000", "2.000", "1.00x", "1.00"]
    assert rows[1][2] == "5.000" and rows[1][5] == "2.50x" and rows[1][7] == "exit 1: killed"
    assert len(rows[0]) == len(vs_torch.HEADERS)


def test_arguments_child_command_and_child_output():
    args = vs_torch.parse_args(["--exp", "universal_swin", "--variant", "full", "--batch-size", "1",
                                "--set", "model.remat=all"])
    assert (args.exp, args.variant, args.batch_size, args.repeats, args.overrides) == (
        "universal_swin", "full", 1, 3, ["model.remat=all"])
    command = vs_torch.child_command(args, "torch")
    assert command[:3] == [sys.executable, "-m", "medjax.bench"]
    assert vs_torch.parse_args(command[4:]).memory_child == "torch"  # the child re-parses the same row
    assert command[-2:] == ["--set", "model.remat=all"]
    with pytest.raises(SystemExit, match="--repeats must be >= 1"):
        vs_torch.parse_args(["--exp", "x", "--repeats", "0"])
    out = f"noise\n{vs_torch.MEMORY_TAG}{json.dumps({'side': 'torch', 'peak_rss_bytes': 5})}\nmore\n"
    assert vs_torch.parse_child_output(out) == {"side": "torch", "peak_rss_bytes": 5}
    assert vs_torch.parse_child_output("no result") == {}


def test_peak_rss_reset_and_read():
    assert vs_torch.peak_rss_bytes() > 0
    if vs_torch.reset_peak_rss():  # Linux: VmHWM restarts from the current resident size
        assert vs_torch.peak_rss_bytes() > 0


def test_unknown_row_is_a_clear_error():
    from medjax.bench.torch_rows import build_row
    from medjax.errors import MedjaxInputError

    with pytest.raises(MedjaxInputError, match="'visd_ctrate' has no vs-torch row .*rows: .*ptunifier.*mrm_retina"):
        build_row("visd_ctrate", None, 1, ("medjax",))


def test_ptunifier_row_dims_follow_the_experiment():
    from medjax import config as config_lib
    from medjax.bench.torch_rows_text import _ptunifier_dims
    from medjax.errors import MedjaxInputError

    m = config_lib.get_config("ptunifier", "full").model
    d = _ptunifier_dims(m, 50265)  # the paper's: CLIP ViT-B/16 at 288 (11 blocks kept), RoBERTa-base, 6 fusion
    assert (d.width, d.heads, d.mlp, d.clip_mlp, d.image, d.patch) == (768, 12, 3072, 3072, 288, 16)
    assert (d.clip_layers, d.text_layers, d.fusion, d.text_positions, d.pool) == (12, 12, 6, 514, 2048)
    assert d.attn_implementation == "sdpa"
    m.fusion_heads = 8
    with pytest.raises(MedjaxInputError, match="one head count"):
        _ptunifier_dims(m, 50265)


def test_same_weights_and_adamw_give_the_same_losses():
    torch = pytest.importorskip("torch")
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((8, 5), dtype=np.float32), rng.standard_normal((8, 3), dtype=np.float32)
    linear = torch.nn.Linear(5, 3)
    params = {"kernel": linear.weight.detach().numpy().T.copy(), "bias": linear.bias.detach().numpy().copy()}
    adamw = dict(lr=1e-2, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1)
    predict = lambda p, b: b["x"] @ p["kernel"] + p["bias"]  # noqa: E731
    ours = jax_side(lambda p, b: jnp.mean((predict(p, b) - b["y"]) ** 2), predict,
                    params, {"x": jnp.asarray(x), "y": jnp.asarray(y)}, adamw=adamw)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    theirs = torch_side(linear, lambda m: torch.mean((m(tx) - ty) ** 2), lambda m: m(tx).numpy(), adamw=adamw)
    assert max_abs_difference(ours.forward(), theirs.forward()) < 1e-6
    losses = [(ours.step(), theirs.step()) for _ in range(5)]
    np.testing.assert_allclose([a for a, _ in losses], [b for _, b in losses], rtol=1e-5)
    assert losses[-1][0] < losses[0][0]
    assert ours.params == theirs.params == 18 and ours.memory()["compiled_peak_bytes"] > 0
    with pytest.raises(ValueError, match="differ in shape"):
        max_abs_difference(np.zeros(2), np.zeros(3))


HLO = """
ENTRY %main {
  %p = f32[4,8]{1,0} parameter(0)
  %big = f32[1,96,96,96,8]{4,3,2,1,0} fusion(%p), kind=kLoop, metadata={op_name="jit(train_step)/jvp(UniversalModel)/backbone/decoder1/conv_block/add"}
  %t = (f32[2]{0}, f32[3]{0}) tuple(%p, %p)
  %g = bf16[16,16]{1,0} dot(%p, %p), metadata={op_name="jit(train_step)/transpose(jvp(UniversalModel))/backbone/encoder1/layer/conv1/dot_general"}
  ROOT %r = s32[] constant(0)
}
"""


def test_hlo_buffers_and_layers():
    buffers = memory.hlo_buffers(HLO)
    assert [(b.name, b.shape, b.bytes) for b in buffers] == [
        ("big", "f32[1,96,96,96,8]", 96 ** 3 * 8 * 4), ("g", "bf16[16,16]", 512)]  # no params/tuples/constants
    assert memory.layer_of(buffers[0].op_name) == "forward backbone/decoder1/conv_block"
    assert memory.layer_of(buffers[1].op_name, depth=2) == "backward backbone/encoder1"
    assert memory.buffers_by_layer(buffers, depth=2)[0] == ("forward backbone/decoder1", 96 ** 3 * 32, 1)


def test_placeholder_overrides(tmp_path):
    from medjax import config as config_lib

    config = config_lib.get_config("universal_swin", "full")
    overrides = memory.placeholder_overrides(config, str(tmp_path))
    assert overrides == [f"model.class_embeddings={tmp_path}/class_embeddings.npy", f"data.dir={tmp_path}"]
    assert np.load(tmp_path / "class_embeddings.npy").shape == (32, 512)
