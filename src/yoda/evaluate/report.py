"""The evaluation report: tables (CSV, Markdown), figures (PNG) and one self-contained HTML page.

:func:`write_report` writes into ``out_dir``:

- ``report.html``: every table and figure, the figures embedded as base64 PNG (no external
  resources: the page can be mailed or archived as one file);
- ``metrics.csv`` (one row per subject x method), ``reference.csv`` (the acquired and the clean
  target scored the same way), ``noise_curve.csv`` (the reference method plus Rician noise),
  ``summary.csv`` and ``summary.md`` (Table I: mean ± std per method), ``stats.csv`` (p-values),
  ``lesion_volumes.csv``, and with an input-noise experiment ``robustness.csv`` and
  ``robustness_summary.csv``;
- ``figures/*.png``: the figures of the page;
- ``report.json``: the list of the files above that this report wrote.

Every file is written atomically. Sentences in the page that compare methods are computed from
the tables (e.g. "highest mean SSIM vs acquired: <method>").

A folder holds one report: a report written where an earlier one is removes the files of the
earlier one (as its ``report.json`` lists them) that it does not write again, and touches no
other file.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import html
import io
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from yoda import __version__
from yoda.atomic import atomic_path, write_text_atomic
from yoda.evaluate.evaluation import METRICS, PREVIEW_LABEL, REFERENCES, Evaluation, MetricSpec

__all__ = [
    "REPORT_INDEX",
    "SECTIONS",
    "highlights",
    "report_files",
    "summary_markdown",
    "summary_table",
    "write_report",
    "write_tables",
]

SECTIONS = (
    ("overview", "Overview"),
    ("summary", "Summary"),
    ("statistics", "Paired statistics"),
    ("examples", "Example slices"),
    ("perception-distortion", "Perception-distortion"),
    ("lesion-volumes", "WMH volumes: translated vs acquired"),
    ("quality-control", "Quality control: worst cases"),
    ("robustness", "Robustness to input noise"),
    ("per-subject", "Per-subject metrics"),
    ("definitions", "Definitions"),
)
"""(id, heading) of the report's sections, in order."""

ALPHA = 0.05
SPEC = {m.key: m for m in METRICS}
_DPI = 100
REPORT_INDEX = "report.json"
"""Name of the list of files a report wrote, kept in the report folder."""
_INDEX_FORMAT = "yoda-report"


# --------------------------------------------------------------------------- formatting


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(float(x))


def _num(value: float, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{digits}f}"


def _p(p: float) -> str:
    if not _finite(p):
        return "–"
    return f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"


def _mean_std(entry: Mapping[str, Any], key: str, scale: float, digits: int) -> str:
    mean, std = entry.get(f"{key}_mean", math.nan), entry.get(f"{key}_std", math.nan)
    if not _finite(mean) and not (isinstance(mean, float) and math.isinf(mean)):
        return "–"
    text = _num(mean * scale, digits)
    if _finite(std) and math.isfinite(mean):
        text += f" ± {std * scale:.{digits}f}"
    return text


def _marks(entry: Mapping[str, Any], key: str) -> str:
    marks = ""
    if _finite(entry.get(f"{key}_p_ref")) and entry[f"{key}_p_ref"] < ALPHA:
        marks += "*"
    if _finite(entry.get(f"{key}_p_acq")) and entry[f"{key}_p_acq"] < ALPHA:
        marks += "†"
    return marks


def _columns(ev: Evaluation) -> list[tuple[str, Callable[[Mapping[str, Any]], str]]]:
    """(header, cell function) of the summary table; metrics nowhere defined are left out."""
    cols: list[tuple[str, Callable[[Mapping[str, Any]], str]]] = []

    def time_cell(e: Mapping[str, Any]) -> str:
        return _mean_std(e, "time_s", 1.0, 1)

    def nfe_cell(e: Mapping[str, Any]) -> str:
        v = e.get("nfe", math.nan)
        if not _finite(v):
            return "–"
        return f"{v:.0f}" if float(v).is_integer() else f"{v:.1f}"

    if any(_finite(e.get("time_s_mean")) for e in ev.summary):
        cols.append(("time (s)", time_cell))
    if any(_finite(e.get("nfe")) for e in ev.summary):
        cols.append(("NFE", nfe_cell))
    for spec in METRICS:
        if not ev.has(spec.key):
            continue

        def cell(e: Mapping[str, Any], s: MetricSpec = spec) -> str:
            text = _mean_std(e, s.key, s.scale, s.digits)
            return text if text == "–" else text + _marks(e, s.key)

        unit = f" ({spec.unit})" if spec.unit and spec.unit != "0-255" else ""
        arrow = {"higher": " ↑", "lower": " ↓"}.get(spec.better, "")
        cols.append((f"{spec.label}{unit}{arrow}", cell))
    if ev.fid:

        def fid_cell(e: Mapping[str, Any]) -> str:
            return _num(e.get("fid", math.nan), 2)

        cols.append(("FID ↓", fid_cell))
    return cols


def summary_table(ev: Evaluation) -> tuple[list[str], list[list[str]]]:
    """Header and rows (strings) of the Table-I-like summary: one row per method and reference."""
    cols = _columns(ev)
    header = ["method", "n", *[c[0] for c in cols]]
    body = [[e["method"], str(e["n"]), *[f(e) for _, f in cols]] for e in ev.summary]
    return header, body


def _legend(ev: Evaluation) -> str:
    return (
        f"mean ± std over subjects; * p < {ALPHA} vs {ev.reference}, † p < {ALPHA} vs the "
        "acquired target (two-sided Wilcoxon signed-rank, paired by subject, no correction "
        "for multiple comparisons). σ_WM on the 0-255 scale; CNR unitless; ALVR = |log2 "
        "volume ratio|. Reference rows: 'acquired' is the acquired target scored like a "
        "translation (vs clean: its own noise), 'clean' the noise-free target (phantom)."
    )


def robustness_table(rob: Any) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the input-noise table: mean ± std of each metric per level."""
    keys = [
        k
        for k in ("ssim_acq", "psnr_acq", "ssim_clean", "psnr_clean", "sigma_wm")
        if any(_finite(e.get(f"{k}_mean")) for e in rob.summary)
    ]
    rows = [
        [
            _num(e["sigma_in"], 1),
            str(e["n"]),
            *[_mean_std(e, k, SPEC[k].scale, SPEC[k].digits) for k in keys],
        ]
        for e in rob.summary
    ]
    head = [
        "input σ (% of range)",
        "n",
        *[
            f"{SPEC[k].label}"
            + (f" ({SPEC[k].unit})" if SPEC[k].unit and SPEC[k].unit != "0-255" else "")
            for k in keys
        ],
    ]
    return head, rows


def _markdown_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in body]


def summary_markdown(ev: Evaluation, robustness: Any = None) -> str:
    """The summary (Table I) as Markdown, and the input-noise table where there is one."""
    lines = [f"# YODA evaluation: {ev.target}, {ev.where}, {len(ev.scored_subjects())} subjects"]
    lines += ["", *_markdown_table(*summary_table(ev))]
    lines += ["", _legend(ev), ""]
    lines += [f"- {h}" for h in highlights(ev)]
    if ev.notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in ev.notes]
    if robustness is not None:
        lines += ["", f"## Robustness to input noise ({robustness.mode} sampling)", ""]
        lines += _markdown_table(*robustness_table(robustness))
    return "\n".join(lines) + "\n"


def _best(
    ev: Evaluation, key: str, higher: bool, scale: float = 1.0, digits: int = 2
) -> tuple[list[str], float] | None:
    """Methods with the best value of a summary column; ties at the shown precision. None
    unless at least two methods have a value (one method is best of nothing)."""
    entries = [e for e in ev.summary if e["kind"] == "method"]
    vals = {
        e["method"]: float(e[key])
        for e in entries
        if isinstance(e.get(key), float) and not math.isnan(e[key])
    }
    if len(vals) < 2:
        return None
    shown = {n: round(v * scale, digits) if math.isfinite(v) else v for n, v in vals.items()}
    best_shown = max(shown.values()) if higher else min(shown.values())
    names = [n for n, v in shown.items() if v == best_shown]
    best = max(vals[n] for n in names) if higher else min(vals[n] for n in names)
    return names, best


def highlights(ev: Evaluation) -> list[str]:
    """Sentences comparing the methods, each computed from the summary table."""
    out: list[str] = []
    summ = {e["method"]: e for e in ev.summary}

    def versus(names: list[str], key: str) -> str:
        parts = []
        for n in names:
            if n == ev.reference:
                continue
            p = summ[n].get(f"{key}_p_ref", math.nan)
            if _finite(p):
                sig = "significant" if p < ALPHA else "not significant"
                parts.append(f"{n} vs {ev.reference}: p = {_p(p)}, {sig}")
        return f" ({'; '.join(parts)})" if parts else ""

    def coverage(names: list[str], key: str) -> str:
        counts = [e.get(f"{key}_n", 0) for e in ev.summary if e["kind"] == "method"]
        total = max(counts, default=0)
        partial = [
            f"{n}: {summ[n][f'{key}_n']} of {total}"
            for n in names
            if summ[n].get(f"{key}_n", 0) < total
        ]
        return f" [mean over fewer subjects: {'; '.join(partial)}]" if partial else ""

    for spec in METRICS:
        if spec.better == "" or not ev.has(spec.key):
            continue
        higher = spec.better == "higher"
        res = _best(ev, f"{spec.key}_mean", higher, spec.scale, spec.digits)
        if res is None:
            continue
        names, value = res
        unit = f" {spec.unit}" if spec.unit else ""
        word = "highest" if higher else "lowest"
        out.append(
            f"{word.capitalize()} mean {spec.label}: {', '.join(names)} "
            f"({_num(value * spec.scale, spec.digits)}{unit}){versus(names, spec.key)}"
            f"{coverage(names, spec.key)}."
        )
    res = _best(ev, "sigma_wm_mean", higher=False)
    if res is not None:
        names, value = res
        text = (
            f"Lowest mean noise level σ_WM among the methods: {', '.join(names)} ({value:.2f})"
            f"{coverage(names, 'sigma_wm')}"
        )
        refs = [
            f"{r} target {summ[r]['sigma_wm_mean']:.2f}"
            for r in REFERENCES
            if r in summ and _finite(summ[r].get("sigma_wm_mean"))
        ]
        out.append(text + (f"; {', '.join(refs)}" if refs else "") + ".")
    res = _best(ev, "time_s_mean", higher=False, digits=1)
    if res is not None:
        names, value = res
        out.append(f"Fastest: {', '.join(names)} ({value:.1f} s per subject on average).")
    if ev.fid:
        fids = {k: v for k, v in ev.fid.items() if k in summ and summ[k]["kind"] == "method"}
        if len(fids) > 1:
            best = min(fids.values())
            names = [k for k, v in fids.items() if v == best]
            out.append(f"Lowest FID: {', '.join(names)} ({best:.2f}).")
    return out


# --------------------------------------------------------------------------- CSV


def _csv_value(v: Any) -> Any:
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return repr(v)
    if isinstance(v, (list, tuple)):
        return " ".join(str(x) for x in v)
    return v


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]], fields: Sequence[str]) -> Path:
    buf = io.StringIO()
    writer = csv.DictWriter(
        buf, fieldnames=list(fields), extrasaction="ignore", lineterminator="\n"
    )
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(row.get(k, "")) for k in fields})
    return write_text_atomic(path, buf.getvalue())


def _fields(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    out: dict[str, None] = {}
    for r in rows:
        out.update(dict.fromkeys(r))
    return list(out)


def write_tables(
    ev: Evaluation, out_dir: str | os.PathLike, robustness: Any = None
) -> dict[str, Path]:
    """Write the CSV and Markdown tables; return name -> path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from yoda.evaluate.evaluation import ROW_KEYS

    paths = {
        "metrics": _write_csv(out / "metrics.csv", ev.rows, ROW_KEYS),
        "reference": _write_csv(out / "reference.csv", ev.reference_rows, ROW_KEYS),
        "summary": _write_csv(out / "summary.csv", ev.summary, _fields(ev.summary)),
    }
    if ev.noise_rows:
        paths["noise_curve"] = _write_csv(
            out / "noise_curve.csv", ev.noise_rows, _fields(ev.noise_rows)
        )
    stat_rows = []
    for comparison, key in (
        ("vs_" + ev.reference, "p_vs_reference"),
        ("vs_acquired", "p_vs_acquired"),
    ):
        for method, ps in ev.stats[key].items():
            for metric, p in ps.items():
                n = ev.stats["n_vs_reference"].get(method, {}).get(metric, "")
                stat_rows.append(
                    {
                        "method": method,
                        "metric": metric,
                        "comparison": comparison,
                        "p": p,
                        "n_pairs": n if key == "p_vs_reference" else "",
                    }
                )
    for method, icc in ev.stats["icc"].items():
        ba = ev.stats["bland_altman"].get(method, {})
        stat_rows.append(
            {
                "method": method,
                "metric": "lesion_ml",
                "comparison": "icc_3_1_vs_acquired",
                "p": "",
                "n_pairs": icc["n"],
                "value": icc["icc"],
                "ci_low": icc["low"],
                "ci_high": icc["high"],
                "mean_diff": ba.get("mean_diff", ""),
                "loa_low": ba.get("loa_low", ""),
                "loa_high": ba.get("loa_high", ""),
            }
        )
    paths["stats"] = _write_csv(
        out / "stats.csv",
        stat_rows,
        [
            "method",
            "metric",
            "comparison",
            "p",
            "n_pairs",
            "value",
            "ci_low",
            "ci_high",
            "mean_diff",
            "loa_low",
            "loa_high",
        ],
    )
    if ev.lesion_volumes:
        names = list(ev.lesion_volumes)
        vol_rows = [
            {"subject": s, **{n: ev.lesion_volumes[n].get(s, math.nan) for n in names}}
            for s in ev.subjects
        ]
        paths["lesion_volumes"] = _write_csv(
            out / "lesion_volumes.csv", vol_rows, ["subject", *names]
        )
    paths["summary_md"] = write_text_atomic(out / "summary.md", summary_markdown(ev, robustness))
    if robustness is not None:
        paths["robustness"] = _write_csv(
            out / "robustness.csv", robustness.rows, _fields(robustness.rows)
        )
        paths["robustness_summary"] = _write_csv(
            out / "robustness_summary.csv", robustness.summary, _fields(robustness.summary)
        )
    return paths


# --------------------------------------------------------------------------- figures


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, metadata={"Software": None})
    return buf.getvalue()


def _window(img: np.ndarray, mask: np.ndarray | None) -> float:
    vals = img[mask] if mask is not None and mask.any() else img[img > 0]
    if vals.size == 0:
        return 255.0
    return max(float(np.percentile(vals, 99.5)) * 1.05, 1.0)


def _show(
    ax: Any, img: np.ndarray, title: str, vmin: float, vmax: float, cmap: str = "gray"
) -> Any:
    im = ax.imshow(img, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    return im


def figure_examples(ev: Evaluation) -> Any | None:
    """Axial slices of the example subject: targets and methods, and differences vs acquired."""
    sid = ev.example_subject
    thumb = ev.thumbnails.get(sid) if sid else None
    if thumb is None:
        return None
    panels: list[tuple[str, np.ndarray]] = [("acquired", thumb["target"])]
    if thumb["clean"] is not None:
        panels.append(("clean", thumb["clean"]))
    panels += [(n, thumb["methods"][n]) for n in ev.method_names if n in thumb["methods"]]
    mask = thumb["mask"]
    vmax = _window(thumb["target"], mask)
    diffs = {n: np.where(mask, img - thumb["target"], 0.0) for n, img in panels[1:]}
    dmax = max(
        [float(np.percentile(np.abs(d[mask]), 99)) for d in diffs.values() if mask.any()] + [1.0]
    )
    n = len(panels)
    fig = _figure(2.0 * n + 0.8, 4.4)
    axes = fig.subplots(2, n, squeeze=False)
    im = dim = None
    for j, (name, img) in enumerate(panels):
        im = _show(axes[0, j], img, name, 0.0, vmax)
        if name in diffs:
            dim = _show(axes[1, j], diffs[name], f"{name} − acquired", -dmax, dmax, "RdBu_r")
        else:
            axes[1, j].axis("off")
    fig.colorbar(im, ax=list(axes[0]), shrink=0.8, label="0-255 scale")
    if dim is not None:
        fig.colorbar(dim, ax=list(axes[1]), shrink=0.8, label="difference")
    fig.suptitle(f"{sid}, axial slice z = {thumb['z']} (one window per row)", fontsize=9)
    return fig


def _means(rows: Iterable[Mapping[str, Any]], key: str) -> float:
    vals = [float(r[key]) for r in rows if _finite(r.get(key))]
    return float(np.mean(vals)) if vals else math.nan


def figure_perception(ev: Evaluation) -> Any | None:
    """SSIM vs the noise level sigma_WM (Fig. 6b analogue); FID vs SSIM when FID exists."""
    if not ev.has("sigma_wm"):
        return None
    panels = ["ssim_acq"] + (["ssim_clean"] if ev.has("ssim_clean") else [])
    with_fid = bool(ev.fid)
    n = len(panels) + (1 if with_fid else 0)
    fig = _figure(4.6 * n, 4.0)
    axes = fig.subplots(1, n, squeeze=False)[0]
    summ = {e["method"]: e for e in ev.summary}
    curve = sorted({r["sigma"] for r in ev.noise_rows})
    curve_pts = {s: [r for r in ev.noise_rows if r["sigma"] == s] for s in curve}
    colors = _colors(len(ev.method_names))
    for ax, key in zip(axes, panels, strict=False):
        for i, (name, color) in enumerate(zip(ev.method_names, colors, strict=True)):
            e = summ[name]
            x, y = e["sigma_wm_mean"], e[f"{key}_mean"] * 100
            if _finite(x) and _finite(y):
                ax.plot([x], [y], "o", color=color, ms=7, label=name)
                ax.annotate(name, (x, y), textcoords="offset points", xytext=_offset(i), fontsize=7)
        if curve:
            xs = [_means(curve_pts[s], "sigma_wm") for s in curve]
            ys = [_means(curve_pts[s], key) * 100 for s in curve]
            ax.plot(xs, ys, "--", color="0.4", marker=".", label=f"{ev.reference} + Rician noise")
            for s, x, y in zip(curve, xs, ys, strict=True):
                if s > 0 and _finite(x) and _finite(y):
                    ax.annotate(
                        f"σ={s:g}",
                        (x, y),
                        textcoords="offset points",
                        xytext=(4, -9),
                        fontsize=6,
                        color="0.35",
                    )
        for ref, style in (("acquired", "-"), ("clean", ":")):
            if ref in summ and _finite(summ[ref].get("sigma_wm_mean")):
                ax.axvline(
                    summ[ref]["sigma_wm_mean"],
                    color="k",
                    ls=style,
                    lw=1,
                    label=f"{ref} target σ_WM",
                )
        if (
            key == "ssim_clean"
            and "acquired" in summ
            and _finite(summ["acquired"]["ssim_clean_mean"])
        ):
            ax.plot(
                [summ["acquired"]["sigma_wm_mean"]],
                [summ["acquired"]["ssim_clean_mean"] * 100],
                "kx",
                ms=8,
                label="acquired vs clean",
            )
        ax.set_xlabel("noise level σ_WM (Eq. 14, 0-255 scale)")
        ax.set_ylabel(f"{SPEC[key].label} (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="best")
    if with_fid:
        ax = axes[-1]
        for i, (name, color) in enumerate(zip(ev.method_names, colors, strict=True)):
            if name in ev.fid and _finite(summ[name]["ssim_acq_mean"]):
                x, y = summ[name]["ssim_acq_mean"] * 100, ev.fid[name]
                ax.plot([x], [y], "o", color=color, ms=7)
                ax.annotate(name, (x, y), textcoords="offset points", xytext=_offset(i), fontsize=7)
        pts = [
            (_means(curve_pts[s], "ssim_acq") * 100, ev.fid.get(f"{ev.reference}+noise {s:g}"))
            for s in curve
        ]
        if curve and ev.reference in ev.fid:
            pts[0] = (pts[0][0], ev.fid[ev.reference])
        pts = [(x, y) for x, y in pts if y is not None and _finite(x)]
        if pts:
            ax.plot(
                *zip(*pts, strict=True),
                "--",
                color="0.4",
                marker=".",
                label=f"{ev.reference} + Rician noise",
            )
        if "clean" in ev.fid and "clean" in summ:
            ax.plot(
                [summ["clean"]["ssim_acq_mean"] * 100],
                [ev.fid["clean"]],
                "kx",
                ms=8,
                label="clean target",
            )
        ax.set_xlabel("SSIM vs acquired (%) (distortion: higher is better)")
        ax.set_ylabel("FID vs acquired (perception: lower is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="best")
    fig.suptitle("Perception-distortion: means over subjects", fontsize=9)
    return fig


def _offset(i: int) -> tuple[int, int]:
    """Label offsets (points) that differ between methods, so coinciding points stay readable."""
    return (5, 4 + 8 * (i % 3))


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def figure_bland_altman(ev: Evaluation) -> Any | None:
    """Bland-Altman plots of WMH volumes, translated minus acquired, one panel per method."""
    names = [n for n in ev.method_names if n in ev.stats["bland_altman"]]
    if not names or "acquired" not in ev.lesion_volumes:
        return None
    acq = ev.lesion_volumes["acquired"]
    fig = _figure(3.8 * len(names), 3.6)
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    for ax, name in zip(axes, names, strict=True):
        vol = ev.lesion_volumes.get(name, {})
        common = [s for s in vol if s in acq]
        x = np.array([(vol[s] + acq[s]) / 2 for s in common])
        y = np.array([vol[s] - acq[s] for s in common])
        ba = ev.stats["bland_altman"][name]
        icc = ev.stats["icc"].get(name, {})
        ax.plot(x, y, "o", ms=4, alpha=0.8)
        ax.axhline(ba["mean_diff"], color="k", lw=1, label=f"mean {ba['mean_diff']:.2f} ml")
        for k in ("loa_low", "loa_high"):
            ax.axhline(ba[k], color="k", ls="--", lw=0.8)
        ax.axhline(0.0, color="0.6", lw=0.6)
        title = f"{name}: ICC(3,1) {_num(icc.get('icc', math.nan), 3)}"
        if _finite(icc.get("low")):
            title += f" [{icc['low']:.2f}, {icc['high']:.2f}]"
        ax.set_title(title + f", n = {ba['n']}", fontsize=8)
        ax.set_xlabel("mean of translated and acquired (ml)")
        ax.set_ylabel("translated − acquired (ml)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, title="dashed: ±1.96 sd", title_fontsize=6)
    return fig


def figure_qc(ev: Evaluation, method: str, criterion: str) -> Any | None:
    """Worst subjects of one method by one criterion: sources, target, translation."""
    entries = [e for e in ev.qc.get(method, {}).get(criterion, []) if e["subject"] in ev.thumbnails]
    if not entries:
        return None
    first = ev.thumbnails[entries[0]["subject"]]
    src_names = list(first["sources"])
    n_cols = len(src_names) + 2
    fig = _figure(1.9 * n_cols, 2.0 * len(entries) + 0.3)
    axes = fig.subplots(len(entries), n_cols, squeeze=False)
    label = "SSIM vs acquired" if criterion == "ssim" else "Dice"
    for i, e in enumerate(entries):
        t = ev.thumbnails[e["subject"]]
        vmax = _window(t["target"], t["mask"])
        row = [(f"{n}", t["sources"].get(n)) for n in src_names]
        row += [("acquired target", t["target"]), (method, t["methods"].get(method))]
        for j, (name, img) in enumerate(row):
            ax = axes[i, j]
            if img is None:
                ax.axis("off")
                continue
            window = vmax if j >= len(src_names) else _window(img, t["mask"])
            _show(ax, img, name, 0.0, window)
        value = e["value"]
        axes[i, 0].set_ylabel(f"{e['subject']}\n{label} {_num(value * 100, 1)} %", fontsize=7)
    return fig


def figure_robustness(rob: Any) -> Any:
    """SSIM, PSNR and sigma_WM of the translation against the input noise (Fig. 10)."""
    fig = _figure(12.0, 3.6)
    axes = fig.subplots(1, 3)
    xs = [e["sigma_in"] for e in rob.summary]
    for ax, (key, clean_key, label, scale) in zip(
        axes,
        (
            ("ssim_acq", "ssim_clean", "SSIM (%)", 100.0),
            ("psnr_acq", "psnr_clean", "PSNR (dB)", 1.0),
            ("sigma_wm", None, "output noise level σ_WM", 1.0),
        ),
        strict=True,
    ):
        for k, name, style in ((key, "vs acquired", "o-"), (clean_key, "vs clean", "s--")):
            if k is None:
                continue
            ys = np.array([e[f"{k}_mean"] for e in rob.summary], dtype=float) * scale
            es = np.array([e[f"{k}_std"] for e in rob.summary], dtype=float) * scale
            if not np.isfinite(ys).any():
                continue
            ax.errorbar(
                xs,
                ys,
                yerr=np.where(np.isfinite(es), es, 0.0),
                fmt=style,
                ms=4,
                capsize=3,
                label=name if k != "sigma_wm" else rob.mode,
            )
        if key == "sigma_wm":
            for val, style, name in (
                (rob.acquired_sigma_wm, "-", "acquired target"),
                (rob.clean_sigma_wm, ":", "clean target"),
            ):
                if _finite(val):
                    ax.axhline(val, color="k", ls=style, lw=1, label=name)
        ax.set_xlabel("input noise σ (% of the range of each source)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"{rob.mode} sampling with Rician noise added to the inputs (mean ± std)", fontsize=9
    )
    return fig


# --------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1200px;padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.8em 0;font-size:.85em}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f2f2f2}
tr.reference td{background:#fafafa;font-style:italic}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.4em .8em;margin:.4em 0}
.small{font-size:.85em;color:#555}img{max-width:100%;height:auto}
nav a{margin-right:1em}details{margin:.5em 0}
"""


def _e(text: Any) -> str:
    return html.escape(str(text))


def _table(
    header: Sequence[str], rows: Sequence[Sequence[str]], classes: Sequence[str] = ()
) -> str:
    out = ["<table>", "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>"]
    for i, row in enumerate(rows):
        cls = f' class="{classes[i]}"' if i < len(classes) and classes[i] else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<p><img alt="{_e(alt)}" src="data:image/png;base64,{data}"></p>'


class _Figures:
    """Renders figures to PNG, keeps them for the page and writes them to ``figures/``;
    the paths written are appended to ``written``."""

    def __init__(self, folder: Path, written: list[Path]) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.written = written

    def html(self, fig: Any, name: str, alt: str) -> str:
        png = _png(fig)
        path = self.folder / f"{name}.png"
        with atomic_path(path) as tmp:
            tmp.write_bytes(png)
        self.written.append(path)
        return _img(png, alt)


def _section(sid: str, body: Sequence[str]) -> str:
    title = dict(SECTIONS)[sid]
    return f'<section id="{sid}">\n<h2>{_e(title)}</h2>\n' + "\n".join(body) + "\n</section>"


def _scored_text(ev: Evaluation) -> str:
    """How many subjects of the split were scored, e.g. "2 of 3 subject(s) scored"."""
    return f"{len(ev.scored_subjects())} of {ev.n_split} subject(s) scored"


def _overview(ev: Evaluation) -> list[str]:
    out = [
        "<p>"
        f"Target <b>{_e(ev.target)}</b>; manifest {_e(ev.manifest)}; {_e(ev.where)}; "
        f"{_scored_text(ev)}; reference method for the paired tests: "
        f"<b>{_e(ev.reference)}</b>.</p>"
    ]
    vs = ev.settings.get("voxel_sizes") or []
    if vs:
        out.append(
            "<p>Voxel size(s): "
            + ", ".join(" × ".join(f"{v:g}" for v in t) for t in vs)
            + " mm.</p>"
        )
    header = ["method", "folder", "subjects", "missing", "how it was run"]
    rows = [
        [m.name, str(m.folder), str(len(m.files)), str(len(m.missing)), m.description]
        for m in ev.methods
    ]
    out.append(_table(header, rows))
    previews = [n for n in ev.notes if f"({PREVIEW_LABEL})" in n]
    for n in previews:
        out.append(f'<p class="note">{_e(n)}</p>')
    if ev.missing:
        out.append("<p>Missing predictions (evaluated without them):</p>")
        out.append(
            _table(
                ["method", "subjects without a prediction"],
                [[k, ", ".join(v)] for k, v in ev.missing.items()],
            )
        )
    else:
        out.append("<p>Every method has a prediction for every subject of the split.</p>")
    others = [n for n in ev.notes if n not in previews]
    if others:
        out.append("<p>Notes:</p><ul>" + "".join(f"<li>{_e(n)}</li>" for n in others) + "</ul>")
    return out


def _statistics_html(ev: Evaluation) -> list[str]:
    out = [f"<p class='small'>{_e(ev.stats['test'])}.</p>"]
    keys = [s.key for s in METRICS if ev.has(s.key)]
    for title, key in (
        (f"p-values vs {ev.reference}", "p_vs_reference"),
        ("p-values vs the acquired target", "p_vs_acquired"),
    ):
        table = ev.stats[key]
        if not table:
            continue
        rows = []
        for method, ps in table.items():
            rows.append([method, *[_p(ps.get(k, math.nan)) for k in keys]])
        out.append(f"<h3>{_e(title)}</h3>")
        out.append(_table(["method", *[SPEC[k].label for k in keys]], rows))
    if len(ev.subjects) < 6:
        out.append(
            f"<p class='small'>With {len(ev.subjects)} subjects the two-sided Wilcoxon test "
            "cannot reach p &lt; 0.05 (its smallest p-value is 2 / 2^n).</p>"
        )
    return out


def _lesion_html(ev: Evaluation, figs: _Figures) -> list[str]:
    if not ev.lesion_volumes:
        return ["<p>No WMH volumes: the target is not FLAIR-like or no white-matter mask.</p>"]
    out = []
    fig = figure_bland_altman(ev)
    if fig is not None:
        out.append(figs.html(fig, "bland_altman", "Bland-Altman plots of WMH volumes"))
    else:
        out.append("<p>Bland-Altman and ICC need at least 2 subjects with WMH volumes.</p>")
    rows = []
    for name in ev.method_names:
        icc = ev.stats["icc"].get(name)
        ba = ev.stats["bland_altman"].get(name)
        if icc is None or ba is None:
            continue
        rows.append(
            [
                name,
                str(icc["n"]),
                _num(icc["icc"], 3),
                f"[{_num(icc['low'], 2)}, {_num(icc['high'], 2)}]",
                _num(ba["mean_diff"], 2),
                f"[{_num(ba['loa_low'], 2)}, {_num(ba['loa_high'], 2)}]",
            ]
        )
    if rows:
        out.append(
            _table(
                [
                    "method",
                    "n",
                    "ICC(3,1)",
                    "95 % CI",
                    "mean diff (ml)",
                    "limits of agreement (ml)",
                ],
                rows,
            )
        )
    vols = ev.lesion_volumes
    names = list(vols)
    out.append("<details><summary>WMH volumes per subject (ml)</summary>")
    out.append(
        _table(
            ["subject", *names],
            [[s, *[_num(vols[n].get(s, math.nan), 2) for n in names]] for s in ev.subjects],
        )
    )
    out.append("</details>")
    out.append(
        "<p class='small'>WMH volumes of the segmentation rule applied to each image; "
        "'labels' are the reference lesion labels. Differences are translated − acquired.</p>"
    )
    return out


def _qc_html(ev: Evaluation, figs: _Figures) -> list[str]:
    frac = ev.settings.get("qc_fraction", 0.1)
    out = [
        f"<p>Worst {frac * 100:.0f} % of the subjects (at least one) per method by SSIM vs "
        "the acquired target and by downstream Dice; thumbnails: axial slice through the "
        "centre of the brain mask (sources, acquired target, translation).</p>"
    ]
    rows = []
    for name in ev.method_names:
        for crit, entries in ev.qc.get(name, {}).items():
            label = "SSIM" if crit == "ssim" else "Dice"
            rows.append(
                [
                    name,
                    label,
                    ", ".join(f"{e['subject']} ({_num(e['value'] * 100, 2)} %)" for e in entries),
                ]
            )
    out.append(_table(["method", "criterion", "worst subjects"], rows))
    for name in ev.method_names:
        for crit in ev.qc.get(name, {}):
            fig = figure_qc(ev, name, crit)
            if fig is not None:
                safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
                out.append(f"<h3>{_e(name)}: worst by {'SSIM' if crit == 'ssim' else 'Dice'}</h3>")
                out.append(figs.html(fig, f"qc_{safe}_{crit}", f"worst cases of {name} by {crit}"))
    return out


def _robustness_html(rob: Any, figs: _Figures) -> list[str]:
    if rob is None:
        return [
            "<p>Not evaluated: run <code>yoda evaluate ... --input-noise 0,2,4,6 --model "
            "MODEL_DIR</code> to add Rician noise to the inputs and translate them again.</p>"
        ]
    out = [
        f"<p>{_e(rob.mode)} sampling, {len(rob.subjects)} subject(s); Rician noise of std σ, "
        "in % of the range of each source as in the paper's Fig. 10 (σ = 4: std 10.2 on the "
        "source's own 0-255 scale, the model's normalization fitted in the brain mask).</p>",
        figs.html(figure_robustness(rob), "robustness", "metrics against the input noise"),
    ]
    out.append(_table(*robustness_table(rob)))
    if _finite(rob.acquired_sigma_wm):
        out.append(
            f"<p>Acquired target σ_WM: {rob.acquired_sigma_wm:.2f}"
            + (f"; clean target: {rob.clean_sigma_wm:.2f}" if _finite(rob.clean_sigma_wm) else "")
            + ".</p>"
        )
    for n in rob.notes:
        out.append(f'<p class="small">{_e(n)}</p>')
    return out


def _per_subject_html(ev: Evaluation) -> list[str]:
    keys = [s.key for s in METRICS if ev.has(s.key)]
    head = [
        "subject",
        "method",
        "time (s)",
        "NFE",
        *[
            SPEC[k].label
            + (f" ({SPEC[k].unit})" if SPEC[k].unit and SPEC[k].unit != "0-255" else "")
            for k in keys
        ],
    ]
    rows, classes = [], []
    for r in sorted(
        ev.rows + ev.reference_rows,
        key=lambda r: ev.subjects.index(r["subject"]) if r["subject"] in ev.subjects else 0,
    ):
        rows.append(
            [
                r["subject"],
                r["method"],
                _num(r["time_s"], 1),
                _num(r["nfe"], 0),
                *[_num(r[k] * SPEC[k].scale, SPEC[k].digits) for k in keys],
            ]
        )
        classes.append("reference" if r["method"] in REFERENCES else "")
    return [
        "<details open><summary>One row per subject and method (also in metrics.csv; the "
        "reference rows in reference.csv)</summary>",
        _table(head, rows, classes),
        "</details>",
    ]


_DEFINITIONS = """
<ul>
<li><b>Scales.</b> Translations are on the model's 0-255 output scale. The acquired target is
mapped to the same scale with the model's intensity normalization ({norms}) fitted inside the
brain mask; the noise-free target (phantom) with the acquired target's fit, so both references
share one scale.</li>
<li><b>SSIM, PSNR</b> (Sec. III-F): inside the brain mask (the manifest's mask, else the
target's foreground mask), data range 255, on the mask's bounding box with voxels outside the
mask set to 0; SSIM with a 3-D Gaussian window (σ 1.5 voxels); PSNR from the mean squared error
over the box (inf for identical images).</li>
<li><b>σ_WM</b> (Eq. 14): RMS of the image minus its Gaussian blur (kernel 5, σ 1.1 voxels)
restricted to white matter, on white matter eroded by one voxel; about 0.96 times the standard
deviation of white noise.</li>
<li><b>Lesion CNR</b> (Eq. 15): per connected lesion (mean lesion − mean white matter within
3 mm) / std of that white matter, averaged weighted by lesion size; undefined when no white
matter voxel lies within 3 mm (e.g. voxels larger than 3 mm).</li>
<li><b>Downstream WMH segmentation</b>: a fixed rule applied to acquired and translated
images alike: voxels brighter than 1.4 × the median white-matter intensity, inside the white
matter (including the labelled lesions), components of ≥ 2 voxels; scored against the lesion
labels by Dice, HD95 (mm) and ALVR = |log2(volume ratio)|.</li>
<li><b>Perception-distortion</b>: the {ref} output with Rician noise of σ = {sigmas} (0-255
scale, fixed seed) added, scored like the methods.</li>
<li><b>FID</b>: Fréchet distance of ResNet-50 features of the masked axial slices of all
subjects vs those of the acquired targets ({fid}).</li>
<li><b>Statistics</b>: mean ± std over subjects; two-sided Wilcoxon signed-rank tests paired by
subject, no multiple-comparison correction; ICC(3,1) with its 95 % F-test interval; Bland-Altman
mean difference and limits of agreement (±1.96 sd).</li>
</ul>
"""


def _safe_name(name: Any) -> bool:
    """Whether ``name`` from an index is a relative path that stays inside the folder."""
    if not isinstance(name, str) or not name or "\\" in name:
        return False
    parts = PurePosixPath(name).parts
    return not PurePosixPath(name).is_absolute() and ".." not in parts and name != REPORT_INDEX


def report_files(out_dir: str | os.PathLike) -> list[str] | None:
    """The files (relative paths) the report in ``out_dir`` wrote, from its ``report.json``;
    None when the folder holds no report."""
    try:
        index = json.loads((Path(out_dir) / REPORT_INDEX).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if (
        not isinstance(index, dict)
        or index.get("format") != _INDEX_FORMAT
        or not isinstance(index.get("files"), list)
    ):
        return None
    return [f for f in index["files"] if _safe_name(f)]


def _write_index(out: Path, files: Sequence[str]) -> None:
    index = {"format": _INDEX_FORMAT, "version": 1, "yoda": __version__, "files": list(files)}
    write_text_atomic(out / REPORT_INDEX, json.dumps(index, indent=1) + "\n")


def write_report(
    evaluation: Evaluation, out_dir: str | os.PathLike, *, robustness: Any = None
) -> Path:
    """Write the tables, figures and ``report.html`` into ``out_dir``; return the page's path.

    An earlier report in ``out_dir`` is replaced: its files that this report does not write
    again are removed (only those its ``report.json`` lists; other files are kept).

    Parameters
    ----------
    evaluation : the result of :func:`yoda.evaluate.evaluation.evaluate`.
    out_dir : report folder (created).
    robustness : optional result of :func:`yoda.evaluate.robustness.robustness`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    earlier = report_files(out) or []
    written: list[Path] = []
    try:
        page = _write_report(evaluation, out, robustness, written)
    except BaseException:
        # the next report here removes what this one left, as well as the earlier files
        names = list(dict.fromkeys([*earlier, *(p.relative_to(out).as_posix() for p in written)]))
        if names:
            with contextlib.suppress(OSError):
                _write_index(out, names)
        raise
    names = list(dict.fromkeys(p.relative_to(out).as_posix() for p in written))
    _remove(out, [name for name in earlier if name not in names])
    _write_index(out, names)
    return page


def _remove(out: Path, names: Iterable[str]) -> None:
    """Remove the files ``names`` (relative to ``out``) that are plain files inside it."""
    root = out.resolve()
    for name in names:
        old = out / name
        if old.is_file() and not old.is_symlink() and old.parent.resolve().is_relative_to(root):
            old.unlink(missing_ok=True)


def _write_report(ev: Evaluation, out: Path, robustness: Any, written: list[Path]) -> Path:
    """The body of :func:`write_report`: every path written is appended to ``written``."""
    written.extend(write_tables(ev, out, robustness).values())
    figs = _Figures(out / "figures", written)
    header, body = summary_table(ev)
    classes = ["reference" if e["kind"] == "reference" else "" for e in ev.summary]
    sections: list[str] = []
    sections.append(_section("overview", _overview(ev)))
    summary_body = [
        _table(header, body, classes),
        f"<p class='small'>{_e(_legend(ev))}</p>",
        "<ul>" + "".join(f"<li>{_e(h)}</li>" for h in highlights(ev)) + "</ul>",
    ]
    if not ev.fid:
        fid_note = next((n for n in ev.notes if n.startswith("FID skipped")), "FID not computed")
        summary_body.append(f"<p class='small'>{_e(fid_note)}.</p>")
    sections.append(_section("summary", summary_body))
    sections.append(_section("statistics", _statistics_html(ev)))
    fig = figure_examples(ev)
    sections.append(
        _section(
            "examples",
            [
                figs.html(fig, "examples", "example slices and differences")
                if fig is not None
                else "<p>No example subject.</p>",
                "<p class='small'>Top: acquired target, clean target (phantom) and each method, "
                "one window. Bottom: difference to the acquired target inside the brain mask, one "
                "window.</p>",
            ],
        )
    )
    fig = figure_perception(ev)
    sections.append(
        _section(
            "perception-distortion",
            [
                figs.html(fig, "perception_distortion", "SSIM against the noise level")
                if fig is not None
                else "<p>Not available: the noise level σ_WM needs a white-matter mask.</p>",
                "<p class='small'>One point per method (mean over subjects); the dashed curve is "
                f"the {_e(ev.reference)} output with Rician noise added; vertical lines mark the "
                "noise level of the acquired (solid) and clean (dotted) targets.</p>",
            ],
        )
    )
    sections.append(_section("lesion-volumes", _lesion_html(ev, figs)))
    sections.append(_section("quality-control", _qc_html(ev, figs)))
    sections.append(_section("robustness", _robustness_html(robustness, figs)))
    sections.append(_section("per-subject", _per_subject_html(ev)))
    norms = ", ".join(f"{k}: {v}" for k, v in ev.settings["normalization"].items())
    sigmas = ", ".join(f"{s:g}" for s in ev.settings["noise_sigmas"])
    fid_text = ev.settings.get("fid_weights") or "not computed: no weights file given"
    sections.append(
        _section(
            "definitions",
            [
                _DEFINITIONS.format(
                    norms=_e(norms), ref=_e(ev.reference), sigmas=sigmas, fid=_e(fid_text)
                )
            ],
        )
    )
    nav = " ".join(f'<a href="#{sid}">{_e(title)}</a>' for sid, title in SECTIONS)
    page = "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>YODA evaluation: {_e(ev.target)}</title>",
            f"<style>{_CSS}</style></head><body>",
            f"<h1>YODA evaluation: {_e(ev.target)} ({len(ev.scored_subjects())} subjects, "
            f"{len(ev.methods)} methods)</h1>",
            f"<nav>{nav}</nav>",
            *sections,
            f"<p class='small'>yoda {_e(__version__)}. Tables: metrics.csv, reference.csv, "
            "summary.csv, summary.md, stats.csv in this folder.</p>",
            "</body></html>",
        ]
    )
    path = write_text_atomic(out / "report.html", page)
    written.append(path)
    return path
