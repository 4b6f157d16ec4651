"""Search-space files (search_spaces/*.yaml) → a validated `SearchSpace` → an Optuna define-by-run function.

A file states the objective, the budget, fixed settings, the parameters and optional warm-start points:

    metric: val_mean_auroc          # default; always a validation metric
    mode: max
    budget: {trials: 40, epochs: 100, grace_period: 5}
    base: {byol: {enabled: true}}   # fixed TrialConfig values
    params:
      byol.optimizer.name: {choice: [sgd, adamw, lars]}
      byol.optimizer.lr:             # conditional: a range per optimizer
        by: byol.optimizer.name
        cases: {sgd: {loguniform: [0.01, 0.2]}, adamw: {loguniform: [1.0e-4, 3.0e-3]}, lars: {value: 0.2}}
      byol.scheduler.t_max: {choice: [250, 500], when: {byol.scheduler.name: cosine}}
      augment.brightness: {choice: {"off": null, "0.8-1.2": [0.8, 1.2]}}   # labelled choices
    warm_start: [{byol.optimizer.name: lars, ...}]
    smoke: {budget: {trials: 6, epochs: 3}, set: {data.cache_size: 64}, scale: {byol.batch_size: 0.125}}
    ensemble: {latency_ms: 20, select_on: val}   # the final ensemble: its budget (members' measured latencies
                                                 # summed; or latency_x_cheapest: 2.5, relative to the cheapest
                                                 # completed trial), chosen on val or, with --cv-folds, out of fold
    sampler: {multivariate: true, constant_liar: true, n_startup_trials: 10}   # Optuna TPE options (default off)
    objectives: {val_mean_auroc: max, latency_ms: min}   # accuracy against cost: a Pareto search (see below)
    limits: {latency_ms: 25}        # hard limits: over one, infeasible (params_m, gflops: at epoch 1; latency_ms:
                                    # judged after the trials, each model measured alone)

`objectives:` names the validation metric first, then any of what a trial measures of its model (`COSTS`:
latency per image at batch 1, parameters, GFLOPs), each max or min. With more than one, Optuna searches
multi-objective (TPE, or `sampler: {name: nsga2}`), ASHA promotes by non-dominated sorting on all of them
(multi-objective ASHA; `--asha-on metric`: on the validation metric alone), and the
search ends with its Pareto front. One objective (or none: `metric`/`mode`) is the single-objective search.

`--smoke` shrinks the run, not the space: every drawn backbone becomes its family's tiny test model
(`smoke_backbone`), `scale` multiplies sizes so that distinct drawn values stay distinct, `set` fixes the rest.

Every parameter value is checked against the TrialConfig schema before anything runs, so a typo, unknown
key, empty choice, inverted range or out-of-range value is one error naming the file and the key.
A `cases` branch is its own Optuna parameter (`key:case`): TPE then never sees one name change its
distribution between trials (Optuna refuses that for categoricals).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .config import (
    ConfigError,
    TrialConfig,
    build_config,
    format_validation_errors,
    merge,
    metric_mode,
    nest,
    parse_overrides,
    positive_limits,
)
from .record.names import COSTS

SEARCH_SPACES = Path(__file__).resolve().parent.parent / "search_spaces"
METRICS = ("val_mean_auroc", "val_loss", "val_accuracy", "val_macro_f1")
Scalar = Union[None, bool, int, float, str]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ParamSpec(_Strict):
    """Exactly one of: choice, uniform, loguniform, int, value, or by + cases; optionally `when`."""

    choice: Optional[Union[list[Scalar], dict[str, Any]]] = None
    uniform: Optional[tuple[float, float]] = None
    loguniform: Optional[tuple[float, float]] = None
    integer: Optional[tuple[int, int]] = Field(None, alias="int")
    value: Any = None
    by: Optional[str] = None
    cases: Optional[dict[str, "ParamSpec"]] = None
    when: Optional[dict[str, Union[Scalar, list[Scalar]]]] = None

    @model_validator(mode="before")
    @classmethod
    def _one_kind(cls, data):
        if isinstance(data, dict):
            kinds = [k for k in ("choice", "uniform", "loguniform", "int", "value", "cases") if k in data]
            if len(kinds) != 1:
                raise ValueError("give exactly one of choice, uniform, loguniform, int, value, or by + cases; "
                                 f"got {kinds or 'none'}")
            if ("by" in data) != ("cases" in data):
                raise ValueError("'by' and 'cases' go together")
        return data

    @model_validator(mode="after")
    def _ranges(self):
        if self.choice is not None and len(self.choice) == 0:
            raise ValueError("choice is empty")
        for name in ("uniform", "loguniform", "integer"):
            r = getattr(self, name)
            if r is not None and not r[0] < r[1]:
                label = "int" if name == "integer" else name
                raise ValueError(f"{label} range [{r[0]}, {r[1]}] is empty or inverted (need low < high)")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform needs low > 0, got {self.loguniform[0]}")
        if self.cases is not None and not self.cases:
            raise ValueError("cases is empty")
        return self

    @property
    def kind(self) -> str:
        for name in ("choice", "uniform", "loguniform", "integer", "cases"):
            if getattr(self, name) is not None:
                return name
        return "value"

    def candidate_values(self) -> list:
        """Values to validate against the schema: every choice, or a range's ends."""
        if self.choice is not None:
            return list(self.choice.values()) if isinstance(self.choice, dict) else list(self.choice)
        for name in ("uniform", "loguniform", "integer"):
            if getattr(self, name) is not None:
                return list(getattr(self, name))
        return [self.value]


class Budget(_Strict):
    trials: int = Field(20, ge=1)
    epochs: int = Field(20, ge=1, description="supervised epochs: ASHA's max_t in epochs_done")
    grace_period: int = Field(2, ge=1, description="ASHA: epochs before a trial can be stopped")
    reduction_factor: int = Field(3, ge=2)
    ssl_grace_period: Optional[int] = Field(
        None, ge=1, description="ASHA through the SSL phase: rungs at ssl_grace_period·η^k SSL epochs, judged on "
        "the representation probe (phases.probe) among the trials at the same rung; unset: the SSL phase runs "
        "whole, as before")
    ssl_reduction_factor: Optional[int] = Field(None, ge=2, description="η of the SSL rungs (unset: "
                                                "reduction_factor)")


class Sampler(_Strict):
    """Optuna's sampler (`sampler:` in the file): TPE (default; multi-objective TPE with several objectives) or
    NSGA-II (Deb et al. 2002), Optuna's genetic multi-objective sampler. TPE's options: multivariate models the
    parameters jointly; constant_liar lets parallel trials not all propose the same region while others run (both
    Optuna's, off by default). NSGA-II's: its generation's size."""

    name: Literal["tpe", "nsga2"] = "tpe"
    multivariate: bool = False
    constant_liar: bool = False
    n_startup_trials: int = Field(10, ge=1, description="random trials before TPE models the results")
    population_size: int = Field(50, ge=2, description="NSGA-II: trials per generation")

    @model_validator(mode="after")
    def _options_of(self):
        own = {"tpe": {"multivariate", "constant_liar", "n_startup_trials"}, "nsga2": {"population_size"}}
        foreign = sorted((self.model_fields_set - {"name"}) - own[self.name])
        if foreign:
            raise ValueError(f"{foreign} are not options of the {self.name} sampler (its options: "
                             f"{sorted(own[self.name])})")
        return self

    def options(self) -> dict:
        """The keyword arguments of the chosen Optuna sampler."""
        if self.name == "nsga2":
            return {"population_size": self.population_size}
        return self.model_dump(include={"multivariate", "constant_liar", "n_startup_trials"})


class EnsembleBudget(_Strict):
    """The ensemble chosen at the search's end (`ensemble:` in the file): what it may cost (--latency-budget and
    --params-budget override it) — its distinct members' measured latencies (ms per image, batch 1) and
    parameters (M) summed — and what it is chosen on: `val`, the search's validation split, or `oof`, the
    cross-validation's out-of-fold predictions (with --cv-folds; that ensemble becomes the search's model)."""

    latency_ms: Optional[float] = Field(None, gt=0)
    params_m: Optional[float] = Field(None, gt=0)
    # the latency budget as a multiple of the cheapest completed trial's, measured again alone after the trials: a
    # budget that holds the same models on any machine (a smoke run's: test models cost other milliseconds on every
    # CPU, and a budget in ms passed on one machine and held no model on a slower one)
    latency_x_cheapest: Optional[float] = Field(None, ge=1)
    select_on: Literal["val", "oof"] = "val"

    @model_validator(mode="after")
    def _one_latency(self):
        if self.latency_ms is not None and self.latency_x_cheapest is not None:
            raise ValueError("latency_ms and latency_x_cheapest: one latency budget, in ms or relative to the "
                             "cheapest completed trial")
        return self


class Smoke(_Strict):
    """`--smoke`: the same space at tiny scale: budget, fixed small values (`set`), sizes multiplied by a factor
    (`scale`, so two drawn batch sizes or widths stay two), and each backbone its family's test model."""

    budget: Budget = Budget(trials=4, epochs=2, grace_period=1)
    ensemble: Optional[EnsembleBudget] = None  # test models on a CPU cost other milliseconds than the study's
    limits: Optional[dict[Literal[COSTS], float]] = None  # type: ignore[valid-type]  # likewise

    @field_validator("limits")
    @classmethod
    def _limits(cls, limits: Optional[dict]) -> Optional[dict]:
        return limits if limits is None else positive_limits(limits)
    set: dict[str, Any] = {}
    scale: dict[str, float] = {}

    @model_validator(mode="after")
    def _factors(self):
        for key, factor in self.scale.items():
            if not 0 < factor <= 1:
                raise ValueError(f"scale.{key}: a factor in (0, 1] shrinks a size, got {factor}")
        return self


# timm name prefixes → the tiny test model of the family a smoke search trains instead (ours included), so
# a smoke search runs the code paths the full study will: tokens vs feature maps, fixed input sizes, SSM scans.
# Swin, CoAtNet and MaxViT (windowed / relative-position attention) → test_vit_relpos, a relative-position
# transformer that takes any input size (timm's test_coatnet / test_maxvit need multiples of 32 px)
SMOKE_BACKBONES = (
    (("mambavision",), "test_mambavision"), (("vmamba",), "test_vmamba"), (("mambaout",), "test_mambaout"),
    (("convnext",), "test_convnext"), (("swin", "coatnet", "coatnext", "maxvit", "maxxvit"), "test_vit_relpos"),
    (("vit", "deit", "eva", "beit"), "test_vit"),
    (("efficientnet", "tf_efficientnet", "mobilenet", "tf_mobilenet"), "test_efficientnet"),
    (("nfnet", "dm_nfnet", "eca_nfnet"), "test_nfnet"),
)
BACKBONE_KEYS = ("model.backbone", "cass.cnn", "cass.transformer")


def smoke_backbone(name: str) -> str:
    """The test model of `name`'s family (ResNet's for any other CNN: DenseNet, ResNet, RegNet, ...)."""
    if name.startswith("test_"):
        return name
    return next((test for prefixes, test in SMOKE_BACKBONES if name.startswith(prefixes)), "test_resnet")


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` → `{"a.b": 1}` (the inverse of config.nest)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class SearchSpace(_Strict):
    description: str = ""
    metric: Literal[METRICS] = "val_mean_auroc"  # type: ignore[valid-type]
    mode: Optional[Literal["max", "min"]] = None
    budget: Budget = Budget()
    base: dict[str, Any] = {}
    params: dict[str, ParamSpec]
    warm_start: list[dict[str, Any]] = []
    smoke: Smoke = Smoke()
    sampler: Sampler = Sampler()
    objectives: dict[str, Literal["max", "min"]] = {}
    ensemble: EnsembleBudget = EnsembleBudget()
    limits: dict[Literal[COSTS], float] = {}  # type: ignore[valid-type]

    @field_validator("limits")
    @classmethod
    def _limits(cls, limits: dict) -> dict:
        return positive_limits(limits)

    @model_validator(mode="after")
    def _mode(self):
        if self.objectives:
            names = list(self.objectives)
            metrics = [n for n in names if n in METRICS]
            unknown = [n for n in names if n not in METRICS and n not in COSTS]
            if unknown:
                raise ValueError(f"objectives: {unknown} unknown; expected a validation metric {list(METRICS)} "
                                 f"first, then any of {list(COSTS)}")
            if metrics != names[:1]:
                raise ValueError(f"objectives: the first objective is the validation metric (one of "
                                 f"{list(METRICS)}), the others costs {list(COSTS)}; got {names}")
            for key, given in (("metric", self.metric), ("mode", self.mode)):
                wanted = names[0] if key == "metric" else self.objectives[names[0]]
                if key in self.model_fields_set and given != wanted:
                    raise ValueError(f"{key}: {given} contradicts objectives' first ({names[0]}: "
                                     f"{self.objectives[names[0]]}); give one of them")
            self.metric, self.mode = names[0], self.objectives[names[0]]
        self.mode = self.mode or metric_mode(self.metric)
        return self


def _matches(values: dict, when: Optional[dict]) -> bool:
    if not when:
        return True
    return all(values.get(k) in (v if isinstance(v, list) else [v]) for k, v in when.items())


def case_key(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


class Study:
    """A loaded, validated search space with what the search needs from it."""

    def __init__(self, space: SearchSpace, origin: str, name: str):
        self.space, self.origin, self.name = space, origin, name

    @property
    def metric(self) -> str:
        return self.space.metric

    @property
    def mode(self) -> str:
        return self.space.mode

    @property
    def costs(self) -> list[tuple[str, str]]:
        """(cost, mode) objectives after the validation metric (none: a single-objective search)."""
        return [(k, m) for k, m in self.space.objectives.items() if k in COSTS]

    def resolve(self, overrides: dict | None = None, smoke: bool = False, latency_ms: float | None = None,
                params_m: float | None = None) -> ResolvedStudy:
        """This study as one search runs it, resolved once: `overrides` (--set, --data, ...: trial_overrides),
        at smoke scale or not, the ensemble's budget from the flags (`latency_ms`, `params_m`) or the file.

        The budget is the file's (or its smoke one); `--set supervised.epochs=N` carries through: it becomes the
        budget ASHA's max_t is built from, so no trial is cut at the file's epoch count. The limits and the
        ensemble's budget are the file's `limits:` and `ensemble:` (their smoke ones at smoke scale, where given:
        test models on a CPU cost other milliseconds than the study's)."""
        overrides = overrides or {}
        budget = self.space.smoke.budget if smoke else self.space.budget
        epochs = (overrides.get("supervised") or {}).get("epochs")
        if epochs is not None:
            budget = budget.model_copy(update={"epochs": epochs, "grace_period": min(budget.grace_period, epochs)})
        smoke_limits = self.space.smoke.limits
        limits = dict(smoke_limits if smoke and smoke_limits is not None else self.space.limits)
        chosen = (self.space.smoke.ensemble or EnsembleBudget()) if smoke else self.space.ensemble
        ensemble = {"latency_ms": latency_ms if latency_ms is not None else chosen.latency_ms,
                    "params_m": params_m if params_m is not None else chosen.params_m,
                    "latency_x_cheapest": None if latency_ms is not None else chosen.latency_x_cheapest}
        over = {"supervised": {"epochs": budget.epochs, "selection_metric": self.metric,
                               **({"limits": limits} if limits else {})}}
        if smoke:
            over = merge(over, nest(self.space.smoke.set, f"{self.origin}: smoke.set"))
        return ResolvedStudy(self, overrides, smoke, budget, limits, ensemble, over)

    def as_requested(self, request) -> ResolvedStudy:
        """This study as a search request (request.SearchRequest) runs it: its --set, --data and
        --record-test-per-trial over the file (trial_overrides), at its scale, with its budget flags: what the
        search and its re-runs (tune_xray.rerun) resolve, once each; the steps after the trials read what they need
        of it from the record (`asked`). The device its resources give is ResolvedStudy.placed's."""
        overrides = trial_overrides(self, list(request.overrides), request.data, request.record_test_per_trial)
        return self.resolve(overrides, request.smoke, request.latency_budget, request.params_budget)

    def check_overrides(self, overrides: dict) -> None:
        """`--set` values that would contradict the study's objective, or the device a trial's resources give
        it, are one error before anything runs."""
        if "device" in overrides:
            raise ConfigError(f"--set device={overrides['device']}: a trial runs on the device its resources give it; "
                              "use --gpus-per-trial (0: CPU)")
        chosen = (overrides.get("supervised") or {}).get("selection_metric")
        if chosen is not None and chosen != self.metric:
            raise ConfigError(f"--set supervised.selection_metric={chosen} contradicts {self.origin}'s metric "
                              f"{self.metric}: the search optimises the file's metric and each trial selects its "
                              "epoch on it; change `metric:` in the file instead")

    def origin_of(self, key: str, overrides: dict | None = None) -> str | None:
        """Where a trial's value of the dotted `key` comes from: `--set` (the search's overrides), the file's
        `base`, its `smoke.set` or its `params`; None for a default."""
        if key in flatten(overrides or {}):
            return "--set"
        for part, values in (("base", flatten(self.space.base)), ("smoke.set", self.space.smoke.set),
                             ("params", self.space.params)):
            if key in values:
                return f"{self.origin}: {part}"
        return None

    def sampled_from(self, config: dict[str, Any]) -> dict[str, Any]:
        """The drawn values in a Tune trial config, which shows the resolved values under the parameters'
        names and the drawn ones under `sampled.<key>` where they differ (see searcher.DefineByRun)."""
        return {key: config.get(f"sampled.{key}", config[key]) for key in self.space.params if key in config}

    def ordered_params(self) -> list[tuple[str, ParamSpec]]:
        """Parameters with every parent (`by`, `when`) before its children, whatever the file order."""
        params, done, order = self.space.params, set(), []

        def visit(key: str, path: tuple) -> None:
            if key in done:
                return
            if key in path:
                raise ConfigError(f"{self.origin}: params.{key}: conditions form a cycle: {' → '.join(path + (key,))}")
            spec = params[key]
            for parent in [spec.by] * (spec.by is not None) + list(spec.when or {}):
                if parent in params:
                    visit(parent, path + (key,))
            done.add(key)
            order.append((key, spec))

        for key in params:
            visit(key, ())
        return order

    def sample(self, trial) -> dict[str, Any]:
        """Optuna define-by-run: suggest each parameter whose condition holds; returns constants to merge.

        Suggested values are recorded by Optuna under their parameter names; this returns the config
        values (labelled choices resolved, fixed `value`s included) keyed by dotted config key."""
        values: dict[str, Any] = {}
        for key, spec in self.ordered_params():
            if not _matches(values, spec.when):
                continue
            name = key
            if spec.cases is not None:
                case = case_key(values.get(spec.by))
                if case not in spec.cases:
                    continue  # no branch for this parent value: the parameter does not apply
                name, spec = f"{key}:{case}", spec.cases[case]
            values[key] = _suggest(trial, name, spec)
        return values

    def _label_values(self, point: dict[str, Any]) -> dict[str, Any]:
        """A warm-start point with labels of labelled choices replaced by their values."""
        out = dict(point)
        for key, value in point.items():
            spec = self.space.params.get(key)
            if spec is not None and spec.cases is not None:
                spec = spec.cases.get(case_key(point.get(spec.by)))
            if spec is not None and isinstance(spec.choice, dict) and isinstance(value, str) and value in spec.choice:
                out[key] = spec.choice[value]
        return out

    def warm_start_points(self) -> list[dict[str, Any]]:
        """Warm-start configs as Optuna parameter names → values (labels for labelled choices)."""
        points = []
        for point in self.space.warm_start:
            out = {}
            for key, spec in self.space.params.items():
                if key not in point:
                    continue
                if spec.cases is not None:
                    case = case_key(point.get(spec.by))
                    key_name, spec = f"{key}:{case}", spec.cases.get(case)
                else:
                    key_name = key
                if spec is None or spec.kind == "value":
                    continue
                value = point[key]
                if isinstance(spec.choice, dict):  # labelled choice: a point may give the label or the value
                    labels = [label for label, v in spec.choice.items() if v == value or label == value]
                    if not labels:
                        raise ConfigError(f"{self.origin}: warm_start: {key}: {value!r} is none of "
                                          f"{list(spec.choice)} (labels) or their values")
                    value = labels[0]
                out[key_name] = value
            points.append(out)
        return points

    def candidates(self):
        """(where, key, value) for every value each parameter can take, every `cases` branch included."""
        for key, spec in self.space.params.items():
            branches = spec.cases.items() if spec.cases is not None else [(None, spec)]
            for case, branch in branches:
                for value in branch.candidate_values():
                    yield f"params.{key}" + (f".cases.{case}" if case is not None else ""), key, value

    def validate(self) -> None:
        """Every candidate value of every parameter, set into the base config, must validate; a key the search
        sets itself (the budget's epochs, the objective, the device) is not the file's to set."""
        base, params = flatten(self.space.base), self.space.params
        owned = {"supervised.epochs": ("budget.epochs", self.space.budget.epochs),
                 "supervised.selection_metric": ("metric", self.metric)}
        for key, (instead, value) in owned.items():
            if key in params or base.get(key, value) != value:
                where = f"params.{key}" if key in params else f"base.{key}"
                raise ConfigError(f"{self.origin}: {where}: the search sets it to the file's {instead} "
                                  f"({value}) for every trial (ASHA's budget and the objective follow it); set "
                                  f"{instead} instead")
        if "device" in base or "device" in params:
            raise ConfigError(f"{self.origin}: {'base' if 'device' in base else 'params'}.device: a trial runs on "
                              "the device its resources give it (--gpus-per-trial), not one the file names")
        for key, spec in self.space.params.items():
            if key.split(".")[0] not in TrialConfig.model_fields:
                raise ConfigError(f"{self.origin}: params.{key}: unknown section '{key.split('.')[0]}'; "
                                  f"expected one of {sorted(TrialConfig.model_fields)}")
            if spec.by is not None and spec.by not in self.space.params:
                raise ConfigError(f"{self.origin}: params.{key}: 'by: {spec.by}' is not a parameter of this file")
            for parent in (spec.when or {}):
                if parent not in self.space.params:
                    raise ConfigError(f"{self.origin}: params.{key}: 'when' names '{parent}', "
                                      "which is not a parameter of this file")
        self.ordered_params()  # a cycle of conditions is an error
        resolved = self.resolve()
        for where, key, value in self.candidates():
            try:
                resolved.trial_config({key: value})
            except ConfigError as err:
                detail = str(err).split("\n")[0].split(": ", 1)[-1]
                raise ConfigError(f"{self.origin}: {where}: value {value!r} is not allowed: {detail}") from None
        for i, point in enumerate(self.space.warm_start):
            unknown = sorted(set(point) - set(self.space.params))
            if unknown:
                raise ConfigError(f"{self.origin}: warm_start[{i}]: {unknown} are not parameters of this file")
            try:
                resolved.trial_config(self._label_values(point))
            except ConfigError as err:
                raise ConfigError(f"{self.origin}: warm_start[{i}]: {str(err).split(': ', 1)[-1]}") from None
        self.warm_start_points()  # every labelled value resolves
        try:
            self.resolve(smoke=True).trial_config({})
        except ConfigError as err:
            raise ConfigError(f"{self.origin}: smoke: {str(err).split(': ', 1)[-1]}") from None


def trial_overrides(study: Study, overrides: list[str], data: str | None, record_test: bool = False) -> dict:
    """What every trial gets on top of the study file: `--set`, `--data` and `--record-test-per-trial`, resolved
    here, so every record shows them."""
    tree = parse_overrides(overrides)
    study.check_overrides(tree)
    if record_test:
        tree = merge(tree, {"supervised": {"record_test": True}})
    if data:
        tree = merge(tree, {"data": {"source": data}})
    return tree


@dataclass(frozen=True)
class ResolvedStudy:
    """A study as one search runs it (Study.resolve), resolved once at the search's start and read by the candidate
    check, the searcher, every trial, the parent run's params and the ensemble: the budget, the hard limits, the
    ensemble's budget, what is set over each trial's drawn values (`over`: the search's own keys, the file's
    `smoke.set` at smoke scale) and what every trial gets last (`overrides`: --set, --data, ... and, once Ray
    tells the trial's resources, its device: `placed`)."""

    study: Study
    overrides: dict
    smoke: bool
    budget: Budget
    limits: dict[str, float]
    ensemble: dict
    over: dict

    def placed(self, gpus_per_trial: float, workers_per_trial: int = 1) -> ResolvedStudy:
        """On a trial's resources: the device they give and, on a GPU it shares with other trials, its share
        (`data.device_share`, what `device_cache: auto` counts) unless --set gave one."""
        place: dict = {"device": "cuda" if gpus_per_trial else "cpu"}
        share = gpus_per_trial / workers_per_trial
        if 0 < share < 1 and "device_share" not in self.overrides.get("data", {}):
            place["data"] = {"device_share": share}
        return dataclasses.replace(self, overrides=merge(self.overrides, place))

    def unlimited(self) -> ResolvedStudy:
        """The study as a repeat or a fold trial runs it: without the hard limits. Only the configurations the
        search found feasible are re-run, and a re-run inherits that verdict — judged again it could drop a fold out
        of the cross-validation, or a seed out of the repeats, on another measurement of the same model."""
        supervised = {k: v for k, v in self.over.get("supervised", {}).items() if k != "limits"}
        return dataclasses.replace(self, limits={}, over={**self.over, "supervised": supervised})

    def trial_config(self, sampled: dict[str, Any], extra: dict | None = None) -> TrialConfig:
        """base ⊕ sampled values ⊕ `over` (⊕ smoke shrinkage) ⊕ overrides (⊕ `extra`: a repeat's seed, a fold) →
        a validated TrialConfig.

        The supervised phase runs the budget's epochs and selects on the study's metric. Smoke: `smoke.set`, then
        `smoke.scale` factors, then each backbone its family's test model; the user's `--set` comes last."""
        study = self.study
        origin, shrink = study.origin, study.space.smoke
        tree = merge(merge(study.space.base, nest({k: v for k, v in sampled.items() if ":" not in k}, origin)),
                     self.over)
        if self.smoke:
            values = flatten(build_config(tree, f"{origin} (trial config)").model_dump(mode="json"))
            sizes = {k for k, v in values.items() if isinstance(v, int) and not isinstance(v, bool)}
            if set(shrink.scale) - sizes:
                raise ConfigError(f"{origin}: smoke.scale: {sorted(set(shrink.scale) - sizes)} "
                                  "are not integer sizes of the trial config")
            shrunk = {key: max(1, round(values[key] * factor)) for key, factor in shrink.scale.items()}
            shrunk.update({key: smoke_backbone(values[key]) for key in BACKBONE_KEYS})
            tree = merge(tree, nest(shrunk, f"{origin}: smoke"))
        for last in (self.overrides, extra):
            if last:
                tree = merge(tree, last)
        return build_config(tree, f"{origin} (trial config)")


def _suggest(trial, name: str, spec: ParamSpec):
    if spec.choice is not None:
        if isinstance(spec.choice, dict):
            return spec.choice[trial.suggest_categorical(name, list(spec.choice))]
        return trial.suggest_categorical(name, spec.choice)
    if spec.uniform is not None:
        return trial.suggest_float(name, *spec.uniform)
    if spec.loguniform is not None:
        return trial.suggest_float(name, *spec.loguniform, log=True)
    if spec.integer is not None:
        return trial.suggest_int(name, *spec.integer)
    return spec.value


def resolve_path(study: str) -> Path:
    """A file stem in search_spaces/ (`byol`) or a path to a YAML file."""
    path = Path(study)
    if path.suffix in (".yaml", ".yml") or path.is_file():  # a folder named like a study (deploy/) is not one
        return path
    return SEARCH_SPACES / f"{study}.yaml"


def load_study(study: str) -> Study:
    """Read and fully validate a search-space file; every error names the file and the key."""
    path = resolve_path(study)
    if not path.is_file():
        known = sorted(p.stem for p in SEARCH_SPACES.glob("*.yaml"))
        raise ConfigError(f"{path}: no such search-space file; known studies: {known}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with metric, budget, base, params, ...")
    try:
        space = SearchSpace.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_errors(err, str(path))) from None
    study_obj = Study(space, str(path), path.stem)
    study_obj.validate()
    return study_obj


def short_names(keys) -> dict[str, str]:
    """`byol.optimizer.lr` → `optimizer.lr`: the last two parts of each parameter, the whole key where two would
    read the same (the full names are in the space table)."""
    short = {k: ".".join(k.split(".")[-2:]) for k in keys}
    return {k: v if list(short.values()).count(v) == 1 else k for k, v in short.items()}


def space_rows(study) -> list[dict]:
    """The search space as the file states it, one row per parameter: what is drawn, from what, and when."""
    def values(spec) -> str:
        if spec.cases is not None:
            return "; ".join(f"{case}: {values(sub)}" for case, sub in spec.cases.items())
        if spec.choice is not None:
            return ", ".join(map(str, spec.choice.keys() if isinstance(spec.choice, dict) else spec.choice))
        for name, text in (("uniform", "uniform"), ("loguniform", "log-uniform"), ("integer", "integer")):
            if getattr(spec, name) is not None:
                low, high = getattr(spec, name)
                return f"{text} [{low:g}, {high:g}]"
        return f"fixed {spec.value}"

    names = short_names(study.space.params)
    return [{"parameter": key, "short name": names[key],
             "drawn": "by " + spec.by if spec.cases is not None else spec.kind.replace("integer", "int"),
             "values": values(spec),
             "applies": "; ".join(f"{k} in {v}" for k, v in spec.when.items()) if spec.when else "always"}
            for key, spec in study.space.params.items()]


def describe_study(study: Study, smoke: bool = False) -> str:
    """A study file as `search STUDY --help` shows it: what it optimises, its budget and its space."""
    budget = study.resolve(smoke=smoke).budget
    rows = space_rows(study)
    width = max((len(r["parameter"]) for r in rows), default=0)
    lines = [f"{study.name} ({study.origin}): {study.space.description or ''}".rstrip(": "),
             f"objective: {', '.join(f'{k} ({m})' for k, m in [(study.metric, study.mode), *study.costs])} on "
             "validation",
             f"budget: {budget.trials} trials, {budget.epochs} fine-tune epochs each at most (ASHA grace "
             f"{budget.grace_period}, reduction factor {budget.reduction_factor}); --smoke: "
             f"{study.space.smoke.budget.trials} trials, {study.space.smoke.budget.epochs} epochs",
             "space:"]
    lines += [f"  {r['parameter']:<{width}}  {r['drawn']}: {r['values']}"
              + (f"  (when {r['applies']})" if r["applies"] != "always" else "") for r in rows]
    return "\n".join(lines)
