# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Figures (PNG, matplotlib's Agg canvas, no pyplot state) and the self-contained HTML report of an evaluation.

Slices are shown like :func:`meddiff.sampling.save_mosaic_png`: volumes in RAS voxel order, each slice with the
higher-index in-plane axis pointing up and patient right on the image left (radiological convention).
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = [
    "closest_pairs_figure",
    "diversity_figure",
    "figure_png",
    "format_value",
    "html_image",
    "html_report",
    "html_table",
    "nn_similarity_figure",
    "orthogonal_slices",
    "reconstruction_figure",
    "samples_figure",
]

PLANES = ("axial", "coronal", "sagittal")


def _display(slice2d: np.ndarray) -> np.ndarray:
    """Voxel slice ``(a, b)`` -> display rows = ``b`` decreasing, cols = ``a`` decreasing (radiological)."""
    return slice2d.T[::-1, ::-1]


def orthogonal_slices(volume: np.ndarray) -> list[np.ndarray]:
    """Central axial, coronal and sagittal slices of a (H, W, D) or (1, H, W, D) volume, ready to display.

    Returns:
        Three 2D float32 arrays in :data:`PLANES` order.
    """
    v = np.asarray(volume, dtype=np.float32)
    v = v[0] if v.ndim == 4 else v
    h, w, d = v.shape
    return [_display(v[:, :, d // 2]), _display(v[:, w // 2, :]), _display(v[h // 2, :, :])]


def figure_png(fig: Figure, dpi: int = 80) -> bytes:
    """Render a matplotlib figure to PNG bytes with the Agg canvas."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def _show(ax: Any, image: np.ndarray, title: str = "", vmin: float = 0.0, vmax: float = 1.0) -> None:
    ax.imshow(image, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)


def samples_figure(real: Sequence[Sequence[np.ndarray]], synthetic: Sequence[Sequence[np.ndarray]],
                   real_names: Sequence[str], synthetic_names: Sequence[str]) -> bytes:
    """Orthogonal mid-slices of real (left) and synthetic (right) volumes, one row per volume, window [0, 1].

    Args:
        real: per real volume, the three slices of :func:`orthogonal_slices` (intensities in [0, 1]).
        synthetic: likewise for synthetic volumes.
        real_names: row labels of the real volumes.
        synthetic_names: row labels of the synthetic volumes.

    Returns:
        PNG bytes.
    """
    rows = max(len(real), len(synthetic), 1)
    fig = Figure(figsize=(12, 2.5 * rows))
    fig.subplots_adjust(hspace=0.45, wspace=0.05)
    for r in range(rows):
        for group, (vols, names, label) in enumerate(((real, real_names, "real"), (synthetic, synthetic_names,
                                                                                   "synthetic"))):
            for p in range(3):
                ax = fig.add_subplot(rows, 6, r * 6 + group * 3 + p + 1)
                if r < len(vols):
                    _show(ax, vols[r][p], f"{label} {names[r]}\n{PLANES[p]}" if p == 0 else PLANES[p])
                else:
                    ax.axis("off")
    return figure_png(fig)


def reconstruction_figure(inputs: Sequence[np.ndarray], reconstructions: Sequence[np.ndarray],
                          names: Sequence[str], intensity_range: Sequence[float], units: str) -> bytes:
    """Axial mid-slices of validation inputs, their reconstructions and the absolute error, in data units.

    Args:
        inputs: axial slices of the inputs (data units).
        reconstructions: matching slices of the reconstructions.
        names: row labels.
        intensity_range: display window ``(low, high)``.
        units: intensity unit label.

    Returns:
        PNG bytes.
    """
    rows = max(len(inputs), 1)
    low, high = sorted(float(v) for v in intensity_range)
    fig = Figure(figsize=(7.5, 2.4 * rows))
    for r in range(len(inputs)):
        error = np.abs(reconstructions[r] - inputs[r])
        for c, (img, title, vmax) in enumerate(((inputs[r], f"input {names[r]}", high),
                                                (reconstructions[r], "reconstruction", high),
                                                (error, f"|error| ({units})", (high - low) / 4))):
            ax = fig.add_subplot(rows, 3, r * 3 + c + 1)
            _show(ax, img, title, vmin=low if c < 2 else 0.0, vmax=vmax)
    return figure_png(fig)


def diversity_figure(synthetic: Sequence[float], real: Sequence[float]) -> bytes:
    """Histograms of the MS-SSIM of random synthetic pairs and random real pairs."""
    fig = Figure(figsize=(6, 3.2))
    ax = fig.add_subplot(1, 1, 1)
    bins = np.linspace(0.0, 1.0, 41)
    if len(real):
        ax.hist(real, bins=bins, alpha=0.6, label=f"real pairs (n={len(real)})", color="tab:blue")
    if len(synthetic):
        ax.hist(synthetic, bins=bins, alpha=0.6, label=f"synthetic pairs (n={len(synthetic)})", color="tab:orange")
    ax.set_xlabel("MS-SSIM (higher = more alike, less diverse)")
    ax.set_ylabel("pairs")
    ax.legend(fontsize=8)
    return figure_png(fig)


def nn_similarity_figure(spaces: Sequence[Mapping[str, Any]]) -> bytes:
    """Histograms of nearest-training-neighbour similarities, baseline vs synthetic, with the flag threshold.

    Args:
        spaces: one mapping per similarity space with ``title``, ``baseline`` (validation -> training),
            ``synthetic`` (synthetic -> training), ``threshold`` and ``xlabel``.

    Returns:
        PNG bytes.
    """
    fig = Figure(figsize=(6 * len(spaces), 3.4))
    for k, space in enumerate(spaces):
        ax = fig.add_subplot(1, len(spaces), k + 1)
        values = np.concatenate([np.asarray(space["baseline"], float), np.asarray(space["synthetic"], float),
                                 [float(space["threshold"])]])
        low, high = float(np.nanmin(values)), float(np.nanmax(values))
        pad = max(1e-3, 0.05 * (high - low))
        bins = np.linspace(low - pad, high + pad, 31)
        ax.hist(space["baseline"], bins=bins, alpha=0.6, color="tab:blue",
                label=f"validation -> training (baseline, n={len(space['baseline'])})")
        ax.hist(space["synthetic"], bins=bins, alpha=0.6, color="tab:orange",
                label=f"synthetic -> training (n={len(space['synthetic'])})")
        ax.axvline(float(space["threshold"]), color="tab:red", linestyle="--",
                   label=f"flag threshold {float(space['threshold']):.4f}")
        ax.set_title(space["title"], fontsize=9)
        ax.set_xlabel(space["xlabel"])
        ax.set_ylabel("volumes")
        ax.legend(fontsize=7)
    return figure_png(fig)


def closest_pairs_figure(pairs: Sequence[Mapping[str, Any]]) -> bytes:
    """Mid-slices of the synthetic volumes closest to a training volume, next to that training volume.

    Args:
        pairs: per pair ``synthetic`` and ``training`` (three slices each, in [0, 1]), ``synthetic_name``,
            ``training_name``, ``similarity``, ``shift`` and ``flagged``.

    Returns:
        PNG bytes.
    """
    rows = max(len(pairs), 1)
    fig = Figure(figsize=(12, 2.6 * rows))
    fig.subplots_adjust(hspace=0.5, wspace=0.05)
    for r, pair in enumerate(pairs):
        flag = "  FLAGGED" if pair["flagged"] else ""
        for group, key in enumerate(("synthetic", "training")):
            for p in range(3):
                ax = fig.add_subplot(rows, 6, r * 6 + group * 3 + p + 1)
                title = PLANES[p]
                if p == 0:
                    title = (f"{pair['synthetic_name']}  NCC {pair['similarity']:.4f}{flag}\n{PLANES[p]}" if group == 0
                             else f"nearest training: {pair['training_name']}\n{PLANES[p]}")
                _show(ax, pair[key][p], title)
    return figure_png(fig)


def format_value(value: Any) -> str:
    """Short human-readable text of a metric value (4 significant digits, ``∞``, ``n/a``)."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isinf(value):
            return "∞" if value > 0 else "-∞"
        if math.isnan(value):
            return "n/a"
        return f"{value:.4g}"
    if value is None:
        return "n/a"
    if isinstance(value, (list, tuple)):
        return ", ".join(format_value(v) for v in value)
    return str(value)


def html_table(header: Sequence[str], rows: Sequence[Sequence[Any]], highlight: Sequence[bool] | None = None) -> str:
    """An HTML table of escaped, formatted cells; rows with ``highlight`` true get the ``flag`` class."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for k, row in enumerate(rows):
        cls = ' class="flag"' if highlight is not None and highlight[k] else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(format_value(v))}</td>" for v in row) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def html_image(png: bytes, alt: str) -> str:
    """An ``<img>`` tag embedding ``png`` as base64, so the page needs no other file."""
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ccc;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0;font-size:.85em}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}
tr.flag td{background:#fdd}img{max-width:100%;display:block;margin:.5em 0}.note{color:#555;font-size:.9em}
.ok{color:#070}.bad{color:#b00;font-weight:bold}
"""


def html_report(title: str, sections: Sequence[tuple[str, str]], footer: str = "") -> str:
    """Assemble a self-contained HTML page.

    Args:
        title: page title.
        sections: ``(heading, html_body)`` pairs; bodies are trusted HTML built with the helpers here.
        footer: trusted HTML appended at the end.

    Returns:
        The HTML text.
    """
    parts = [f"<h2>{html.escape(h)}</h2>\n{body}" for h, body in sections]
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>\n" + "\n".join(parts)
            + f"\n<footer class=\"note\">{footer}</footer></body></html>\n")
