"""PyTorch / Hugging Face weights -> medjax params, one CLI for every converter.

    python -m medjax.convert universal --torch clip_driven_universal_swin_unetr.pth --out params/ [--backbone unet]
    python -m medjax.convert uni --torch UNI/pytorch_model.bin --out params/          (UNI or UNI2-h)
    python -m medjax.convert dinov2 --torch teacher_checkpoint.pth --out params/      (a DINOv2 training run)
    python -m medjax.convert export-timm --params runs/uni_vitl16-full --out backbone.safetensors   (-> timm keys)
    python -m medjax.convert visd --torch checkpoint.pth --vqvae checkpoint_vqvae.pth --out params/
    python -m medjax.convert mae --torch mae_pretrain_vit_base.pth --out params/ [--variant full]   (-> fVLM's 3D ViT)
    python -m medjax.convert ptunifier --torch ptunifier.ckpt --out params/           (pretrained or fine-tuned)
    python -m medjax.convert meter meter_clip16_288_roberta_pretrain.ckpt --out params/   (METER -> PTUnifier)
    python -m medjax.convert hf --path clip-vit-base-patch32/ --out params/ [--tower text]
    python -m medjax.convert embed-classes --clip CLIP_DIR --out class_embeddings.npy

Each writes the params with `medjax.checkpoint.save_params(OUT, params)` (read back by
`medjax.checkpoint.restore_params`, `--set init=OUT`, `--params OUT`) and prints the key report: every
missing, unexpected or ignored checkpoint key and every shape mismatch. The Universal Model's frozen class
text embeddings (a buffer, not a param) go to OUT/class_embeddings.npy: `init=OUT` and `medjax.predict --params OUT`
find them there; for `medjax.evaluate` pass `--set model.class_embeddings=OUT/class_embeddings.npy`.

OUT is checked before anything is written (it must not exist, or be an empty directory); everything is
written into a temporary directory beside it that is renamed into place once complete, so a failed or
refused conversion leaves no partial OUT and never touches an existing one (issue #15). Beside the params
goes `medjax_provenance.json` naming the converter and its source (medjax.provenance).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

import numpy as np

from medjax.cli import EXIT_INPUT_ERROR, entry_point, error_line
from medjax.convert.torch_io import KeyReport


def format_report(source: str, report: KeyReport) -> str:
    """The key report as printed lines (missing, unexpected, shape mismatches, ignored)."""
    lines = [f"{source}: " + ("every expected key found with its shape" if report.ok else "key problems:")]
    if report.describe():
        lines.append(report.describe())
    if report.ignored:
        lines.append(f"  ignored ({len(report.ignored)}): {', '.join(report.ignored)}")
    if report.absent:
        lines.append(f"  not in the checkpoint, left to the model's initialisation at --set init= "
                     f"({len(report.absent)}): {', '.join(report.absent)}")
    return "\n".join(lines)


def check_destination(out: str) -> None:
    """Refuse an `--out` that exists (other than an empty directory), before anything is converted."""
    if os.path.lexists(out) and not (os.path.isdir(out) and not os.listdir(out)):
        raise FileExistsError(f"--out {out} already exists; choose another --out or remove it (nothing was written)")


def _universal(args) -> tuple[dict, KeyReport, str]:
    from medjax.convert import universal

    model, variables, report = universal.load_with_report(
        args.torch, args.backbone, norm_groups=args.norm_groups, legacy_merging=not args.fixed_merging,
        allow_missing_head=args.allow_missing_head)
    if "batch_stats" in variables:
        raise ValueError("medjax/convert/__main__.py: running BatchNorm statistics are not written; the converter "
                         "keeps the original's batch-statistics BatchNorm (batch_stats_always=True)")
    constants = variables.get("constants", {})
    if "organ_embedding" in constants:  # written beside the params by main()
        args.extra_files = {"class_embeddings.npy": np.asarray(constants["organ_embedding"], np.float32)}
        return variables["params"], report, (f"\nwrote the class text embeddings {constants['organ_embedding'].shape} "
                                             f"to {os.path.join(args.out, 'class_embeddings.npy')}")
    return variables["params"], report, ""


def _ptunifier(args) -> tuple[dict, KeyReport, str]:
    from medjax.convert import ptunifier

    overrides = {"image_size": args.image_size} if args.image_size else {}
    model, variables, report = ptunifier.load_with_report(args.torch, trust_pickle=args.trust_pickle, **overrides)
    return variables["params"], report, f" (image_size={model.image_size})"


def _meter(args) -> tuple[dict, KeyReport, str]:
    from medjax.convert import meter

    overrides = {"image_size": args.image_size} if args.image_size else {}
    if args.heads:
        overrides |= {f"{part}_heads": args.heads for part in ("vision", "text", "fusion")}
    model, variables, report = meter.load_with_report(args.torch, trust_pickle=args.trust_pickle, **overrides)
    return variables["params"], report, (f" (PTUnifier layout, image_size={model.image_size}; for "
                                         "python -m medjax.train --exp ptunifier --set init=OUT)")


def _uni(args) -> tuple[dict, KeyReport, str]:
    from medjax.convert import uni

    _, variables, report = uni.load_with_report(args.torch)
    return variables["params"], report, ""


def _dinov2(args) -> tuple[dict, KeyReport, str]:
    from medjax.convert import dinov2

    model, variables, report = dinov2.load_with_report(args.torch)
    heads = [name for name in ("dino_head", "ibot_head") if name in variables["params"]]
    return variables["params"], report, (f" (encoder width {model.width}, depth {model.depth}, "
                                         f"{model.num_register_tokens} registers; heads: {', '.join(heads) or 'none'})")


def _export_timm(args) -> int:
    """A trained backbone -> timm keys (medjax.convert.export_timm)."""
    from medjax.convert import export_timm

    try:
        kwargs = export_timm.export(args.params, args.out)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as error:
        print(error_line(error), file=sys.stderr)
        return EXIT_INPUT_ERROR
    shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    print(f"wrote {args.out} (timm VisionTransformer state dict) and {args.out}.timm.json\n"
          f"timm.create_model('vit_large_patch16_224', pretrained=False, {shown})")
    return 0


def _visd(args) -> tuple[dict, KeyReport, str]:
    from medjax.convert import visd

    params, report = visd.load_with_report(args.torch, args.vqvae)
    return params, report, " (the visd task's tree: model, batch_stats, codebook)"


def _mae(args) -> tuple[dict, KeyReport, str]:
    from medjax.convert import mae

    params, report = mae.load_with_report(args.torch, args.variant, args.set)
    return params, report, (f" (fvlm_ctrate {args.variant}'s vision tower; python -m medjax.train --exp fvlm_ctrate "
                            f"--variant {args.variant} --set init={args.out})")


def _hf(args) -> tuple[dict, KeyReport, str]:
    from medjax.convert import hf

    _, variables, report = hf.load_with_report(args.path, args.tower)
    return variables["params"], report, ""


def _embed_classes(args) -> int:
    """The Universal Model's (32, 512) class text embeddings as .npy (not params: written as they are)."""
    from medjax.convert.class_embeddings import embed_class_prompts

    if os.path.lexists(args.out):
        print(f"error: {args.out} already exists; choose another --out or remove it", file=sys.stderr)
        return 1
    try:
        embeddings = embed_class_prompts(args.clip)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    directory = os.path.dirname(os.path.abspath(args.out))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(args.out)}.tmp-")
    try:
        with os.fdopen(fd, "wb") as f:  # a file object: np.save adds no ".npy" to the name
            np.save(f, embeddings)
        os.link(tmp, args.out)  # fails rather than replaces if --out appeared meanwhile
    finally:
        os.remove(tmp)
    norms = np.linalg.norm(embeddings, axis=1)
    print(f"wrote {args.out}: {embeddings.shape} float32, row norms {norms.min():.2f}..{norms.max():.2f}")
    return 0


@entry_point
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medjax.convert", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="kind", required=True)
    p = sub.add_parser("universal", help="CLIP-Driven Universal Model (released .pth or a MONAI SwinUNETR state dict)")
    p.add_argument("--torch", required=True, help="checkpoint file (.pth/.pt via torch.load(weights_only=True))")
    p.add_argument("--out", required=True, help="output directory (must not hold params yet)")
    p.add_argument("--backbone", default="swinunetr", choices=("swinunetr", "unet"))
    p.add_argument("--norm-groups", type=int, default=16, help="GroupNorm groups of precls_conv and GAP")
    p.add_argument("--fixed-merging", action="store_true",
                   help="current MONAI PatchMerging order (default: MONAI 0.9's, which the released weights need)")
    p.add_argument("--allow-missing-head", action="store_true",
                   help="backbone-only checkpoints: initialise the missing head params (listed as missing)")
    p.set_defaults(run=_universal)
    p = sub.add_parser("uni", help="UNI (timm ViT-L/16) weights")
    p.add_argument("--torch", required=True, help="pytorch_model.bin, .safetensors or a directory holding one")
    p.add_argument("--out", required=True)
    p.set_defaults(run=_uni)
    p = sub.add_parser("dinov2", help="a DINOv2 training checkpoint (teacher_checkpoint.pth, model_*.pth, hub backbone)")
    p.add_argument("--torch", required=True, help="teacher_checkpoint.pth ({'teacher': ...}), model_final.pth or a backbone")
    p.add_argument("--out", required=True)
    p.set_defaults(run=_dinov2)
    p = sub.add_parser("export-timm", help="a trained UNI / DINOv2 backbone -> a timm VisionTransformer state dict")
    p.add_argument("--params", required=True, help="a uni_pretrain workdir / checkpoint (teacher) or converted params")
    p.add_argument("--out", required=True, help="output .safetensors (or .bin / .pth with torch)")
    p = sub.add_parser("ptunifier", help="the released PTUnifier Lightning checkpoint (.ckpt)")
    p.add_argument("--torch", required=True, help="the .ckpt (or a plain state dict)")
    p.add_argument("--out", required=True)
    p.add_argument("--image-size", type=int, default=0, help="resize the vision position table to this image size")
    p.add_argument("--trust-pickle", action="store_true",
                   help="torch.load(weights_only=False): only for files from a trusted source")
    p.set_defaults(run=_ptunifier)
    p = sub.add_parser("meter", help="a METER-CLIP16 Lightning checkpoint (.ckpt) -> PTUnifier params (init of pretraining)")
    p.add_argument("checkpoint", nargs="?", default="", help="e.g. meter_clip16_288_roberta_pretrain.ckpt (or --torch)")
    p.add_argument("--torch", default="", help="the same, as the other converters take it")
    p.add_argument("--out", required=True)
    p.add_argument("--image-size", type=int, default=0, help="resize the vision position table to this image size")
    p.add_argument("--heads", type=int, default=0,
                   help="attention heads of the towers and the fusion (weights do not tell; 0 = METER's 12)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="torch.load(weights_only=False): only for files from a trusted source")
    p.set_defaults(run=_meter)
    p = sub.add_parser("visd", help="the released ViSD-Boost checkpoint.pth (+ checkpoint_vqvae.pth)")
    p.add_argument("--torch", required=True, help="checkpoint.pth ({'model': state_dict})")
    p.add_argument("--vqvae", default=None, help="checkpoint_vqvae.pth, loaded first as the original's eval.py does")
    p.add_argument("--out", required=True)
    p.set_defaults(run=_visd)
    p = sub.add_parser("mae", help="a 2D MAE ViT-B .pth ({'model': state_dict}, timm keys) -> fVLM's 3D ViT")
    p.add_argument("--torch", required=True, help="e.g. mae_pretrain_vit_base.pth (or a .safetensors state dict)")
    p.add_argument("--out", required=True)
    p.add_argument("--variant", default="full", help="the fvlm_ctrate variant whose ViT (crop, patch) to fill")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config overrides of that variant, as for medjax.train (e.g. data.crop_shape=...)")
    p.set_defaults(run=_mae)
    p = sub.add_parser("hf", help="a local Hugging Face CLIP / BERT / RoBERTa directory")
    p.add_argument("--path", required=True, help="directory with config.json and the weights")
    p.add_argument("--out", required=True)
    p.add_argument("--tower", default=None, choices=("vision", "text"), help="for a full CLIP directory")
    p.set_defaults(run=_hf)
    p = sub.add_parser("embed-classes", help="the Universal Model's 32 x 512 CLIP text embeddings of its class prompts")
    p.add_argument("--clip", required=True, help="local Hugging Face CLIP directory (model + tokenizer)")
    p.add_argument("--out", required=True, help="output .npy path")
    args = parser.parse_args(argv)
    if args.kind == "meter":
        if bool(args.checkpoint) == bool(args.torch):
            parser.error("meter: give the checkpoint once, as CKPT or --torch CKPT")
        args.torch = args.torch or args.checkpoint
    if args.kind == "embed-classes":
        return _embed_classes(args)
    if args.kind == "export-timm":
        return _export_timm(args)

    source = getattr(args, "torch", None) or args.path
    try:
        check_destination(args.out)
        params, report, extra = args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as error:
        print(error_line(error), file=sys.stderr)
        return EXIT_INPUT_ERROR
    print(format_report(source, report))
    record = {"converted_by": f"python -m medjax.convert {args.kind}", "source": os.path.abspath(source),
              "options": {k: v for k, v in vars(args).items() if k not in ("run", "extra_files", "out", "kind")}}
    out = write_atomically(args.out, params, getattr(args, "extra_files", {}), record)
    print(f"wrote params to {out}{extra}")
    return 0


def write_atomically(out: str, params, extra_files: dict, record: dict) -> str:
    """Params (`save_params`), `extra_files` ({name: array} as .npy) and the provenance `record` written into a
    temporary directory beside `out`, renamed to `out` when complete (an empty `out` directory is replaced)."""
    from medjax.checkpoint import save_params

    out = os.path.abspath(out)
    check_destination(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(out), prefix=f".{os.path.basename(out)}.tmp-")
    try:
        for name, array in extra_files.items():
            np.save(os.path.join(tmp, name), array)
        save_params(tmp, params, provenance=record)
        os.rename(tmp, out)  # atomic; replaces only an empty directory
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


if __name__ == "__main__":
    sys.exit(main())
