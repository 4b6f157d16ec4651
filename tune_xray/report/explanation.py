"""What the best model looks at and how it groups images: Grad-CAM on validation images and a t-SNE of its
validation embeddings."""

from __future__ import annotations

import html

import numpy as np

from ..experiment import (
    Experiment,
    TrialTask,
)
from ..figures import COLUMN, figure
from ..metrics import scored_labels
from .common import stored_predictions

THUMBNAIL = 128  # Grad-CAM images and maps are kept at this size (pixels) in the data: what the page shows


def _thumbnail(a: np.ndarray) -> list:
    """A 2-D array in [0, 1] as uint8 at most THUMBNAIL pixels wide (what the page shows)."""
    import torch

    t = torch.as_tensor(np.asarray(a, dtype=np.float32))[None, None]
    if max(t.shape[-2:]) > THUMBNAIL:
        t = torch.nn.functional.interpolate(t, size=(THUMBNAIL, THUMBNAIL), mode="bilinear", antialias=True)
    return (t[0, 0].clamp(0, 1) * 255).round().to(torch.uint8).tolist()


def explain_data(experiment: Experiment, best: dict, per_class: int = 2, max_points: int = 400,
                 device: str = "cpu") -> dict:
    """Grad-CAM of the best trial on the validation images with each finding it is surest of, and t-SNE of its
    validation embeddings."""
    import torch

    from ..explain import embeddings, gradcam, tsne
    from ..serving import Member, read_image

    member = Member(experiment.trial_dir(best) / "best.pt", device)
    paths, y, prob, classes = stored_predictions(experiment.trial_dir(best), "val")
    task = TrialTask.of(experiment.trial_dir(best))
    picks = []  # per class it decides (binary: the positive one): the val images with it the model is surest of
    for c in scored_labels(task.task, classes, task.untrained):
        rows = np.flatnonzero(y[:, c] > 0)
        picks += [(i, c) for i in rows[np.argsort(-prob[rows, c])][:per_class]]
    # a member ensemble (both CASS arms fine-tuned) is explained through its first member
    classifier = member.model.members[0] if hasattr(member.model, "members") else member.model
    which = " (its first member)" if classifier is not member.model else ""
    cams, layer = [], None
    if picks:
        raw = torch.from_numpy(np.stack([member.layout(read_image(paths[i])) for i, _ in picks])).to(device)
        images = member.views(raw)[0]
        maps, constant, layer = gradcam(classifier, images, [c for _, c in picks])
        for k, ((i, c), cam) in enumerate(zip(picks, maps)):
            gray = images[k].mean(0).float().cpu().numpy()
            gray = (gray - gray.min()) / max(float(gray.max() - gray.min()), 1e-8)
            cams.append({"image": _thumbnail(gray), "cam": _thumbnail(cam), "label": classes[c],
                         "probability": float(prob[i, c]), "constant": bool(constant[k])})
    keep = np.linspace(0, len(paths) - 1, min(max_points, len(paths))).astype(int)
    x = torch.from_numpy(np.stack([member.layout(read_image(paths[i])) for i in keep])).to(device)
    points = tsne(embeddings(classifier, member.views(x)[0]))
    # colour: the label of each image (multi-label: its least frequent finding, "No finding" when none)
    order = np.argsort(np.nansum(y, 0))
    colour = [next((classes[c] for c in order if row[c] == 1), "No finding") for row in y[keep]]
    return {"which": which, "gradcam": cams, "layer": layer, "backbone": member.cfg.model.backbone,
            "image_size": member.cfg.augment.image_size, "tsne": {"points": points.tolist(), "labels": colour}}


def render_explain(explain: dict) -> str:
    cams, which = explain["gradcam"], explain["which"]
    shown = [c for c in cams if not c.get("constant")]
    constant = len(cams) - len(shown)
    out = (f"<h3>Grad-CAM (best trial{which}, validation images with the finding)</h3><p class=note>Layer "
           f"<code>{html.escape(str(explain.get('layer')))}</code> of {html.escape(str(explain.get('backbone')))} at "
           f"{explain.get('image_size')} px: the deepest stage whose map is at least 7 × 7."
           + (f" {constant} of {len(cams)} maps came out constant (no weighted activation above zero): they explain "
              "nothing and are not drawn." if constant else "") + "</p>")
    if shown:
        columns = min(4, len(shown))
        rows = int(np.ceil(len(shown) / columns))

        def overlays(fig):
            for k, cam in enumerate(shown):
                ax = fig.add_subplot(rows, columns, k + 1)
                ax.imshow(np.asarray(cam["image"], dtype=np.uint8), cmap="gray", vmin=0, vmax=255)
                ax.imshow(np.asarray(cam["cam"], dtype=np.uint8), cmap="jet", alpha=0.4, vmin=0, vmax=255)
                ax.set_title(f"{cam['label']}, p = {cam['probability']:.2f}")
                ax.axis("off")

        out += figure(overlays, COLUMN, 2.9 * rows, f"Grad-CAM overlays of {len(shown)} validation images")
    points, labels = np.asarray(explain["tsne"]["points"]), np.asarray(explain["tsne"]["labels"])

    def scatter(fig):
        ax = fig.add_subplot()
        for label in sorted(set(labels)):
            ax.scatter(*points[labels == label].T, s=12, label=label)
        ax.legend(markerscale=1.5, loc="upper left", bbox_to_anchor=(1.01, 1), title="label (rarest finding)")
        ax.set_xticks([])
        ax.set_yticks([])

    return out + (f"<h3>t-SNE of validation embeddings (best trial's backbone{which}, {len(points)} images)</h3>"
                  + figure(scatter, 9, 5.5, "t-SNE map of validation embeddings coloured by label"))
