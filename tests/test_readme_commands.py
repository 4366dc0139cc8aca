"""Every `python -m medjax...` command in README.md's bash blocks is checked as written (issue #23: the README's
fine-tune command crashed on the demo): its flags parse, its experiment, variant and `--set` keys build a config,
and the fine-tune command's data runs (a global batch from a training set smaller than one batch). Parsed from
the README itself, so the README cannot drift from the code. Training itself is covered by tests/test_train_*.py
(tiny variants); nothing here compiles."""
from __future__ import annotations

import contextlib
import io
import os
import re
import shlex

import pytest

from medjax import config as config_lib

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def readme_commands() -> list[tuple[str, list[str]]]:
    """(module, argv) of every `python -m medjax.*` command in the README's ```bash blocks: continuation lines
    joined, `&&` chains split, comments dropped; `a|b|c` alternatives and `[--flag]` optionals expanded."""
    text = open(README, encoding="utf-8").read()
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            chain = [[]]
            for token in shlex.split(line, comments=True):
                chain.append([]) if token == "&&" else chain[-1].append(token)
            for words in chain:
                if "-m" not in words[:-1] or not words[words.index("-m") + 1].startswith("medjax."):
                    continue
                at = words.index("-m")
                module = words[at + 1]
                argv = [w[1:-1] if w.startswith("[-") and w.endswith("]") else w for w in words[at + 2:] if w != "..."]
                alternatives = [w for w in argv if "|" in w and not w.startswith("-")]
                for choice in (alternatives[0].split("|") if alternatives else [None]):
                    found.append((module, [choice if w == alternatives[0] else w for w in argv] if choice else argv))
    return found


COMMANDS = readme_commands()


def test_the_readme_lists_the_commands_a_user_runs():
    modules = {m for m, _ in COMMANDS}
    assert {"medjax.train", "medjax.evaluate", "medjax.predict", "medjax.convert", "medjax.data",
            "medjax.bench", "medjax.generate"} <= modules
    fine_tune = [a for m, a in COMMANDS if m == "medjax.train" and "mrm_aptos" in a and "data.label_fraction=0.1" in a]
    assert fine_tune and "--variant" in fine_tune[0]
    assert any(m == "medjax.predict" and "runs/universal_swin-demo" in a for m, a in COMMANDS)  # a demo predict


def _overrides(args) -> list[str]:
    return list(args.overrides) + ([f"data.dir={args.data}"] if getattr(args, "data", None) else [])


def _help_text(main, argv) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 0
    return out.getvalue()


def _placeholder(exp: str) -> bool:
    return exp.isupper()  # `--exp NAME`


@pytest.mark.parametrize("module,argv", COMMANDS, ids=[" ".join([m] + a)[:90] for m, a in COMMANDS])
def test_readme_command_parses_and_builds_its_config(module, argv):
    if module == "medjax.train":
        from medjax import train

        args = train.build_parser().parse_args(argv)
        variant = train.resolve_variant(args.exp, args.variant, args.data)
        config = config_lib.get_config(args.exp, variant, _overrides(args))
        assert config.exp == args.exp and config.variant == (variant or "full")
    elif module in ("medjax.evaluate", "medjax.predict"):
        from medjax import evaluate, predict

        args = (evaluate if module == "medjax.evaluate" else predict).build_parser().parse_args(argv)
        where = getattr(args, "checkpoint", None) or [args.params]
        # the variant evaluate / predict read from a training workdir's config.json: the README's runs/<exp>-demo
        variant = args.variant or ("demo" if any(w.rstrip("/").endswith("-demo") for w in where) else None)
        config_lib.get_config(args.exp, variant, _overrides(args))
    elif module == "medjax.generate":
        from medjax import generate

        args = generate.build_parser().parse_args(argv)
        config = config_lib.get_config(args.exp, "demo" if args.params.rstrip("/").endswith("-demo") else None,
                                       list(args.overrides))
        assert config.task == "pathchat"
    elif module == "medjax.data":
        from medjax.data.__main__ import build_parser

        build_parser().parse_args(argv)
    elif module == "medjax.extract":
        from medjax import extract

        args = extract.build_parser().parse_args(argv)
        config_lib.get_config(args.exp, args.variant, list(args.overrides))
    elif module in ("medjax.convert", "medjax.bench"):
        from medjax.bench.__main__ import main as bench_main
        from medjax.convert.__main__ import main as convert_main

        main = convert_main if module == "medjax.convert" else bench_main
        text = _help_text(main, [argv[0], "--help"])
        for flag in (w.split("=")[0] for w in argv[1:] if w.startswith("--")):
            assert flag in text, f"README: {module} {argv[0]} has no flag {flag}"
        if "--exp" in argv and not _placeholder(argv[argv.index("--exp") + 1]):
            exp = argv[argv.index("--exp") + 1]
            config_lib.get_config(exp, argv[argv.index("--variant") + 1] if "--variant" in argv else None)
    else:
        pytest.fail(f"README: unknown module {module}")


def test_readme_fine_tune_on_ten_percent_feeds_full_batches(fundus_demo, tmp_path):
    """The README's `mrm_aptos ... data.label_fraction=0.1 --variant demo` crashed: 12 images, fewer than one
    global batch of 32. Its training data now gives full batches (the subset repeated); `evaluate` does not
    report the training subset (it printed label_fraction=1.0 for a 10% checkpoint)."""
    from medjax import train
    from medjax.tasks import build_task
    from medjax.tasks.base import RunSettings

    argv = next(a for m, a in COMMANDS if m == "medjax.train" and "data.label_fraction=0.1" in a)
    args = train.build_parser().parse_args(argv)
    overrides = [o for o in args.overrides if not o.startswith("init=")]  # init= is the trainer's (tested there)
    overrides += [f"data.dir={os.path.join(fundus_demo, 'aptos')}", "data.verify=none"]
    config = config_lib.get_config(args.exp, args.variant, overrides)
    said = []
    task = build_task(config, log=said.append, run=RunSettings.from_config(config, workdir=str(tmp_path)))
    assert not any("fine-tuning on" in s for s in said)  # what evaluate builds says nothing about training
    batch = next(iter(task.train_data()))
    assert len(task.train_set) < config.train.batch_size == batch["image"].shape[0] == 32
    assert set(batch["label"].tolist()) <= set(int(task.train_set[i]["label"]) for i in range(len(task.train_set)))
    assert said[-1] == f"fine-tuning on {len(task.train_set)} of {task._train_size} labelled training images " \
                       "(data.label_fraction=0.1)"
