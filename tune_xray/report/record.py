"""What a reader must not miss (the warnings at the top) and the test record, read once after every choice."""

from __future__ import annotations

import html

import pandas as pd

from ..data.sources import describe_untrained
from ..metrics import ci_text
from ..record.names import bare
from ..record.text import averaged_text, no_fit_text, plural
from .common import FEW, html_table


def warnings_of(data: dict) -> list[str]:
    """What a reader must not miss, said at the top, and nothing that is true by construction: the registered model
    at or below chance or below always answering the majority class on test, labels too rare in validation or test
    for their selection and intervals to mean much, bootstrap resamples dropped, an ensemble of several members no
    better than its best, repeats or folds that rank otherwise than the single runs, trials at or below chance,
    intervals wider than the metric's range."""
    summary, out = data["summary"], []
    metric = bare(summary["metric"])
    ensemble = summary.get("ensemble") or {}
    dataset = data.get("dataset") or {}
    out += _record_warnings(ensemble, dataset, metric)
    if ensemble.get("fits") is False:
        out.append(f"No ensemble and no registered model: {no_fit_text(ensemble)}.")
    for split, labels in (dataset.get("few") or {}).items():
        if labels:
            counts = ", ".join(f"{c} {dataset['positives'][split][c]} positive / "
                               f"{dataset['images'][split] - dataset['positives'][split][c]} negative"
                               for c in labels)
            out.append(f"{'Validation' if split == 'val' else 'Test'} holds fewer than {FEW} positives or negatives "
                       f"of {plural(len(labels), 'label')} ({counts}): "
                       + ("the epoch, trial, ensemble and threshold chosen on it are close to chance picks, and its "
                          "intervals wide." if split == "val" else "its test numbers rest on a handful of images."))
    for split, where in (("val", "on validation (the selection set)"), ("test", "on test (the record)")):
        entry = (ensemble.get(split) or {}).get("ensemble_minus_best_single")
        if entry and entry["value"] <= 0 and len(ensemble.get("members") or []) > 1:  # one member: the best itself
            out.append(f"The ensemble of {len(ensemble['members'])} members is not better than its best member "
                       f"{where}: {metric} difference {entry['value']:+.4f} [{entry['ci_low']:+.4f}, "
                       f"{entry['ci_high']:+.4f}].")
    repeats = (summary.get("repeats") or {}).get("rows") or []
    if repeats and summary.get("best") and repeats[0]["name"].split()[0] != summary["best"]["trial"]:
        out.append(f"Over fresh seeds, {repeats[0]['name'].split()[0]} ranks first (mean {repeats[0]['mean']:.4f}), "
                   f"not the single-run winner {summary['best']['trial']}; the best-trial sections below show "
                   f"{summary['best']['trial']}, the search's own pick.")
    chance = 0.5 if metric == "mean_auroc" else None  # AUROC's chance level whatever the prevalence
    if chance is not None:
        below = [r["trial"] for r in summary["rows"] if r["status"] == "complete"
                 and isinstance(r.get(summary["metric"]), (int, float)) and r[summary["metric"]] <= chance]
        if below:
            verb = "scores" if len(below) == 1 else "score"
            out.append(f"{plural(len(below), 'completed trial')} {verb} at or below chance ({metric} ≤ {chance}) on "
                       f"validation: {', '.join(below)}.")
    bounded = metric in ("mean_auroc", "accuracy", "balanced_accuracy", "macro_f1")
    for r in repeats if bounded else ():
        if r["ci_low"] < 0 or r["ci_high"] > 1:
            out.append(f"The repeats' t-interval for {r['name'].split()[0]} is [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
                       f", wider than {metric}'s range [0, 1]: {r['seeds']} seeds are too few to say more than that "
                       "the values vary.")
    cv = (summary.get("cv") or {}).get("rows") or []
    if cv and summary.get("best") and cv[0]["config"] != summary["best"]["trial"]:
        out.append(f"Cross-validated over {summary['cv']['folds']} folds, {cv[0]['config']} ranks first (mean "
                   f"{cv[0]['mean']:.4f}), not the single-split winner {summary['best']['trial']}.")
    cost = ensemble.get("cost") or {}
    bound = (cost.get("budget") or {}).get("latency_ms")
    if bound and cost.get("served_latency_ms", 0) > bound:
        out.append(f"The registered ensemble as served took {cost['served_latency_ms']:.3g} ms per image on "
                   f"{cost['device']}, over its latency budget of {bound:g} ms (the budget holds its members' "
                   f"latencies as measured: {cost.get('latency_ms_sum', float('nan')):.3g} ms).")
    if dataset.get("untrained"):
        out.append(describe_untrained(dataset) + ".")
    absent = dataset.get("absent") or {}
    if absent.get("val"):
        out.append(f"{plural(len(absent['val']), 'label')} {'has' if len(absent['val']) == 1 else 'have'} no positive "
                   f"in validation ({', '.join(absent['val'])}): no threshold is chosen and nothing is decided for "
                   "them, and the validation means leave them out.")
    return out


def _record_warnings(ensemble: dict, dataset: dict, metric: str) -> list[str]:
    """The registered model on test at or below chance (AUROC 0.5; accuracy at or below always answering the most
    frequent class), and the share of bootstrap resamples its intervals dropped."""
    out = []
    test = (ensemble.get("test") or {}).get("ensemble")
    if test and metric == "mean_auroc" and test["value"] <= 0.5:
        out.append(f"The registered model's test {metric} ({test['value']:.4f}) is at or below chance (0.5).")
    accuracy = (((ensemble.get("single_label") or {}).get("test") or {}).get("ensemble") or {}).get("accuracy")
    positives, images = (dataset.get("positives") or {}).get("test"), (dataset.get("images") or {}).get("test")
    if accuracy and positives and images:
        majority, share = max(positives.items(), key=lambda kv: kv[1])
        if accuracy["value"] <= share / images:
            out.append(f"The registered model's test accuracy ({accuracy['value']:.4f}) is at or below answering "
                       f"'{majority}' for every image ({share / images:.4f}): it does not beat the majority class.")
    for split in ("val", "test"):
        record = (ensemble.get(split) or {}).get("ensemble") or {}
        if record.get("dropped"):
            out.append(f"{100 * record['dropped']:.1f} % of the bootstrap resamples of the ensemble's {split} {metric} "
                       "held no positive or no negative of any label, so no value, and were dropped: its interval "
                       "is computed from the others alone.")
    return out


def render_record(summary: dict) -> str:
    """Test metrics: read once, at the search's end, after every choice, never ranked (the ensemble's record)."""
    ensemble = summary.get("ensemble") or {}
    test = ensemble.get("test")
    if not test:
        return ("<p>The test split has not been read for this experiment: the record is made at a search's end, "
                "with its ensemble (<code>python -m tune_xray.ensemble DIR --record</code>).</p>")
    metric = bare(summary["metric"])
    averaged = ensemble.get("labels_averaged") or {}
    out = ("<p>The test split, read for the record after every choice (reads of test for this experiment: "
           f"{ensemble.get('test_reads')}), at thresholds chosen on validation. Nothing here chose anything."
           + (f" {metric}: {averaged_text(ensemble, len(ensemble.get('classes') or []))}."
              if metric == "mean_auroc" and "test" in averaged else "") + "</p>")
    single = (ensemble.get("single_label") or {}).get("test") or {}
    rows = [{"": label.replace("_", " "), f"{metric} [95 % CI]": ci_text(test[label]),
             **{f"{k.replace('_', ' ')} [95 % CI]": ci_text(v) for k, v in (single.get(label) or {}).items()}}
            for label in ("ensemble", "best_single", "top_k", "ensemble_minus_best_single") if label in test]
    out += html_table(pd.DataFrame(rows))
    per_label = ensemble.get("test_per_label") or {}
    labels = [k.removeprefix("auroc/") for k in (per_label.get("ensemble") or {}) if k.startswith("auroc/")]
    if labels:
        who = {"ensemble": "ensemble", "best_single": "best single"}
        table = [{"label": c, **{f"{who[w]} {m} [95 % CI]": ci_text(per_label[w][f"{m}/{c}"])
                                 for w in who for m in ("auroc", "sensitivity", "specificity")
                                 if f"{m}/{c}" in per_label.get(w, {})}} for c in labels]
        out += "<h3>Per label (test)</h3>" + html_table(pd.DataFrame(table))
    out += render_external(summary.get("external") or [], test, metric)
    folded = (summary.get("cv") or {}).get("oof_ensemble")
    if folded and folded.get("fits") is False:
        out += ("<h3>The ensemble chosen out of fold</h3>"
                f"<p>None: {html.escape(no_fit_text(folded))}. Test was not read for it.</p>")
    elif folded:
        chosen = " + ".join(f"{c['weight']:.2g} × {c['config']}" for c in folded["configs"])
        rows = [{"": f"out-of-fold ensemble ({chosen}; {plural(folded['members'], 'fold model')})",
                 "chosen on": f"{folded['oof_images']} out-of-fold images",
                 f"{metric} there [95 % CI]": ci_text(folded["oof"]),
                 f"test {metric} [95 % CI]": ci_text(folded["test"])}]
        if folded.get("minus_search_ensemble"):
            rows += [{"": "the search's ensemble", "chosen on": "the validation split",
                      f"{metric} there [95 % CI]": ci_text(folded.get("search_ensemble_val") or {}),
                      f"test {metric} [95 % CI]": ci_text(folded["search_ensemble_test"])},
                     {"": "out of fold − the search's (paired)", "chosen on": "", f"{metric} there [95 % CI]": "",
                      f"test {metric} [95 % CI]": ci_text(folded["minus_search_ensemble"])}]
        out += ("<h3>The ensemble chosen out of fold, beside the one chosen on validation (test)</h3><p>Test read "
                f"once more, for this comparison (reads of test for this experiment: {folded['test_reads']}). Each "
                "value where it was chosen is on the data that chose it (optimistic)."
                + (f" <b>This is the search's model</b>, chosen so by {html.escape(folded['selected_by'])}."
                   if folded.get("selected_by") else "") + "</p>" + html_table(pd.DataFrame(rows)))
        if "oof_thresholds" in folded:
            voted, averaged = (folded["decisions_test"][k] for k in ("vote", "averaged_oof_thresholds"))
            table = [{"decisions": "each fold model at its own fold's threshold, then their weighted vote (served)",
                      **{f"{k.replace('_', ' ')} [95 % CI]": ci_text(v) for k, v in voted.items()}},
                     {"decisions": "their average at thresholds chosen on the averaged out-of-fold probabilities",
                      **{f"{k.replace('_', ' ')} [95 % CI]": ci_text(v) for k, v in averaged.items()}}]
            out += ("<p>Thresholds: an average of K fold models is narrower than any one of them, so a threshold "
                    "chosen out of fold (on single models' probabilities) sits elsewhere on it; the served ensemble "
                    "applies each fold's threshold to that fold model's own output.</p>"
                    + html_table(pd.DataFrame(table)))
    return out


def render_external(records: list[dict], test: dict, metric: str) -> str:
    """The external record (`--external`), beside the internal one: the search's model on each source from
    elsewhere, labels matched by name; its per-label AUROC, sensitivity and specificity at validation's
    thresholds."""
    if not records:
        return ""
    internal = ci_text(test["ensemble"]) if metric == "mean_auroc" and "ensemble" in test else ""
    rows = [{"source": r["source"], "images (patients)": f"{r['images']:,} ({r['patients']:,})",
             "labels matched": f"{r['mean_auroc_labels']} scored of {len(r['matched'])} matched",
             "mean AUROC [95 % CI]": ci_text(r["mean_auroc"]), "internal test (the ensemble)": internal,
             "test reads": r["test_reads"]} for r in records]
    out = ("<h3>External record: the search's model on data from elsewhere</h3><p>Recorded once per source after "
           "every choice, on the registered model (" + html.escape(records[0]["model"]) + "); labels matched by "
           "name. Nothing here chose anything.</p>" + html_table(pd.DataFrame(rows)))
    for r in records:
        absent = [f"{what}: {', '.join(r[key])}" for what, key in (("not in the source", "absent_in_source"),
                                                                   ("not in the model (or never trained)",
                                                                    "absent_in_model")) if r[key]]
        table = [{"label": label, "positives / negatives": f"{e['positives']} / {e['negatives']}",
                  **{f"{m} [95 % CI]": ci_text(e[m]) for m in ("auroc", "sensitivity", "specificity") if m in e}}
                 for label, e in r["per_label"].items()]
        out += (f"<h4>{html.escape(r['source'])}</h4><p class=note>{html.escape(r['data'])}."
                + "".join(f" {html.escape(a)}." for a in absent) + "</p>" + html_table(pd.DataFrame(table)))
    return out
