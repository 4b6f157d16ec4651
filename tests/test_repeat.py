"""The repeats' verdict: a hierarchical bootstrap over seeds, then patients."""

import numpy as np
import pandas as pd

from tune_xray.repeat import compare


def _predictions(directory, y, prob):
    directory.mkdir()
    frame = pd.DataFrame({"path": [f"img{j}.png" for j in range(len(y))], "patient_id": np.arange(len(y)) // 2,
                          "y_A": y, "p_A": prob})
    frame.to_csv(directory / "predictions_val.csv", index=False)
    return directory


def test_the_verdict_resamples_seeds_as_well_as_patients(tmp_path):
    """Two seeds of the best that disagree widely (one far better than the other, one far worse): the difference
    of the means is small, and its interval must show the seeds' spread, not only the patients'."""
    rng = np.random.default_rng(0)
    y = (rng.random(400) < 0.5).astype(int)
    signal = lambda strength: np.clip(strength * y + rng.random(400), 0, None) / (1 + strength)  # noqa: E731
    best = [_predictions(tmp_path / f"best{i}", y, signal(s)) for i, s in enumerate((3.0, 0.2))]
    other = [_predictions(tmp_path / f"other{i}", y, signal(s)) for i, s in enumerate((0.9, 0.9))]
    (verdict,) = compare({"best": best, "other": other}, "best", "multilabel", "val_mean_auroc", ["A"], "youden",
                         resamples=400)
    seed_differences = []  # what each seed pair alone says
    from tune_xray.experiment import read_predictions
    from tune_xray.metrics import split_scorer
    score = split_scorer(y[:, None], "multilabel", "val_mean_auroc", ["A"], "youden")
    for a, b in zip(best, other):
        seed_differences.append(score(read_predictions(a, "val", ["A"])[3])[0]
                                - score(read_predictions(b, "val", ["A"])[3])[0])
    assert min(seed_differences) < 0 < max(seed_differences)
    assert verdict["within_noise"] and verdict["ci_low"] <= min(seed_differences) / 2
    assert verdict["ci_high"] >= max(seed_differences) / 2
