"""Serving a selected ensemble: its members rebuilt from their best.pt, the one MLflow pyfunc model that `predict`,
`mlflow models serve` and the registry share, and its loading. What tracking registers and predict loads.

Each member applies its own preprocessing: decoded like the training cache (grayscale, bilinear to its cache size),
its eval view and TTA; probabilities are averaged with the members' weights, and decided at the ensemble's
thresholds or by the members' weighted vote at thresholds of their own (a cross-validation's fold models).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from PIL import Image

from .augment import EvalViews
from .config import build_config
from .data.cache import IMAGE_ERRORS, NotAnImage, open_image, to_cache_layout
from .data.splits import DataError
from .phases import fine_tuned_backbones
from .phases.supervised import classifier, to_probabilities


def read_image(path: str | Path) -> Image.Image:
    """PNG / JPEG / DICOM / ... as the cache reads them (`data.cache.open_image`); anything else is a
    `DataError` naming the file."""
    try:
        return open_image(path)
    except NotAnImage as err:
        raise DataError(f"{path}: {err}") from None
    except IMAGE_ERRORS as err:
        raise DataError(f"{path}: not a readable image ({type(err).__name__}: {err})") from None


class Member:
    """One fine-tuned trial: its model (from best.pt), eval views and cache geometry, on `device`."""

    def __init__(self, checkpoint: str | Path, device: str = "cpu"):
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        self.cfg = build_config(state["config"], f"{checkpoint}: config")
        self.cfg.model.scan_backend = "auto"  # the scan runs where the model is now, whatever trained it
        self.classes, self.task = list(state["classes"]), state.get("task", "multilabel")
        backbone, width, _, _ = fine_tuned_backbones(self.cfg, pretrained=False)
        self.model = classifier(backbone, width, len(self.classes), 0.0, self.task)
        self.model.load_state_dict(state["model"])
        self.device = torch.device(device)
        self.model.to(self.device).eval()
        mean, std = state["normalization"]
        self.views = EvalViews(self.cfg.augment, self.cfg.data.cache_size, self.cfg.model.in_chans, mean,
                               std).to(self.device)

    def layout(self, image: Image.Image) -> np.ndarray:
        """As the training cache stored it: uint8 (channels, cache_size, cache_size)."""
        return to_cache_layout(image, self.cfg.data.cache_size, self.cfg.data.channels)

    @torch.no_grad()
    def probabilities(self, images: list[Image.Image]) -> np.ndarray:
        from .models.heads import mean_probability_logits

        x = torch.from_numpy(np.stack([self.layout(img) for img in images])).to(self.device)
        logits = mean_probability_logits([self.model(v) for v in self.views(x)], self.task == "multilabel")
        return to_probabilities(self.task, logits.float()).cpu().numpy().astype(np.float64)


class EnsemblePredictor:
    """Members with weights; `predict(images)` → (n, classes) mean probability (weights sum to 1). Decisions at the
    ensemble's `thresholds` (chosen on its validation probabilities), or — with `member_thresholds`, one row per
    member — by a weighted vote of the members, each at its own threshold (a cross-validation's fold models: each
    threshold fits the probabilities of the model it was chosen for; `metrics.vote`)."""

    member_thresholds = None  # (members, classes): decided by the members' vote; None: at `thresholds`

    def __init__(self, checkpoints: list[str | Path], weights: list[float], thresholds=None, device: str = "cpu",
                 member_thresholds=None):
        self.members = [Member(c, device) for c in checkpoints]
        self.weights = np.asarray(weights, dtype=np.float64) / np.sum(weights)
        self.classes, self.task = self.members[0].classes, self.members[0].task
        self.thresholds, self.member_thresholds = thresholds, member_thresholds

    def member_probabilities(self, images: list[Image.Image], batch_size: int = 32) -> np.ndarray:
        """(members, n, classes): each member's probabilities."""
        out = np.zeros((len(self.members), len(images), len(self.classes)))
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            for i, member in enumerate(self.members):
                out[i, start:start + len(chunk)] = member.probabilities(chunk)
        return out

    def predict(self, images: list[Image.Image], batch_size: int = 32) -> np.ndarray:
        return np.tensordot(self.weights, self.member_probabilities(images, batch_size), axes=1)

    def decide(self, images: list[Image.Image], batch_size: int = 32) -> pd.DataFrame:
        """`frame` of these images: the probabilities and the decisions."""
        members = self.member_probabilities(images, batch_size)
        return self.frame(np.tensordot(self.weights, members, axes=1), members)

    def frame(self, probs: np.ndarray, members: np.ndarray | None = None) -> pd.DataFrame:
        """The probabilities and the decisions, with what made them (chosen on validation):
        - multi-label: per label `p_<label>`, `threshold_<label>` and `y_<label>` (1 when p ≥ threshold); a label
          with no threshold (no positive in train, or one class in validation) has both left empty;
        - binary: `p_<positive>`, `threshold_<positive>`, and `label` — the positive class when p ≥ threshold, else
          the other (the negative class's probability, 1 − p, is not repeated);
        - more classes: `p_<class>` for each and `label`, the most probable.
        A vote (`member_thresholds`; `members` (M, n, C) the members' probabilities) has `vote_<label>` in place of
        `threshold_<label>`: the share of the weight whose member decides the label (or the positive class) at
        its own threshold; the decision is a share above 0.5, a share of exactly 0.5 broken by the members'
        weighted mean margin (`metrics.vote`)."""
        from .metrics import decisions, vote  # here: predicting needs no scikit-learn

        voting = self.member_thresholds is not None and members is not None
        if voting:
            shares, decided = vote(self.task, members, self.member_thresholds, self.weights)
        else:
            decided = decisions(self.task, probs, self.thresholds)
            thresholds = [np.nan if t is None else float(t) for t in np.ravel(self.thresholds)] \
                if self.thresholds is not None else None
        if self.task == "multilabel":
            out = pd.DataFrame(index=range(len(probs)))
            for j, c in enumerate(self.classes):
                out[f"p_{c}"] = probs[:, j]
                if voting or thresholds is not None:
                    out[f"vote_{c}" if voting else f"threshold_{c}"] = shares[:, j] if voting else thresholds[j]
                    out[f"y_{c}"] = pd.array(np.where(np.isnan(decided[:, j]), None, decided[:, j]), dtype="Int64")
            return out
        if len(self.classes) == 2:
            positive = self.classes[1]
            out = pd.DataFrame({f"p_{positive}": probs[:, 1]})
            if voting:
                out[f"vote_{positive}"] = shares[:, 0]
            else:
                out[f"threshold_{positive}"] = 0.5 if thresholds is None else thresholds[0]
        else:
            out = pd.DataFrame(probs, columns=[f"p_{c}" for c in self.classes])
        out["label"] = np.asarray(self.classes, dtype=object)[decided.argmax(1)] if len(probs) else []
        return out


class EnsembleModel(mlflow.pyfunc.PythonModel):
    """A selected ensemble as one MLflow pyfunc: each member's best.pt (its resolved config inside), the
    weights and the validation thresholds. Input: a DataFrame with a `path` column (PNG, JPEG, DICOM) or a uint8
    batch; output: one probability column per class (and the decisions where thresholds were chosen). The device
    is the model config's `device` (`load_model(uri, model_config={"device": "cuda"})`)."""

    def load_context(self, context) -> None:
        spec = json.loads(Path(context.artifacts["ensemble"]).read_text())
        members = [context.artifacts[f"member_{i}"] for i in range(len(spec["weights"]))]
        device = (context.model_config or {}).get("device", "cpu")
        self.predictor = EnsemblePredictor(members, spec["weights"], spec.get("thresholds"), device,
                                           spec.get("member_thresholds"))

    def predict(self, context, model_input: pd.DataFrame, params=None):  # or a uint8 array (images_from_input):
        # a DataFrame hint is one MLflow infers no schema from (the logged signature speaks), and asks no more for.
        # Each row answers for itself: a file that is no image is `status` error with why, the others are predicted
        images, errors = images_from_input(model_input)
        readable = [i for i, image in enumerate(images) if image is not None]
        members = np.full((len(self.predictor.members), len(images), len(self.predictor.classes)), np.nan)
        members[:, readable] = self.predictor.member_probabilities([images[i] for i in readable])
        out = self.predictor.frame(np.tensordot(self.predictor.weights, members, axes=1), members)
        failed = [i for i, image in enumerate(images) if image is None]
        if failed:  # no decision for what was not read: empty, not a negative
            out.loc[failed, [c for c in out.columns if c.startswith(("y_", "vote_"))]] = pd.NA
            if "label" in out:
                out.loc[failed, "label"] = ""
        out.insert(0, "error", errors)
        out.insert(0, "status", ["ok" if image is not None else "error" for image in images])
        return out


def load_predictor(uri: str, device: str = "cpu", tracking_uri: str | None = None) -> EnsemblePredictor:
    """The EnsemblePredictor inside a logged or registered ensemble (`models:/…`, `runs:/…`) on `device`; a model
    MLflow cannot find is a DataError naming it."""
    from mlflow.exceptions import MlflowException

    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise DataError(f"--device {device}: no CUDA device here")
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    try:
        model = mlflow.pyfunc.load_model(uri, model_config={"device": device})
    except (MlflowException, OSError) as err:
        raise DataError(f"{uri}: no such model ({str(err).splitlines()[0][:200]})") from None
    return model.unwrap_python_model().predictor


def images_from_input(model_input) -> tuple[list[Image.Image | None], list[str]]:
    """(images, errors) of a DataFrame with a `path` column — None and why for a file that is not an image — or of
    a uint8 array batch (n, H, W) / (n, C, H, W) / (n, H, W, C). Input of neither form is a DataError."""
    if isinstance(model_input, pd.DataFrame):
        if "path" not in model_input:
            raise DataError(f"expected a `path` column of image files; got columns {list(model_input.columns)}")
        images, errors = [], []
        for path in model_input["path"]:
            try:
                images.append(read_image(path))
                errors.append("")
            except DataError as err:
                images.append(None)
                errors.append(str(err))
        return images, errors
    arr = np.asarray(model_input)
    if arr.dtype != np.uint8 or arr.ndim not in (3, 4):
        raise DataError(f"expected a uint8 batch (n, H, W[, C]) or (n, C, H, W); got {arr.dtype} {arr.shape}")
    if arr.ndim == 4 and arr.shape[1] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(0, 2, 3, 1)
    return [Image.fromarray(a.squeeze(-1) if a.ndim == 3 and a.shape[-1] == 1 else a) for a in arr], [""] * len(arr)


def ms_per_image(predictor, image, batch: int, device: str) -> float:
    """ms per image of `predictor` on `batch` copies of one decoded image: the median of up to 10 runs after a
    warm-up (explain.median_seconds)."""
    from .explain import median_seconds

    return 1000 * median_seconds(lambda: predictor.predict([image] * batch, batch_size=batch), device, 10, 5.0) / batch


def measured_latency(checkpoints: list[str], weights: list[float], example: str, device: str) -> float:
    """ms per image of the ensemble as served (serving.EnsemblePredictor: each member's cache layout, eval views
    and forward, the weighted mean), one decoded image at a time on `device`: the median of repeats."""
    return ms_per_image(EnsemblePredictor(checkpoints, weights, device=device), read_image(example), 1, device)
