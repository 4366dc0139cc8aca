"""PTUnifier report generation (ptunifier_reportgen) at the tiny size on the demo reports: two training steps
with a finite loss near ln(vocab), then `python -m medjax.evaluate` on the workdir prints the paper's table
(BLEU-1..4, ROUGE-L); the decoder initialised from a pretraining run's text encoder and MLM head; the
released configs' modes, lengths and lr groups."""
import json

import flax.linen as nn
import jax
import numpy as np
import pytest

from medjax import config as config_lib
from medjax import evaluate as evaluate_cli
from medjax import optim as optim_lib
from medjax.tasks import build_task
from medjax.tasks.ptunifier_finetune import PROMPT_POOL_PARAMS
from medjax.tasks.ptunifier_reportgen import decoder_from_text
from medjax.trainer import Trainer

# validation on `val` at the end keeps best/ by BLEU-1..4's sum (the original's); the PTB tokenizer (java) is
# tested in tests/metrics/test_captioning.py, its Python stand-in scores here
FAST = ("model.fusion_layers=1", "mesh.num_devices=1", "train.steps=2", "train.checkpoint_every=2",
        "train.eval_every=2", "finetune.eval_tokenizer=simple")


@pytest.fixture(scope="module")
def demo_root(demo_roots):
    return demo_roots("image_report")  # the session's image-report demo (tests/experiment_data.py: 40 images, 32 px)


def test_tiny_report_generation_trains_and_evaluates(demo_root, tmp_path, capsys):
    config = config_lib.get_config("ptunifier_reportgen", "tiny", [f"data.dir={demo_root}", *FAST])
    task = build_task(config, log=lambda *_: None)
    assert task.mode == "vision" and task.target_field == "findings"
    assert not task.model.prompts_trainable and PROMPT_POOL_PARAMS in task.optim_config().frozen  # released protocol
    result = Trainer(config, task, str(tmp_path)).run()
    assert result["step"] == 2 and np.isfinite(result["losses"]).all()
    assert abs(result["losses"][0] - np.log(task.model_cfg.vocab_size)) < 1.0  # a random decoder: ~ln(vocab)
    assert task.selection_metric() == ("bleu_sum", "max")
    best = json.loads((tmp_path / "best" / "medjax_best.json").read_text())
    assert best["metric"] == "bleu_sum" and best["step"] == 2 and 0.0 <= best["value"] <= 4.0
    capsys.readouterr()
    assert evaluate_cli.main(["--exp", "ptunifier_reportgen", "--checkpoint", str(tmp_path), "--set",
                              f"data.dir={demo_root}", "--set", "model.fusion_layers=1", "--set",
                              "finetune.eval_tokenizer=simple"]) == 0
    table = capsys.readouterr().out
    label = tmp_path.name  # the column group: the checkpoint folder
    assert (f"| Method | {label} BLEU-1 | {label} BLEU-2 | {label} BLEU-3 | {label} BLEU-4 | {label} ROUGE-L |"
            in table)
    row = next(line for line in table.splitlines() if line.startswith("| medjax ptunifier_reportgen"))
    values = [float(v) for v in row.strip("|").split("|")[1:]]
    assert len(values) == 5 and all(0.0 <= v <= 100.0 for v in values)


def test_decoder_initialised_from_the_text_encoder_and_mlm_head(demo_root):
    config = config_lib.get_config("ptunifier_reportgen", "tiny", [f"data.dir={demo_root}"])
    task = build_task(config, log=lambda *_: None)
    shapes = nn.meta.unbox(jax.eval_shape(task.init_params, jax.random.PRNGKey(0)))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), shapes)
    pretrained = {k: v for k, v in params.items() if k not in task.NEW_PARAMS}  # a pretraining run's tree
    merged = task.load_pretrained(params, pretrained)
    dec, text = merged["report_decoder"], merged["text"]
    np.testing.assert_array_equal(dec["word_embeddings"]["embedding"], text["word_embeddings"]["embedding"])
    np.testing.assert_array_equal(dec["layers_0"]["self_attention"]["query"]["kernel"],
                                  text["layers_0"]["attention"]["query"]["kernel"])
    np.testing.assert_array_equal(dec["layers_0"]["fc2"]["kernel"], text["layers_0"]["fc2"]["kernel"])
    np.testing.assert_array_equal(dec["lm_decoder"]["kernel"], merged["mlm_decoder"]["kernel"])
    np.testing.assert_array_equal(dec["lm_bias"], merged["mlm_bias"])
    # the cross-attention keeps its own init; a fine-tuned checkpoint's decoder is taken as it is
    np.testing.assert_array_equal(dec["layers_0"]["cross_attention"]["query"]["kernel"],
                                  params["report_decoder"]["layers_0"]["cross_attention"]["query"]["kernel"])
    again = task.load_pretrained(params, params)
    np.testing.assert_array_equal(again["report_decoder"]["word_embeddings"]["embedding"],
                                  params["report_decoder"]["word_embeddings"]["embedding"])
    # copies, not the same buffers: the donated train state may not hold one buffer twice
    copied = decoder_from_text(params)
    leaves = jax.tree.leaves(copied)
    assert len({id(x) for x in leaves}) == len(leaves)
    np.testing.assert_array_equal(copied["report_decoder"]["lm_norm"]["scale"], params["mlm_norm"]["scale"])


def test_released_configs():
    modes = {v: (config_lib.get_config("ptunifier_reportgen", v).finetune.mode,
                 config_lib.get_config("ptunifier_reportgen", v).finetune.max_target_len)
             for v in ("full", "summarization", "vl_summarization")}
    assert modes == {"full": ("vision", 256), "summarization": ("language", 128),
                     "vl_summarization": ("vision_language", 128)}
    c = config_lib.get_config("ptunifier_reportgen", "full")
    assert c.finetune.num_beams == 5 and c.optim.lr == 5e-6 and c.data.image_size == 384 and c.data.resized_crop
    names = ("report_decoder", "task_head", "fusion_0", "textual_prompts", "clm_proj", "clm_norm", "text")
    mults = optim_lib.lr_multipliers(c.optim, {n: {"kernel": 0} for n in names})
    assert [mults[f"{n}/kernel"] for n in names] == [50.0, 50.0, 5.0, 5.0, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="unknown variant"):
        config_lib.get_config("ptunifier_reportgen", "slake")


def test_inputs_and_targets_tokenise_at_their_lengths_from_concurrent_loader_threads(demo_root):
    """A fast tokenizer keeps its truncation length as state: the targets have their own tokenizer copy, so the
    loader threads' inputs (data.max_text_len) and targets (max_target_len) never take each other's length."""
    import threading

    task = build_task(config_lib.get_config("ptunifier_reportgen", "tiny", [f"data.dir={demo_root}"]),
                      log=lambda *_: None)
    assert task.target_tokenizer is not task.tokenizer
    text = "There is a small red circle in the upper left region. A blue square is seen in the lower right region."
    wrong = []

    def run(encode, key, length):
        wrong.extend(len(encode(text)[key]) != length for _ in range(200))

    threads = [threading.Thread(target=run, args=(task.text, "text_ids", task.max_length)),
               threading.Thread(target=run, args=(task.target, "target_ids", task.max_target_len))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert task.max_length != task.max_target_len and not any(wrong)
