"""Ensemble selection on stored predictions (Caruana et al. 2004), its CIs, and the image readers of predict."""

import json

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from tune_xray.ensemble import load_pool, run_ensemble, select
from tune_xray.experiment import Experiment
from tune_xray.metrics import classification_metrics, patient_bootstrap, weighted_mean_auroc
from tune_xray.selection import CaruanaSelector, EnsembleError

CLASSES = ["A", "B"]


def _pool_dir(tmp_path, n=120, seed=0):
    """A search directory with four completed trials: t000 sees label A, t001 sees label B, t002 is noise,
    t003 is mediocre at both. Their mean (t000 + t001) is the best ensemble."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 2)) < 0.4).astype(int)
    noise = lambda: rng.random((n, 2))  # noqa: E731
    probs = {"t000": np.c_[0.8 * y[:, 0] + 0.2 * noise()[:, 0], noise()[:, 1]],
             "t001": np.c_[noise()[:, 0], 0.8 * y[:, 1] + 0.2 * noise()[:, 1]],
             "t002": noise(), "t003": 0.3 * y + 0.7 * noise()}
    rows = []
    for i, (trial, prob) in enumerate(probs.items()):
        directory = tmp_path / f"{trial}-id{i}"
        directory.mkdir()
        for split in ("val", "test"):
            frame = pd.DataFrame({"path": [f"img{j}.png" for j in range(n)], "patient_id": np.arange(n) // 2})
            for j, c in enumerate(CLASSES):
                frame[f"y_{c}"] = y[:, j]
            for j, c in enumerate(CLASSES):
                frame[f"p_{c}"] = prob[:, j]
            frame.to_csv(directory / f"predictions_{split}.csv", index=False)
        (directory / "summary.json").write_text(json.dumps({"classes": CLASSES, "task": "multilabel"}))
        (directory / "config.yaml").write_text(yaml.safe_dump(
            {"supervised": {"selection_metric": "val_mean_auroc", "threshold": "youden"}}))
        rows.append({"trial": trial, "trial_id": f"id{i}", "status": "complete"})
    rows.append({"trial": "t004", "trial_id": "id4", "status": "pruned"})
    (tmp_path / "summary.json").write_text(json.dumps({"rows": rows}))
    return tmp_path


def test_caruana_finds_the_complementary_members_with_replacement(tmp_path):
    pool = load_pool(Experiment.at(_pool_dir(tmp_path)))
    assert [t["trial"] for t in pool.trials] == ["t000", "t001", "t002", "t003"]  # the pruned trial is not in
    weights, how = select(pool, "caruana", size=4, bags=0)
    assert weights[0] > 0 and weights[1] > 0 and weights[2] == 0  # the two specialists, never the noise
    assert how["axis"] == "selections" and not how["bagged"]
    x, score = zip(*how["curve"])
    assert score[x.index(how["chosen"])] == max(score)  # the best prefix is what is returned
    bagged = [select(pool, "caruana", size=4, bags=10, seed=3)[0] for _ in range(2)]
    assert np.array_equal(*bagged) and bagged[0].sum() == pytest.approx(1)  # seeded, deterministic
    best = select(pool, "best")[0]
    assert best.max() == 1.0 and best.sum() == 1.0
    assert np.count_nonzero(select(pool, "topk", size=2)[0]) == 2


def _random_pool(kind: str, rng, n: int = 60, labels: int = 2):
    """Validation probabilities (M, n, labels) of a random library: one dominant model among weak ones, diverse
    specialists, one or two models, tied copies, or noise."""
    y = (rng.random((n, labels)) < 0.4).astype(int)
    y[:2] = [[0] * labels, [1] * labels]  # both classes in every label
    noise = lambda: rng.random((n, labels))  # noqa: E731
    if kind == "dominant":
        probs = [0.1 * y + noise() for _ in range(rng.integers(2, 10))] + [0.7 * y + 0.3 * noise()]
    elif kind == "diverse":
        probs = [np.where(np.arange(labels) == rng.integers(labels), 0.6 * y + 0.4 * noise(), noise())
                 for _ in range(rng.integers(3, 10))]
    elif kind == "tiny":
        probs = [rng.random() * y + noise() for _ in range(rng.integers(1, 3))]
    elif kind == "ties":
        base = [rng.random() * y + noise() for _ in range(rng.integers(1, 4))]
        probs = base * int(rng.integers(2, 4))
    else:
        probs = [noise() for _ in range(rng.integers(2, 10))]
    order = rng.permutation(len(probs))
    return np.stack(probs)[order].clip(0, 1), y


def _auroc(y, p):
    return float(weighted_mean_auroc(y, p, np.ones((1, len(y))))[0])


def _macro_f1(y, p):
    return classification_metrics("multilabel", y, p, ["A", "B"])["metrics"]["macro_f1"]


@pytest.mark.parametrize("scorer, pools", [(_auroc, 100), (_macro_f1, 25)], ids=["mean_auroc", "macro_f1"])
def test_the_ensemble_never_scores_below_its_best_member_on_validation(scorer, pools):
    """Caruana as published (initial size chosen on the hill-climb set, best prefix, bag average kept only if
    not worse): on every random pool the selection itself — before the guard that would return the best single
    model, which must never be needed here — scores at least the best single model's, and so do the weights."""
    rng = np.random.default_rng(0)
    for i in range(pools):
        kind = ("dominant", "diverse", "tiny", "ties", "noise")[i % 5]
        probs, y = _random_pool(kind, rng)
        selector = CaruanaSelector(size=int(rng.integers(1, 8)), bags=int(rng.choice([0, 5, 10])),
                                   seed=i).fit(probs, y, scorer)
        assert selector.weights_.min() >= 0 and selector.weights_.sum() == pytest.approx(1)
        best = max(scorer(y, p) for p in probs)
        assert selector.selection_score_ >= best and not selector.fallback_, f"pool {i} ({kind})"
        score = scorer(y, np.tensordot(selector.weights_, probs, axes=1))
        assert score >= best, f"pool {i} ({kind})"
        assert score == selector.score_


def test_a_pool_too_small_to_bag_is_not_bagged():
    rng = np.random.default_rng(1)
    probs, y = _random_pool("tiny", rng)
    assert not CaruanaSelector(size=5, bags=20).fit(probs, y, _auroc).bagged_  # a bag would hold one model


def _weights(result: dict) -> list:
    return [(m["trial"], m["weight"]) for m in result["members"]]


def test_the_selection_does_not_depend_on_the_order_of_the_summary(tmp_path):
    directory = _pool_dir(tmp_path)
    first = run_ensemble(Experiment.at(directory), size=4, bags=10, resamples=50)
    summary = json.loads((directory / "summary.json").read_text())
    summary["rows"] = summary["rows"][::-1]  # as a resume may leave them
    (directory / "summary.json").write_text(json.dumps(summary))
    second = run_ensemble(Experiment.at(directory), size=4, bags=10, resamples=50)
    assert _weights(first) == _weights(second)


def test_test_labels_never_choose_the_ensemble(tmp_path):
    directory = _pool_dir(tmp_path)
    first = run_ensemble(Experiment.at(directory), size=4, bags=5, resamples=200, read_test=True)
    for trial_dir in directory.glob("t00*"):  # permute the test labels of every trial alike
        frame = pd.read_csv(trial_dir / "predictions_test.csv")
        frame[["y_A", "y_B"]] = frame[["y_A", "y_B"]].to_numpy()[np.random.default_rng(1).permutation(len(frame))]
        frame.to_csv(trial_dir / "predictions_test.csv", index=False)
    second = run_ensemble(Experiment.at(directory), size=4, bags=5, resamples=200, read_test=True)
    assert _weights(first) == _weights(second)
    assert first["val"] == second["val"] and first["test"] != second["test"]
    assert (first["test_reads"], second["test_reads"]) == (1, 2)  # every read of test is counted
    assert first["val"]["ensemble"]["value"] >= first["val"]["best_single"]["value"]
    card = (directory / "ensemble" / "model_card.md").read_text()
    assert "validation mean_auroc only" in card and first["hashes"]["val"] in card


def test_a_rerun_reads_no_test_unless_asked_to_record(tmp_path, capsys):
    from tune_xray.ensemble import main

    directory = _pool_dir(tmp_path)
    for trial_dir in directory.glob("t00*"):
        (trial_dir / "predictions_test.csv").unlink()  # not there: nothing may read it
    assert main([str(directory), "--size", "3", "--resamples", "50", "--tracking-uri", "none"]) == 0
    out = capsys.readouterr().out
    assert "val" in out and "test" not in out.replace("test_reads", "")
    assert not (directory / "test_reads.json").exists()
    assert "the test split was not read" in (directory / "ensemble" / "model_card.md").read_text()


def test_the_record_scores_test_at_thresholds_chosen_on_validation(tmp_path):
    from tune_xray.ensemble import record, select

    directory = _pool_dir(tmp_path)
    for trial_dir in directory.glob("t00*"):
        (trial_dir / "config.yaml").write_text(yaml.safe_dump(
            {"supervised": {"selection_metric": "val_macro_f1", "threshold": "f1"}}))
    pool = load_pool(Experiment.at(directory))
    weights, _ = select(pool, "caruana", size=3, bags=0)
    recorded = record(pool, weights, 2, resamples=20, read_test=True)
    best = int(np.argmax(pool.single))
    val_thresholds = classification_metrics("multilabel", pool.val.y, pool.val.probs[best], CLASSES,
                                            rule="f1")["thresholds"]
    test = pd.read_csv(directory / pool.trials[best]["dir"] / "predictions_test.csv")
    expected = classification_metrics("multilabel", test[["y_A", "y_B"]].to_numpy(), test[["p_A", "p_B"]].to_numpy(),
                                      CLASSES, np.asarray(val_thresholds))["metrics"]["macro_f1"]
    assert recorded["test"]["best_single"]["value"] == pytest.approx(expected)


def test_images_without_patients_are_resampled_one_by_one(tmp_path):
    """Folder and MedMNIST data name no patient: the interval resamples images, never one unit of everything."""
    directory = _pool_dir(tmp_path)
    for path in directory.glob("t00*/predictions_*.csv"):
        frame = pd.read_csv(path)
        frame["patient_id"] = None
        frame.to_csv(path, index=False)
    result = run_ensemble(Experiment.at(directory), size=3, bags=0, resamples=200, read_test=True)
    for split in ("val", "test"):
        entry = result[split]["best_single"]
        assert entry["ci_low"] < entry["value"] < entry["ci_high"]


def test_a_corrupt_summary_or_a_missing_prediction_file_is_one_line(tmp_path, capsys):
    from tune_xray.ensemble import main as ensemble_main
    from tune_xray.repeat import main as repeat_main
    from tune_xray.report import main as report_main

    directory = _pool_dir(tmp_path)
    (directory / "t001-id1" / "predictions_test.csv").unlink()
    assert ensemble_main([str(directory), "--record", "--tracking-uri", "none", "--resamples", "20"]) == 2
    assert "t001-id1/predictions_test.csv: cannot read the trial's test predictions" in capsys.readouterr().err
    (directory / "summary.json").write_text('{"rows": [')  # a copy cut short
    (directory / "search.json").write_text("{}")
    for main in (ensemble_main, report_main, repeat_main):
        assert main([str(directory)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "summary.json: not a search summary" in err and "Traceback" not in err


def test_trials_that_predicted_other_images_are_not_ensembled(tmp_path):
    directory = _pool_dir(tmp_path)
    frame = pd.read_csv(directory / "t002-id2" / "predictions_val.csv")
    frame.loc[0, "path"] = "another.png"
    frame.to_csv(directory / "t002-id2" / "predictions_val.csv", index=False)
    with pytest.raises(EnsembleError, match="t002 predicted other val images than t000"):
        load_pool(Experiment.at(directory))


def test_weighted_auroc_and_the_patient_bootstrap_match_brute_force():
    rng = np.random.default_rng(0)
    y, prob = (rng.random((200, 3)) < 0.3).astype(int), np.round(rng.random((200, 3)), 2)  # ties included
    groups = np.arange(200) // 4
    weights = patient_bootstrap(groups, resamples=20, seed=5)
    assert np.array_equal(weights, patient_bootstrap(groups, resamples=20, seed=5))
    assert all(len(set(w[groups == g])) == 1 for w in weights[:3] for g in range(50))  # a patient moves whole
    fast = weighted_mean_auroc(y, prob, weights)
    for b in range(5):
        rows = np.repeat(np.arange(200), weights[b])
        brute = np.mean([roc_auc_score(y[rows, c], prob[rows, c]) for c in range(3)])
        assert fast[b] == pytest.approx(brute, abs=1e-12)


def _dicom(path, array, photometric="MONOCHROME2"):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta, ds.SOPClassUID = meta, meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.Rows, ds.Columns, ds.SamplesPerPixel = "DX", *array.shape, 1
    ds.PhotometricInterpretation, ds.BitsAllocated, ds.BitsStored, ds.HighBit = photometric, 16, 12, 11
    ds.PixelRepresentation, ds.PixelData = 0, array.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_dicom_reads_any_bit_depth_and_inverts_monochrome1(tmp_path):
    from tune_xray.data.splits import DataError
    from tune_xray.serving import read_image

    ramp = np.tile(np.linspace(0, 4095, 32), (32, 1))
    normal = np.asarray(read_image(_dicom(tmp_path / "a.dcm", ramp)), dtype=int)
    inverted = np.asarray(read_image(_dicom(tmp_path / "b.dcm", ramp, "MONOCHROME1")), dtype=int)
    assert normal.min() == 0 and normal.max() == 255 and np.array_equal(inverted, 255 - normal)
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="notes.txt: not a readable image"):
        read_image(tmp_path / "notes.txt")


def test_dicom_objects_that_are_not_images_say_so(tmp_path):
    import pydicom

    from tune_xray.data.splits import DataError
    from tune_xray.serving import read_image

    seg = pydicom.dcmread(_dicom(tmp_path / "seg.dcm", np.zeros((8, 8))))
    seg.Modality = "SEG"
    seg.save_as(tmp_path / "seg.dcm")
    with pytest.raises(DataError, match=r"seg.dcm: a DICOM SEG object \(a segmentation\), not an image"):
        read_image(tmp_path / "seg.dcm")
    report = pydicom.dcmread(_dicom(tmp_path / "sr.dcm", np.zeros((8, 8))))
    del report.PixelData
    report.Modality = "OT"
    report.save_as(tmp_path / "sr.dcm")
    with pytest.raises(DataError, match="sr.dcm: a DICOM file without pixel data"):
        read_image(tmp_path / "sr.dcm")


def test_single_label_records_accuracy_and_balanced_accuracy_with_intervals(tmp_path):
    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    from tune_xray.metrics import decisions, weighted_decision_metrics

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 60)
    prob = rng.dirichlet(np.ones(3), 60)
    decided = decisions("multiclass", prob)
    point = weighted_decision_metrics(np.eye(3)[y], decided, np.ones(60), True)
    assert point["accuracy"][0] == pytest.approx(accuracy_score(y, prob.argmax(1)))
    assert point["balanced_accuracy"][0] == pytest.approx(balanced_accuracy_score(y, prob.argmax(1)))
    boot = np.random.default_rng(1).integers(0, 3, (5, 60))  # any weighting: resample counts
    rows = np.repeat(np.arange(60), boot[2])
    assert weighted_decision_metrics(np.eye(3)[y], decided, boot, True)["accuracy"][2] == pytest.approx(
        accuracy_score(y[rows], prob[rows].argmax(1)))


def test_a_budget_bounds_the_distinct_members_costs_summed():
    """Under a budget (latency, parameters) the chosen members' costs sum within it on every random pool, the
    result still scores at least the best affordable single model, a model chosen twice costs once, and a
    budget that holds every model chooses as no budget does."""
    rng = np.random.default_rng(3)
    for i in range(30):
        probs, y = _random_pool(("dominant", "diverse", "ties", "noise")[i % 4], rng)
        costs = rng.uniform(1, 10, size=(len(probs), 2))
        budget = np.array([rng.uniform(costs[:, 0].min(), costs[:, 0].sum()), costs[:, 1].sum()])
        selector = CaruanaSelector(size=6, bags=10, seed=i).fit(probs, y, _auroc, costs, budget)
        chosen = selector.weights_ > 0
        assert (costs[chosen].sum(0) <= budget + 1e-9).all(), f"pool {i}"
        affordable = [j for j in range(len(probs)) if (costs[j] <= budget).all()]
        assert selector.score_ >= max(_auroc(y, probs[j]) for j in affordable)
        free = CaruanaSelector(size=6, bags=10, seed=i).fit(probs, y, _auroc, costs, costs.sum(0))
        assert np.allclose(free.weights_, CaruanaSelector(size=6, bags=0, seed=i).fit(probs, y, _auroc).weights_)
    with pytest.raises(ValueError, match="no model fits the budget"):
        CaruanaSelector().fit(probs, y, _auroc, costs, np.zeros(2))


def test_best_and_topk_keep_to_the_budget_and_a_trial_without_its_cost_is_named(tmp_path):
    directory = _pool_dir(tmp_path)
    summary = json.loads((directory / "summary.json").read_text())
    for i, row in enumerate(summary["rows"]):
        row["cost"] = {"latency_ms": [5.0, 1.0, 1.0, 1.0, 1.0][i], "params_m": 2.0}
    (directory / "summary.json").write_text(json.dumps(summary))
    pool = load_pool(Experiment.at(directory))
    weights, _ = select(pool, "topk", size=3, budget={"latency_ms": 2.5})
    kept = [t["trial"] for t, w in zip(pool.trials, weights) if w > 0]
    assert "t000" not in kept and len(kept) == 2  # t000 alone takes 5 ms; two of the 1-ms trials fit 2.5 ms
    weights, _ = select(pool, "best", budget={"params_m": 2.0, "latency_ms": None})
    assert weights.max() == 1
    del summary["rows"][1]["cost"]
    (directory / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(EnsembleError, match="--latency-budget: t001 has no measured latency_ms"):
        run_ensemble(Experiment.at(directory), budget={"latency_ms": 3.0})


def test_under_a_budget_the_record_compares_with_the_best_single_trial_that_fits(tmp_path):
    directory = _pool_dir(tmp_path)
    summary = json.loads((directory / "summary.json").read_text())
    for i, row in enumerate(summary["rows"]):
        row["cost"] = {"latency_ms": [1.0, 1.0, 1.0, 9.0, 1.0][i]}  # t003, mediocre at both labels, is slow
    (directory / "summary.json").write_text(json.dumps(summary))
    pool = load_pool(Experiment.at(directory))
    free = run_ensemble(Experiment.at(directory), size=2, bags=0, resamples=20)
    held = run_ensemble(Experiment.at(directory), size=2, bags=0, resamples=20, budget={"latency_ms": 2.5})
    best_fitting = max((s, t["trial"]) for s, t in zip(pool.single, pool.trials) if t["trial"] != "t003")
    assert held["val"]["best_single"]["value"] == pytest.approx(best_fitting[0])
    assert free["val"]["best_single"]["value"] == pytest.approx(pool.single.max())
    assert all(m["trial"] != "t003" for m in held["members"]) and held["cost"]["latency_ms_sum"] <= 2.5
    assert "fit it too" in (directory / "ensemble" / "model_card.md").read_text()



def test_the_ensemble_step_reads_the_record_and_returns_its_part(tmp_path, capsys):
    """The step as the search runs it (`ensemble.run(experiment, request)`), from a hand-made record, no Ray: the
    budget the study asked for as the record keeps it (`asked`), and one no trial fits (each costs 5 ms here) an
    outcome, said, returned as its part of summary.json with nothing chosen, registered or written."""
    from tune_xray import ensemble
    from tune_xray.record.names import ENSEMBLE_DIR
    from tune_xray.request import SearchRequest

    pool = _pool_dir(tmp_path)
    summary = json.loads((pool / "summary.json").read_text())
    for row in summary["rows"]:
        row["cost"] = {"latency_ms": 5.0, "params_m": 0.1}  # each over the budget alone
    asked = {"limits": {}, "ensemble": {"latency_ms": 1.0, "params_m": None, "latency_x_cheapest": None}}
    Experiment.at(pool).write_summary({**summary, "metric": "best_val_mean_auroc", "best": summary["rows"][0],
                                       "asked": asked})
    request = SearchRequest("byol", ensemble_size=3)
    assert ensemble.wanted(request) and not ensemble.wanted(SearchRequest("byol", no_ensemble=True))
    part = ensemble.run(Experiment.at(pool), request)
    assert part["ensemble_budget"] == {"latency_ms": 1.0} and part["ensemble"]["fits"] is False
    assert "search_model" not in part and part["ensemble"]["registered"] is None
    assert "ensemble: none" in capsys.readouterr().out
    assert not (pool / ENSEMBLE_DIR).exists()
