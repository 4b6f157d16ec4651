"""How the record is said: the one-line texts of its parts — a count, the labels a mean averages, a budget nothing
fits, the search's model, what an ensemble costs — that the summary's printout, the model cards and the report
all print the same way. Pure functions of the record's dicts: no stage imports another to borrow its words."""

from __future__ import annotations

from .names import bare


def plural(count: int, word: str) -> str:
    """`1 member`, `3 members`: a count and its noun as every printout says them."""
    return f"{count} {word}{'' if count == 1 else 's'}"


def search_model_text(summary: dict) -> str:
    """`the search's model: models:/x/2 (= models:/x/latest), the out-of-fold ensemble …, by …`, or why none."""
    model = summary.get("search_model")
    if model:
        return (f"the search's model: {model['uri']} (models:/{model['name']}/latest), {model['chosen']}; "
                f"chosen as the search's model by {model['by']}")
    ensemble = summary.get("ensemble") or {}
    if ensemble.get("fits") is False:
        return f"no model registered: {no_fit_text(ensemble)}"
    return "no model registered"


def no_fit_text(outcome: dict) -> str:
    """A budget nothing fits, in words: why, the nearest fit and (a search's ensemble) the best single trial, and
    the rule: nothing over the budget is registered."""
    nearest, best = outcome["nearest"], outcome.get("best_single")
    over = ", ".join(f"{k} {v:.3g}" for k, v in nearest.items() if k in outcome["budget"])
    single = f", the best single trial {best['trial']}" if best else ""
    remedy = outcome.get("remedy", "python -m tune_xray.ensemble with a larger --latency-budget / --params-budget "
                                   "chooses one")
    return (f"{outcome['why']}; the nearest is {nearest['trial']} ({over}){single}; a model over the budget is "
            f"not registered as the search's ({remedy})")


def labels_averaged(summary: dict) -> str:
    """`, a mean over 1 of 14 labels`: what the best trial's validation mean AUROC averages ('' for other
    metrics)."""
    k = (summary.get("best") or {}).get("labels_averaged")
    data = summary.get("data") or {}
    if bare(summary["metric"]) != "mean_auroc" or k is None or not data.get("classes"):
        return ""
    if data.get("task") == "binary":
        return f", the AUROC of the positive class, {data['classes'][1]}"
    return f", a mean over {int(k)} of {len(data['classes'])} labels"


def averaged_text(result: dict, classes: int) -> str:
    """`val over 1 of 14 labels, test over 1 of 14 labels`: how many labels each split's mean averages (binary:
    the positive class's AUROC)."""
    if result.get("task") == "multiclass" and classes == 2:
        return f"the AUROC of the positive class, {result['classes'][1]}"
    return ", ".join(f"{split} over {k} of {classes} labels"
                     for split, k in (result.get("labels_averaged") or {}).items())


def cost_lines(cost: dict, compared: bool = True) -> list[str]:
    """The model card's and the printout's lines on what the ensemble costs, and the budget it was held to
    (`compared`: the best single trial and the top-K beside it were held to it too)."""
    units = {"latency_ms": ("ms per image (batch 1)", "ms"), "params_m": ("M parameters", "M")}
    held = "; ".join(f"{name.split('_')[0]} ≤ {value:.3g} {units[name][0]} (its members' measured sum: "
                     f"{cost.get(name + '_sum', float('nan')):.3g} {units[name][1]})"
                     for name, value in cost["budget"].items())
    held += f", the budget being {cost['budget_note']}" if cost.get("budget_note") else ""
    sums = ", ".join(f"{cost[k]:.3g} {unit}" for k, unit in (("latency_ms_sum", "ms"), ("params_m_sum", "M params"),
                                                            ("gflops_sum", "GFLOPs")) if k in cost)
    served = (f"; the ensemble as served measured {cost['served_latency_ms']:.3g} ms per image, one decoded image "
              f"at a time on {cost['device']}" if "served_latency_ms" in cost else "")
    held += "; the best single trial and the top-K it is compared with fit it too" if held and compared else ""
    return [f"- Budget: {held}" if held else "- Budget: none (`--latency-budget MS`, `--params-budget M`)",
            f"- Cost: members' sum {sums or 'not measured'}, "
            f"{cost.get('latency_where', 'each measured in its trial on its device')}{served}"]
