"""python -m medjax.bench memory --exp NAME [--variant V] [--batch-size B] [--set k=v] [--top N]

The memory plan of one experiment's train step without running it: the step that `python -m medjax.train`
jits (`medjax.trainer.make_train_step`: forward, backward, optimizer update) is lowered and compiled ahead
of time from abstract shapes (`jax.eval_shape` of the task's init and its `init_batch`; no params,
optimizer state or batch is allocated), then reported:

- `compiled.memory_analysis()`: arguments (params + optimizer state + batch), outputs, temporaries and
  the planned peak (arguments + outputs + temporaries - donated aliases on XLA:CPU, whose own peak field
  leaves the temporaries out; the compiler's peak on GPU/TPU), as `medjax.bench._timing.CompiledMemory`;
- the optimized HLO's largest buffers (`largest_buffers`): each instruction's result size with its
  op_name from the source (`jvp(...)`, `transpose(jvp(...))` for the backward pass), the biggest first,
  and the same sizes summed per op_name, which says which layer holds the memory.

Experiments that read files at build time get placeholders that change no shape: `data.dir` is never
read (nothing is loaded), and the Universal Model's word_embedding variant gets a (32, 512) zero
`class_embeddings` file in a temporary directory when none is given.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import re
import tempfile
import time

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
# `%name = f32[1,96,96,96,48]{4,3,2,1,0} op(...)`, tuples skipped (their elements are separate buffers)
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\w+)\[([\d,]*)\][^ ]*\s+([\w\-]+)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_NO_BUFFER = {"parameter", "bitcast", "get-tuple-element", "tuple", "constant"}


@dataclasses.dataclass(frozen=True)
class Buffer:
    """One HLO instruction's result: its name, opcode, shape, bytes and the source op_name (metadata)."""

    name: str
    opcode: str
    shape: str
    bytes: int
    op_name: str


def hlo_buffers(hlo_text: str) -> list[Buffer]:
    """Every array-valued instruction of an HLO module's text (parameters, bitcasts, tuples and constants
    left out: they own no new buffer), largest first."""
    out = []
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if not match or match.group(4) in _NO_BUFFER:
            continue
        name, dtype, dims, opcode = match.groups()
        if dtype not in _DTYPE_BYTES:
            continue
        size = _DTYPE_BYTES[dtype]
        for d in filter(None, dims.split(",")):
            size *= int(d)
        op_name = _OP_NAME.search(line)
        out.append(Buffer(name, opcode, f"{dtype}[{dims}]", size, op_name.group(1) if op_name else ""))
    out.sort(key=lambda b: -b.bytes)
    return out


def layer_of(op_name: str, depth: int = 4) -> str:
    """The module path of an op_name, `jit(train_step)/jvp(UniversalModel)/backbone/decoder1/conv_block/add` ->
    `forward backbone/decoder1/conv_block` (`backward ...` under transpose), at most `depth` module names;
    ops outside any submodule are `(top level)` with their innermost transform, e.g. `(top level) relu/max`."""
    direction = "backward" if "transpose(" in op_name else "forward"
    parts = [p for p in op_name.split("/") if p]
    primitive = parts.pop() if parts and "(" not in parts[-1] else ""
    modules = [p for p in parts if "(" not in p and not p.startswith(("while", "cond", "body"))]
    if modules:
        return f"{direction} {'/'.join(modules[:depth])}"
    inner = next((p[p.index("(") + 1:-1] for p in reversed(parts) if "(" in p and p[p.index("(") + 1:-1]), "")
    label = "/".join(filter(None, (inner, primitive)))
    return f"{direction} (top level){' ' + label if label else ''}"


def buffers_by_layer(buffers: list[Buffer], depth: int = 4) -> list[tuple[str, int, int]]:
    """(layer, summed bytes, count) per `layer_of(op_name)`, largest first: where the step's buffers sit
    (a sum of every buffer, not a peak: XLA reuses memory between buffers that are not live together)."""
    total, count = collections.Counter(), collections.Counter()
    for b in buffers:
        key = layer_of(b.op_name, depth)
        total[key] += b.bytes
        count[key] += 1
    return [(key, total[key], count[key]) for key, _ in total.most_common()]


def placeholder_overrides(config, directory: str) -> list[str]:
    """--set overrides that let an experiment's task be built without its input files (module docstring)."""
    model = config.get("model")
    overrides = []
    if model is not None and model.get("encoding") == "word_embedding" and "class_embeddings" in model \
            and not model.class_embeddings:
        import numpy as np

        path = os.path.join(directory, "class_embeddings.npy")
        np.save(path, np.zeros((int(model.get("num_classes", 32)), 512), np.float32))
        overrides.append(f"model.class_embeddings={path}")
    if "dir" in config.data and not config.data.dir:
        overrides.append(f"data.dir={directory}")
    if config.get("task") == "pathchat" and not config.data.tokenizer and not config.data.dir:
        # PathChat reads its tokenizer at build time (the <image> id): a small local one; the LLM's vocab_size stays
        from medjax.data.demo.pathology_chat import train_tokenizer
        from medjax.tasks.pathchat_data import template_fixed_texts

        train_tokenizer(template_fixed_texts(), directory, vocab_size=300)
        overrides.append(f"data.tokenizer={os.path.join(directory, 'tokenizer')}")
    if config.get("task") in ("fvlm", "visd") and not config.data.tokenizer and not model.get("init_text"):
        # fVLM / ViSD read <data.dir>/tokenizer at build time: a small local one; the scratch text tower takes
        # CXR-BERT's vocabulary size (30522), so the param count is the paper's
        from medjax.data.demo.image_report import train_tokenizer

        train_tokenizer(["no acute findings.", "the liver is normal."], os.path.join(directory, "tokenizer"),
                        vocab_size=300)
        if not int(model.get("vocab_size", 0)):
            overrides.append("model.vocab_size=30522")
    return overrides


def config_with_placeholders(exp: str, variant: str, overrides: list[str], directory: str):
    """The experiment's config with `overrides`, plus the `placeholder_overrides` (files made in `directory`) for
    the keys `overrides` leave unset."""
    from medjax import config as config_lib

    config = config_lib.get_config(exp, variant, overrides)
    extra = [o for o in placeholder_overrides(config, directory)
             if not any(given.startswith(o.split("=")[0] + "=") for given in overrides)]
    return config_lib.get_config(exp, variant, overrides + extra) if extra else config


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """The ahead-of-time plan of one train step: the compiled program, its compile seconds, XLA's per-device
    memory plan, the number of params and the mesh shape it was compiled for."""

    compiled: object
    seconds: float
    memory: object  # medjax.bench._timing.CompiledMemory | None
    params: int
    mesh: dict


def state_bytes_per_device(config) -> tuple[int, int]:
    """(params, bytes of one device's shard of params + optimizer state) from abstract shapes (`jax.eval_shape`:
    nothing allocated, nothing compiled): the least a train step needs on each device, activations not counted."""
    import jax
    import numpy as np

    from medjax.parallel import mesh as mesh_lib
    from medjax.parallel import rules as rules_lib
    from medjax.tasks import build_task
    from medjax.train_state import abstract_sharded_state

    task = build_task(config, log=lambda *_: None)
    mesh = mesh_lib.make_mesh(config.mesh)
    tx, _ = task.make_optimizer(int(config.train.steps))
    state, _ = abstract_sharded_state(task.init_params, tx, jax.random.PRNGKey(int(config.seed)), mesh,
                                      rules_lib.logical_rules(config.mesh.rules))
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
    shard = sum(int(np.prod(x.sharding.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
                for x in jax.tree.leaves(state) if getattr(x, "sharding", None) is not None)
    return params, shard


def available_bytes_per_device(device) -> int | None:
    """Memory one device can use: its allocator's limit on GPU/TPU; on CPU the host's MemAvailable shared by the
    host's devices (fake CPU devices share one RAM); None where unknown."""
    import jax

    if device.platform == "cpu":
        try:
            with open("/proc/meminfo") as f:
                fields = dict(line.split(":", 1) for line in f)
            return int(fields["MemAvailable"].split()[0]) * 1024 // max(1, jax.local_device_count())
        except (OSError, KeyError, ValueError):
            return None
    try:
        return int((device.memory_stats() or {}).get("bytes_limit", 0)) or None
    except Exception:  # backends without memory_stats
        return None


def plan_train_step(config):
    """(compiled train step, compile seconds, CompiledMemory) lowered from abstract state and batch."""
    plan = plan_step(config)
    return plan.compiled, plan.seconds, plan.memory


def plan_step(config) -> StepPlan:
    """The train step lowered and compiled from abstract state and batch (nothing allocated): a StepPlan."""
    import flax.linen as nn
    import jax
    import numpy as np

    from medjax.bench import _timing
    from medjax.parallel import mesh as mesh_lib
    from medjax.parallel import rules as rules_lib
    from medjax.tasks import build_task
    from medjax.train_state import abstract_sharded_state
    from medjax.trainer import make_train_step

    task = build_task(config, log=lambda *_: None)
    mesh = mesh_lib.make_mesh(config.mesh)
    rules = rules_lib.logical_rules(config.mesh.rules)
    tx, schedule = task.make_optimizer(int(config.train.steps))
    state, state_shardings = abstract_sharded_state(task.init_params, tx, jax.random.PRNGKey(int(config.seed)),
                                                    mesh, rules)
    batch_sharding = mesh_lib.batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype, sharding=batch_sharding)
             for k, v in task.init_batch().items()}
    step = jax.jit(make_train_step(task, tx, schedule, int(config.train.grad_accum)),
                   in_shardings=(state_shardings, batch_sharding),
                   out_shardings=(state_shardings, mesh_lib.replicated(mesh)), donate_argnums=0)
    start = time.perf_counter()
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        compiled = step.lower(state, batch).compile()
    seconds = time.perf_counter() - start
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
    return StepPlan(compiled, seconds, _timing.memory_of(compiled), params, dict(mesh.shape))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m medjax.bench memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exp", required=True)
    p.add_argument("--variant", default="full")
    p.add_argument("--batch-size", type=int, default=None, help="override train.batch_size")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--top", type=int, default=15, help="largest buffers and layers to list")
    p.add_argument("--depth", type=int, default=4, help="module names kept per layer in the per-layer sums")
    args = p.parse_args(argv)

    from medjax.bench import _timing

    overrides = list(args.overrides)
    if args.batch_size:
        overrides.append(f"train.batch_size={args.batch_size}")
    with tempfile.TemporaryDirectory() as directory:
        config = config_with_placeholders(args.exp, args.variant, overrides, directory)
        compiled, seconds, memory = plan_train_step(config)
    print(f"memory plan: {args.exp} ({config.variant}), batch {config.train.batch_size}, dtype {config.dtype}"
          f"{' ' + ' '.join(overrides) if overrides else ''}; compile {seconds:.1f} s")
    print(f"compiled: {memory.describe() if memory else 'not reported by this backend'}")
    buffers = hlo_buffers(compiled.as_text())
    print(f"\nlargest buffers of the optimized HLO ({len(buffers)} array results, "
          f"{_timing.mib(sum(b.bytes for b in buffers))} summed):")
    print(_timing.markdown_table(("MiB", "shape", "opcode", "layer", "op_name"), [
        (f"{b.bytes / 2**20:.1f}", b.shape, b.opcode, layer_of(b.op_name, args.depth), b.op_name[-90:] or "-")
        for b in buffers[:args.top]]))
    print("\nbuffers summed per layer (not live at once):")
    print(_timing.markdown_table(("MiB", "buffers", "layer"), [
        (f"{total / 2**20:.1f}", count, layer) for layer, total, count in buffers_by_layer(buffers, args.depth)[:args.top]]))
