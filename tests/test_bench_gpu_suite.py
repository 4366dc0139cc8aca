"""`python -m medjax.bench gpu-suite`: the dry run checks every item against its benchmark's parser and writes
the plan (JSON + markdown); the runner records ok / failed / timeout per item and keeps going."""
import json
import sys

import pytest

from medjax.bench import gpu_suite


def test_dry_run_plans_every_item_within_the_budget(tmp_path):
    gpu_suite.main(["--dry-run", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert [r["name"] for r in report["items"]] == [item.name for item in gpu_suite.ITEMS]
    assert {r["status"] for r in report["items"]} == {"planned"}
    assert sum(item.cap_s for item in gpu_suite.ITEMS) <= 8 * 60  # the device session's 8 minutes
    assert "| relation_mask |" in (tmp_path / "gpu_suite.md").read_text()
    sliding = next(item for item in gpu_suite.with_monai(gpu_suite.ITEMS) if item.name == "sliding_window")
    assert sliding.args[sliding.args.index("--impl") + 1] == "both"


def test_items_are_checked_against_their_parsers():
    bad = gpu_suite.Item("x", "relation_mask", ("--no-such-flag",), 5, "bad")
    with pytest.raises(ValueError, match="item 'x': relation_mask rejects --no-such-flag"):
        gpu_suite.check_item(bad)
    with pytest.raises(ValueError, match="unknown benchmark"):
        gpu_suite.check_item(gpu_suite.Item("y", "nope", (), 5, "bad"))


def test_run_item_records_ok_failure_and_timeout():
    item = gpu_suite.ITEMS[0]
    ok = gpu_suite.run_item(item, 30, [sys.executable, "-c", "print('| a | b |')"])
    assert ok["status"] == "ok" and "| a | b |" in ok["stdout"]
    failed = gpu_suite.run_item(item, 30, [sys.executable, "-c", "import sys; sys.exit(3)"])
    assert failed["status"] == "failed (exit 3)"
    slow = gpu_suite.run_item(item, 1, [sys.executable, "-c", "print('started', flush=True); import time; time.sleep(30)"])
    assert slow["status"] == "timeout (1 s)" and slow["seconds"] < 20
    text = gpu_suite.markdown({"device": "d", "started": "t", "items": [ok, failed, slow]})
    assert "| relation_mask |" in text and "timeout (1 s)" in text and "| a | b |" in text
