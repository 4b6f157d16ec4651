"""Every shipped study passes its own smoke search end to end, on any machine: `python -m tune_xray.search STUDY
--smoke` exits 0 with nothing failed after the trials (a budget or limit the shipped files give in milliseconds held
on one machine and nothing on a slower one: deploy's smoke budget is relative to the cheapest trial). The CASS study
also runs the steps that broke on its label fractions: repeats, then a 2-fold cross-validation with a label
fraction below 1 (its hidden-label training images among train + val)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

STUDIES = sorted(p.stem for p in (Path(__file__).parents[1] / "search_spaces").glob("*.yaml"))
MORE = {"cass": ["--set", "data.label_fraction=0.1", "--repeats", "1", "--repeat-top", "1", "--cv-folds", "2",
                 "--cv-top", "1"]}


@pytest.mark.parametrize("study", STUDIES)
def test_a_shipped_study_passes_its_own_smoke_search(study, tmp_path):
    done = subprocess.run([sys.executable, "-m", "tune_xray.search", study, "--smoke", "--storage", str(tmp_path),
                           *MORE.get(study, [])], cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / f"{study}-smoke" / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["failed"] == {}
    assert Path(summary["report"]).is_file() and summary["ensemble"]
    if study == "cass":
        cv, sizes = summary["cv"], summary["data"]["images"]
        assert cv["rows"] and cv["rows"][0]["complete"] and summary["repeats"]["rows"]
        # every train + val image once out of fold: the training images whose labels the fraction hid too
        assert cv["oof_ensemble"]["oof_images"] > sizes["train"] + sizes["val"]
