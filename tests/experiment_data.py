"""Which test demo each experiment's tiny variant trains on (the `demo_roots` fixture of tests/conftest.py)."""
import os


def make_test_demo(kind: str, out: str) -> str:
    """The tests' small demo of `kind` in `out` (the golden partition specs are made from these too)."""
    if kind == "fundus_genome":
        from medjax.data.demo.fundus_genome import make_fundus_genome_demo

        make_fundus_genome_demo(out, participants=24, image_size=48, num_snps=200, seed=0)
        return out
    if kind == "fundus_transfer":
        from medjax.data.demo.fundus_transfer import make_fundus_transfer_demo

        # RFMiD: enough test images for the demo-learns check (tests/test_train_mrm_transfer.py), drawn at the
        # demo model's 64 px
        return make_fundus_transfer_demo(out, rfmid_images=(64, 16, 48), palm_images=30, image_size=64)
    if kind == "ct":
        from medjax.data.demo.ct import make_ct_demo

        return make_ct_demo(out, cases_per_dataset=2, multi_organ_cases=2, shape=(40, 40, 28), seed=1)
    if kind == "wsi":
        from medjax.data.demo.wsi import make_wsi_demo
        from medjax.data.tiling.coords import list_slides, tile_slides
        from medjax.data.tiling.tissue import PRESETS

        make_wsi_demo(out, num_slides=1, size=1536)
        with open(os.devnull, "w") as quiet:
            tile_slides(list_slides(os.path.join(out, "slides")), os.path.join(out, "coords"), params=PRESETS["demo"],
                        stream=quiet)
        return out
    if kind == "image_report":
        from medjax.data.demo.image_report import make_image_report_demo

        return make_image_report_demo(out, num_images=40, image_size=32)
    if kind == "xray_ct_reports":
        from medjax.data.demo.xray_ct_reports import make_xray_ct_reports_demo

        return make_xray_ct_reports_demo(out, num_xrays=24, num_cts=16, image_size=32, ct_shape=(24, 24, 16))
    if kind == "pathology_chat":
        from medjax.data.demo.pathology_chat import make_pathology_chat_demo

        return make_pathology_chat_demo(out, num_tiles=16, num_eval=4)
    if kind == "ct_reports":
        from medjax.data.demo.ct_reports import make_ct_reports_demo

        return make_ct_reports_demo(out, num_train=8, num_valid=4, shape=(26, 26, 12))
    raise ValueError(f"no test demo of kind {kind!r}")


def tiny_data_overrides(config, root, tmp_dir: str) -> list[str]:
    """`--set` overrides pointing an experiment's tiny variant at the test demo of its data kind."""
    task = config.task
    if task in ("mrm", "mrm_mae", "fundus_classification"):
        return [f"data.dir={os.path.join(root('fundus_genome'), config.data.get('demo_subdir', '') or '')}"]
    if task in ("fundus_multilabel", "fundus_segmentation"):
        return [f"data.dir={os.path.join(root('fundus_transfer'), config.data.demo_subdir)}"]
    if task == "universal":
        return [f"data.dir={root('ct')}", f"data.cache_dir={os.path.join(tmp_dir, 'ct_cache')}"]
    if task == "uni_pretrain":
        return [f"data.dir={root('wsi')}"]
    if task == "ptunifier" or task.startswith("ptunifier_"):  # the fine-tuning tasks read the same demo
        return [f"data.dir={root('image_report')}"]
    if task == "unimedi":
        return [f"data.dir={root('xray_ct_reports')}"]
    if task == "pathchat":
        return [f"data.dir={root('pathology_chat')}"]
    if task in ("fvlm", "visd"):
        return [f"data.dir={root('ct_reports')}"]
    raise ValueError(f"tests/conftest.py: no test data for task {task!r}; add it to tiny_data_overrides")
