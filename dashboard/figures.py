"""The dashboard's pictures, as PNG bytes: loss curves, metric trends, thumbnails, seam heat-maps."""

from __future__ import annotations

import io
from datetime import datetime

import numpy as np
from PIL import Image

from asd_models.seams import HEATMAP_MAX_PIXELS, seam_heatmap_rgb


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _figure(w: float = 6.0, h: float = 3.2):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(w, h))


def loss_curve(losses: list[float], title: str) -> bytes:
    fig, ax = _figure()
    steps = np.arange(1, len(losses) + 1)
    ax.plot(steps, losses, lw=0.6, alpha=0.35, color="tab:blue", label="per step")
    if len(losses) >= 10:
        k = max(2, len(losses) // 50)
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1 :], smooth, lw=1.6, color="tab:blue", label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("denoising loss")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


def metric_trends(series: dict[str, list[tuple[datetime, float]]], title: str) -> bytes:
    """One small panel per metric: value per evaluation version, in commit order."""
    import matplotlib.pyplot as plt

    _figure()  # selects the Agg backend
    names = sorted(series)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 2.9), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        pts = sorted(series[name])
        ax.plot(range(len(pts)), [p[1] for p in pts], marker="o", lw=1.2)
        step = max(1, len(pts) // 6)
        ax.set_xticks(range(0, len(pts), step), [p[0].strftime("%m-%d %H:%M") for p in pts][::step])
        ax.set_title(name, fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _png(fig)


def thumbnail_and_heatmap(
    png: bytes, seam_x: list[int], seam_y: list[int], px: int
) -> tuple[bytes, bytes | None]:
    """A thumbnail (longest side `px`) and, below HEATMAP_MAX_PIXELS, the seam heat-map of the
    same size (`asd_models.seams.seam_heatmap_rgb`)."""
    with Image.open(io.BytesIO(png)) as opened:
        im = opened.convert("RGB")
        w, h = im.size
        scale = min(1.0, px / max(w, h))
        thumb = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        thumb.save(out, format="PNG")
        if w * h > HEATMAP_MAX_PIXELS:
            return out.getvalue(), None
        rgb = seam_heatmap_rgb(np.asarray(im), seam_x, seam_y, max_side=px)
    heat_out = io.BytesIO()
    Image.fromarray(rgb).save(heat_out, format="PNG")
    return out.getvalue(), heat_out.getvalue()
