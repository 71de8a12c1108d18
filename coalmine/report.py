"""`coalmine report`: one self-contained HTML file for a backtest or a stretch of live traffic.

Per model: a summary (what fired, when, for how long; the commands issued, with their
evidence), each check's statistics against their calibrated thresholds over event time with the
alert spans shaded, each feature's reference distribution beside the window's at its worst
moment with a table of features sorted by how far past their thresholds they went, and, when
the traffic had a shadow or a canary, the rollout panels.

The input is what stage 2 said: evaluations (folded as they come, so a long backtest is not
held in memory), alerts and commands, from a replay run here (:func:`report_from_files`) or from
a replay's output files (:func:`report_from_outputs`). Plots are matplotlib figures inlined as
SVG; a Content-Security-Policy forbids every fetch, so the file shows the same offline. Series
longer than :data:`MAX_BINS` bins are decimated for drawing (each bin keeps its lowest and
highest point, so no peak or threshold crossing disappears); the tables use every evaluation.
"""

from __future__ import annotations

import html
import io
import math
import re
from array import array
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from coalmine.streams.records import Evaluation, Window

if TYPE_CHECKING:
    from coalmine.replay import Replay

#: bins a plotted series is decimated to (two points each): about the pixels of a plot's width
MAX_BINS = 300
#: checks judged on a shadow or canary, drawn in the rollout panels rather than per check
ROLLOUT_CHECKS = ("shadow_agreement", "shadow_accuracy", "canary_health", "ab_test", "srm")
#: checks whose statistics are per column, drawn as distributions
DISTRIBUTION_CHECKS = ("drift", "prediction_drift")
#: features drawn in colour in a check's plot (the rest in grey): the ones that went furthest
COLOURED = 6


def _ratio(value: float, threshold: float) -> float:
    """How far a statistic went relative to its threshold (1: at it)."""
    if threshold > 0:
        return value / threshold
    return math.inf if value > 0 else 0.0


@dataclass
class Series:
    """One statistic of one (variant, check, feature) over event time; ``threshold`` is NaN
    where the evaluation had none."""

    ts: array = field(default_factory=lambda: array("q"))
    value: array = field(default_factory=lambda: array("d"))
    threshold: array = field(default_factory=lambda: array("d"))


class Collector:
    """Folds evaluations into what the report draws: a series per (model, variant, check,
    feature, statistic), the worst evaluation per (model, variant, check, feature), and the
    rollout checks' evaluations as they are (a few per bucket)."""

    def __init__(self) -> None:
        self.series: dict[tuple, Series] = defaultdict(Series)
        self.worst: dict[tuple, tuple[float, Evaluation]] = {}
        self.rollout: dict[str, list[Evaluation]] = defaultdict(list)
        self.extent: dict[str, list[int]] = {}
        self.count: dict[str, int] = defaultdict(int)

    def add(self, evaluations: Iterable[Evaluation]) -> None:
        for e in evaluations:
            self.count[e.model] += 1
            span = self.extent.setdefault(e.model, [e.ts, e.ts])
            span[0], span[1] = min(span[0], e.ts), max(span[1], e.ts)
            if e.check in ROLLOUT_CHECKS:
                self.rollout[e.model].append(e)
            if e.threshold is None:
                continue  # reported, never alarmed on: nothing to draw it against
            s = self.series[(e.model, e.variant, e.check, e.feature, e.statistic)]
            s.ts.append(e.ts)
            s.value.append(e.value)
            s.threshold.append(e.threshold)
            key = (e.model, e.variant, e.check, e.feature)
            ratio = _ratio(e.value, e.threshold)
            if key not in self.worst or ratio > self.worst[key][0]:
                self.worst[key] = (ratio, e)

    def add_json(self, records: Iterable[dict]) -> None:
        """Evaluations in their JSON form (a replay's ``--evaluations`` lines)."""
        common = set(Evaluation.__slots__) - {"evidence"}  # type: ignore[attr-defined]
        self.add(
            Evaluation(
                model=r["model"],
                ts=r["ts"],
                window=Window(**r["window"]),
                variant=r["variant"],
                check=r["check"],
                feature=r.get("feature"),
                statistic=r["statistic"],
                value=r["value"],
                threshold=r.get("threshold"),
                p_value=r.get("p_value"),
                evidence={k: v for k, v in r.items() if k not in common},
            )
            for r in records
        )


def read_jsonl(path: str | Path) -> Iterator[dict]:
    """The JSON objects of a JSONL file, one at a time."""
    with open(path, "rb") as fh:
        for line in fh:
            if not line.isspace():
                yield orjson.loads(line)


# ------------------------------------------------------------------ building a report


def report_from_files(
    config_path: str | Path,
    predictions: str | Path,
    labels: str | Path | None = None,
    *,
    progress: bool | None = None,
) -> str:
    """Replay prediction (and label) files with a config and report on what it said."""
    from coalmine.config import load_config
    from coalmine.replay import file_chunks, replay_files

    config = load_config(config_path)
    collector = Collector()
    run = replay_files(
        config,
        Path(predictions),
        Path(labels) if labels else None,
        progress=progress,
        on_evaluations=collector.add,
    )
    windows = window_values(file_chunks(Path(predictions)), _worst_windows(collector))
    source = f"replay of {Path(predictions).name} with {Path(config_path).name}"
    return _render_replay(run, collector, windows, source)


def report_from_topics(
    config_path: str | Path,
    slices: tuple,
    bootstrap: str,
    since: int | None,
    until: int | None,
    *,
    progress: bool | None = None,
) -> str:
    """Replay the prediction and label topics' ``slices`` of messages with Kafka timestamps in
    ``[since, until)``, already open (:func:`coalmine.slices.read_slices`, as
    :func:`coalmine.replay.replay_slices` takes them), and report on what it said; the
    windows' distributions come from a second read of the same slice of predictions."""
    from coalmine import topics
    from coalmine.config import load_config
    from coalmine.replay import replay_slices, topic_chunks
    from coalmine.slices import TopicSlice

    config = load_config(config_path)
    collector = Collector()
    run = replay_slices(config, *slices, progress=progress, on_evaluations=collector.add)
    with TopicSlice(bootstrap, topics.PREDICTIONS, since, until) as preds:
        windows = window_values(topic_chunks(preds), _worst_windows(collector))
    source = f"replay of topics {topics.PREDICTIONS}, {topics.LABELS} with {Path(config_path).name}"
    return _render_replay(run, collector, windows, source)


def _render_replay(run: Replay, collector: Collector, windows: dict, source: str) -> str:
    """The report of a replay: what it said, beside its models' reference distributions."""
    return render(
        collector,
        [a.to_json() for a in run.alerts],
        [c.to_json() for c in run.commands],
        references={name: b.reference.columns for name, b in run.baselines.items()},
        windows=windows,
        source=source,
    )


def report_from_outputs(
    evaluations: str | Path,
    alerts: str | Path,
    commands: str | Path | None = None,
    *,
    config_path: str | Path | None = None,
    predictions: str | Path | None = None,
) -> str:
    """Report on a replay's output files. The distributions need the config (for the
    references) and the predictions (for the windows); without them that section says so."""
    collector = Collector()
    collector.add_json(read_jsonl(evaluations))
    references: dict[str, dict[str, np.ndarray]] | None = None
    if config_path is not None:
        from coalmine.config import load_config
        from coalmine.reference_files import load_reference

        config = load_config(config_path)
        references = {
            name: load_reference(m.reference, m.features).columns
            for name, m in config.models.items()
            if m.reference is not None
        }
    windows = None
    if predictions is not None:
        from coalmine.replay import file_chunks

        windows = window_values(file_chunks(Path(predictions)), _worst_windows(collector))
    return render(
        collector,
        list(read_jsonl(alerts)),
        list(read_jsonl(commands)) if commands else [],
        references=references,
        windows=windows,
        source=f"replay outputs {Path(evaluations).name}, {Path(alerts).name}"
        + (f", {Path(commands).name}" if commands else ""),
    )


def _worst_windows(collector: Collector) -> dict[tuple[str, str], tuple[str, Evaluation]]:
    """Per (model, column) of a distribution check, the variant and evaluation at the column's
    worst moment (the largest statistic-to-threshold ratio over variants and statistics)."""
    best: dict[tuple[str, str], tuple[float, str, Evaluation]] = {}
    for (model, variant, check, feature), (ratio, e) in collector.worst.items():
        if check in DISTRIBUTION_CHECKS and feature is not None:
            if (model, feature) not in best or ratio > best[(model, feature)][0]:
                best[(model, feature)] = (ratio, variant, e)
    return {key: (variant, e) for key, (_, variant, e) in best.items()}


def window_values(
    raw_chunks: Iterable[list[bytes]], wanted: dict[tuple[str, str], tuple[str, Evaluation]]
) -> dict[tuple[str, str], list]:
    """The values of each wanted (model, column) in the events of its variant inside its
    evaluation's window, read from raw prediction messages in event-time order (stops once
    past the last window)."""
    from coalmine.streams.reference import event_rows

    out: dict[tuple[str, str], list] = {key: [] for key in wanted}
    if not wanted:
        return out
    last = max(e.window.end_ts for _, e in wanted.values())
    by_source: dict[tuple[str, str], list[tuple[str, Window]]] = defaultdict(list)
    for (model, column), (variant, e) in wanted.items():
        by_source[(model, variant)].append((column, e.window))
    for raws in raw_chunks:
        oldest = math.inf
        for raw in raws:
            try:
                event = orjson.loads(raw)
                ts, source = event["ts"], (event["model"], event["variant"])
            except (orjson.JSONDecodeError, KeyError, TypeError):
                continue  # dead-lettered by the replay; not part of any window
            oldest = min(oldest, ts)
            for column, w in by_source.get(source, ()):
                if w.start_ts <= ts < w.end_ts:
                    for row in event_rows([event]):
                        out[(source[0], column)].append(row.get(column))
        if oldest >= last:
            break
    return out


# ------------------------------------------------------------------ plots


def _decimate(n: int, values: np.ndarray) -> np.ndarray:
    """Indices of the points to draw: all when few, else each of :data:`MAX_BINS` bins' lowest
    and highest (in time order), so peaks and crossings survive."""
    if n <= 2 * MAX_BINS:
        return np.arange(n)
    edges = np.linspace(0, n, MAX_BINS + 1).astype(int)
    keep = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        chunk = values[lo:hi]
        keep += sorted({lo + int(np.nanargmin(chunk)), lo + int(np.nanargmax(chunk))})
    return np.array(keep)


_PATH = re.compile(r' d="[^"]*"')
_DECIMALS = re.compile(r"(\d\.\d)\d+")
_ELEMENT_ID = re.compile(r' id="[A-Za-z][\w.]*_\d+"')
_INDENT = re.compile(r">\s+<")
_NO_METADATA = {"Date": None, "Creator": None, "Format": None, "Type": None}


def _times(ts: np.ndarray | list) -> np.ndarray:
    return np.asarray(ts, dtype="int64").astype("datetime64[ms]")


class Plotter:
    """Matplotlib figures (no pyplot, no global state) to inline SVG, text kept as text (small,
    searchable) and ids salted so the same data always gives the same file."""

    RC: dict[str, Any] = {
        "svg.fonttype": "none",
        "svg.hashsalt": "coalmine",
        "font.size": 8,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.grid": True,
        "grid.alpha": 0.3,
    }

    def __init__(self) -> None:
        # imported here: matplotlib is the `report` extra, not a dependency of the monitor
        import matplotlib
        from matplotlib.figure import Figure

        self.mpl: Any = matplotlib  # its rc_context keys are typed as literals; ours are fine
        self.Figure = Figure

    def figure(self, rows: int = 1, width: float = 9.0, height: float = 2.2):
        with self.mpl.rc_context(self.RC):
            # fixed margins: a constrained layout would take half the report's time
            fig = self.Figure(figsize=(width, height * rows))
            axes = fig.subplots(rows, 1, squeeze=False, sharex=True)[:, 0]
            fig.subplots_adjust(
                left=0.7 / width, right=0.99, bottom=0.35 / (height * rows), top=0.97, hspace=0.25
            )
        return fig, axes

    def svg(self, fig) -> str:
        buf = io.StringIO()
        with self.mpl.rc_context(self.RC):
            fig.savefig(buf, format="svg", metadata=_NO_METADATA)
        text = buf.getvalue()
        # path coordinates to 0.1 px (matplotlib writes 6 decimals): a third of the bytes
        text = _PATH.sub(lambda m: _DECIMALS.sub(r"\1", m.group(0)), text)
        # matplotlib's element ids (figure_1, line2d_3, ...) repeat in every figure: ids must be
        # unique in one page, and nothing refers to these (clip paths and markers are hashed)
        text = _ELEMENT_ID.sub("", _INDENT.sub("><", text))
        return text[text.index("<svg") :]

    def time_axis(self, ax) -> None:
        from matplotlib.dates import AutoDateLocator, ConciseDateFormatter

        locator = AutoDateLocator()
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))


def _merged(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The union of time spans (alerts of several features overlap: shading each would stack)."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _shade(ax, spans: list[tuple[int, int]]) -> None:
    for start, end in _merged(spans):
        ax.axvspan(*_times([start, end]), color="#d62728", alpha=0.15, lw=0)


def _with_gaps(ts: np.ndarray, *ys: np.ndarray) -> tuple[np.ndarray, ...]:
    """Times and values with a break (NaT, NaN) after every gap over 5 typical steps, so a
    canary off traffic or a silent stretch is not drawn as a straight line across."""
    steps = np.diff(ts)
    if len(steps) < 2:
        return (_times(ts), *ys)
    at = np.flatnonzero(steps > 5 * max(1.0, float(np.median(steps)))) + 1
    return (
        np.insert(_times(ts), at, np.datetime64("NaT")),
        *(np.insert(np.asarray(y, dtype=float), at, np.nan) for y in ys),
    )


def _check_figure(
    plot: Plotter,
    stats: dict[str, dict[str | None, Series]],
    spans: list[tuple[int, int]],
) -> str:
    """One axis per statistic: a single column's value against its threshold, or, for many
    columns, each one's value over its threshold (1 = at it), the furthest ones in colour."""
    fig, axes = plot.figure(len(stats))
    for ax, (statistic, columns) in zip(axes, sorted(stats.items())):
        _shade(ax, spans)
        if len(columns) == 1:
            ((feature, s),) = columns.items()
            v, t = np.frombuffer(s.value), np.frombuffer(s.threshold)
            keep = _decimate(len(v), v)
            x, v, t = _with_gaps(np.frombuffer(s.ts, dtype="int64")[keep], v[keep], t[keep])
            ax.plot(x, v, lw=1, color="#1f77b4", label=feature or statistic)
            ax.step(x, t, where="post", lw=1, ls="--", color="#d62728", label="threshold")
            ax.set_ylabel(statistic)
        else:
            worst = sorted(
                columns,
                key=lambda f: (
                    -np.max(np.frombuffer(columns[f].value) / np.frombuffer(columns[f].threshold))
                ),
            )
            for rank, feature in enumerate(worst):
                s = columns[feature]
                r = np.frombuffer(s.value) / np.frombuffer(s.threshold)
                keep = _decimate(len(r), r)
                x, r = _with_gaps(np.frombuffer(s.ts, dtype="int64")[keep], r[keep])
                coloured = rank < COLOURED
                ax.plot(
                    x,
                    r,
                    lw=1 if coloured else 0.6,
                    color=None if coloured else "#bbbbbb",
                    label=feature if coloured else None,
                    zorder=3 if coloured else 2,
                )
            ax.axhline(1.0, ls="--", lw=1, color="#d62728", label="threshold")
            ax.set_ylim(top=max(ax.get_ylim()[1], 1.5))  # room for the legend above the line
            ax.set_ylabel(f"{statistic} / threshold")
        ax.legend(loc="upper left", fontsize=7, ncols=4, frameon=False)
        plot.time_axis(ax)
    return plot.svg(fig)


def _distribution_figure(plot: Plotter, name: str, reference: np.ndarray, window: list) -> str:
    """The reference's histogram beside the window's (shares of each, on common bins)."""
    fig, (ax,) = plot.figure(1, width=4.2, height=2.0)
    if reference.dtype == object:  # categorical: the reference's categories, then new ones
        ref = [v for v in reference if v is not None]
        win = [str(v) for v in window if v is not None]
        cats = list(dict.fromkeys(ref + win))[:30]
        x = np.arange(len(cats))
        for offset, values, label in ((-0.2, ref, "reference"), (0.2, win, "window")):
            counts = np.array([values.count(c) for c in cats], dtype=float)
            ax.bar(x + offset, counts / max(1, len(values)), width=0.4, label=label)
        ax.set_xticks(x, cats, rotation=45, fontsize=6)
    else:
        ref_f = reference[~np.isnan(reference)]
        win_f = np.array([v for v in window if isinstance(v, int | float)], dtype=float)
        both = np.concatenate([ref_f, win_f]) if len(win_f) else ref_f
        lo, hi = np.nanquantile(both, [0.001, 0.999]) if len(both) else (0.0, 1.0)
        edges = np.linspace(lo, hi if hi > lo else lo + 1, 41)
        for column, label in ((ref_f, "reference"), (win_f, "window")):
            counts, _ = np.histogram(np.clip(column, edges[0], edges[-1]), edges)
            ax.stairs(
                counts / max(1, len(column)),
                edges,
                fill=label == "reference",
                alpha=0.5 if label == "reference" else 1,
                label=label,
            )
    ax.set_title(name, fontsize=8)
    ax.set_ylabel("share")
    ax.legend(fontsize=7, frameon=False)
    return plot.svg(fig)


# ------------------------------------------------------------------ rollout panels


def _weights(commands: list[dict], end: int) -> dict[str, tuple[list[int], list[float]]]:
    """Each version's traffic weight (percent) over time, as the commands set it: set_weight
    moves a canary, promote makes it the champion, rollback takes it off."""
    promoted = [c for c in commands if c["action"] == "promote" and not c.get("stage")]
    champion = (promoted[0]["evidence"].get("replaces") if promoted else None) or "champion"
    canary, weight = None, 0.0
    points: dict[str, tuple[list[int], list[float]]] = defaultdict(lambda: ([], []))

    def mark(ts: int) -> None:
        state = {champion: 100.0 - weight, **({canary: weight} if canary else {})}
        for version in set(points) | set(state):
            points[version][0].append(ts)
            points[version][1].append(state.get(version, 0.0))

    if commands:
        mark(commands[0]["ts"])
    for c in commands:
        version, action = c["version"], c["action"]
        if action == "set_weight" and c.get("weight") is not None:
            canary, weight = version, float(c["weight"])
        elif action == "promote" and not c.get("stage"):
            champion, canary, weight = version, None, 0.0
        elif action == "rollback" and version == canary:
            canary, weight = None, 0.0
        else:
            continue
        mark(c["ts"])
    mark(end)
    return dict(points)


def _rollout_section(
    plot: Plotter, model: str, evaluations: list[Evaluation], commands: list[dict], end: int
) -> str:
    by: dict[tuple[str, str], list[Evaluation]] = defaultdict(list)
    for e in evaluations:
        by[(e.check, e.statistic)].append(e)
    parts = []

    def series(key, get=lambda e: e.value):
        es = by.get(key, [])
        keep = _decimate(len(es), np.array([get(e) for e in es], dtype=float))
        return [es[i] for i in keep]

    weights = _weights(commands, end)
    srm = series(("srm", "srm_surprise"))
    if weights or srm:
        fig, (ax,) = plot.figure(1)
        for version, (ts, w) in sorted(weights.items()):
            ax.step(_times(ts), w, where="post", lw=1.2, label=version)
        if srm:
            share = [
                100
                * e.evidence["observed"]["canary"]
                / max(1, sum(e.evidence["observed"].values()))
                for e in srm
            ]
            ax.plot(
                _times([e.ts for e in srm]),
                share,
                ".",
                ms=2,
                color="#555",
                label="observed canary share",
            )
        ax.set_ylabel("traffic weight (%)")
        ax.set_ylim(-3, 103)
        ax.legend(loc="center left", fontsize=7, frameon=False)
        plot.time_axis(ax)
        parts.append(_figure("Traffic weight of each version", plot.svg(fig), "rollout-weights"))

    serving = series(("canary_health", "error_rate_lower_bound"))
    labelled = series(("canary_health", "label_errors_vs_champion"))
    if serving or labelled:
        fig, axes = plot.figure(2)
        ax = axes[0]
        if serving:
            x, rate, low, limit = _with_gaps(
                np.array([e.ts for e in serving]),
                np.array([e.evidence.get("error_rate", np.nan) for e in serving], dtype=float),
                np.array([e.value for e in serving]),
                np.array([e.threshold for e in serving], dtype=float),
            )
            ax.plot(x, rate, lw=1, label="canary serving error rate")
            ax.plot(x, low, lw=1, label="its lower bound")
            ax.step(
                x,
                limit,
                where="post",
                ls="--",
                lw=1,
                color="#d62728",
                label="maximum error rate",
            )
        ax.set_ylabel("serving errors")
        ax = axes[1]
        if labelled:
            x, canary, champion = _with_gaps(
                np.array([e.ts for e in labelled]),
                np.array([e.evidence.get("error_rate", np.nan) for e in labelled], dtype=float),
                np.array(
                    [e.evidence.get("champion_error_rate", np.nan) for e in labelled], dtype=float
                ),
            )
            ax.plot(x, canary, lw=1, label="canary label error rate")
            ax.plot(x, champion, lw=1, label="champion label error rate")
        ax.set_ylabel("label errors")
        for ax in axes:
            ax.legend(loc="upper left", fontsize=7, frameon=False)
            plot.time_axis(ax)
        parts.append(
            _figure("Canary error rates against the champion's", plot.svg(fig), "rollout-canary")
        )

    ab = series(("ab_test", "always_valid_p"), get=lambda e: e.evidence.get("difference", 0.0))
    if ab:
        fig, (ax,) = plot.figure(1)
        ci = np.array([e.evidence.get("ci", [np.nan, np.nan]) for e in ab], dtype=float)
        x, low, high, difference = _with_gaps(
            np.array([e.ts for e in ab]),
            ci[:, 0],
            ci[:, 1],
            np.array([e.evidence.get("difference", np.nan) for e in ab], dtype=float),
        )
        ax.fill_between(x, low, high, alpha=0.25, lw=0, label="confidence interval")
        ax.plot(x, difference, lw=1, label="canary - champion")
        ax.axhline(0, color="#555", lw=0.8)
        ax.set_ylabel("outcome difference")
        ax.legend(loc="upper left", fontsize=7, frameon=False)
        plot.time_axis(ax)
        parts.append(_figure("A/B: outcome difference (Welch)", plot.svg(fig), "rollout-ab"))

    agreement = series(("shadow_agreement", "disagreement_lower_bound"))
    if agreement:
        fig, (ax,) = plot.figure(1)
        band = np.array([e.evidence["agreement_interval"] for e in agreement], dtype=float)
        x, low, high, agree, least = _with_gaps(
            np.array([e.ts for e in agreement]),
            band[:, 0],
            band[:, 1],
            np.array([e.evidence["agreement"] for e in agreement], dtype=float),
            np.array([1 - (e.threshold or 0) for e in agreement], dtype=float),
        )
        ax.fill_between(x, low, high, alpha=0.25, lw=0, label="agreement interval")
        ax.plot(x, agree, lw=1, label="agreement")
        ax.step(
            x,
            least,
            where="post",
            ls="--",
            lw=1,
            color="#d62728",
            label="minimum agreement",
        )
        ax.set_ylabel("shadow agreement")
        ax.legend(loc="lower left", fontsize=7, frameon=False)
        plot.time_axis(ax)
        parts.append(_figure("Shadow agreement with the champion", plot.svg(fig), "rollout-shadow"))
    mcnemar = by.get(("shadow_accuracy", "mcnemar_worse"), [])
    if mcnemar:
        last = mcnemar[-1]
        worse = [e for e in mcnemar if e.evidence.get("verdict") == "worse"]
        parts.append(
            "<p class='verdict'>McNemar on the labelled pairs: "
            f"<b>{html.escape(str(last.evidence.get('verdict')))}</b> at {_when(last.ts)} "
            f"(shadow alone right {last.evidence.get('c')}, champion alone right "
            f"{last.evidence.get('b')}, p = {_num(last.p_value)})"
            + (f"; worse first at {_when(worse[0].ts)}" if worse else "")
            + ".</p>"
        )
    if not parts:
        return ""
    return (
        f"<section class='rollout' id='{_anchor(model, 'rollout')}'><h3>Rollout</h3>"
        + "".join(parts)
        + "</section>"
    )


# ------------------------------------------------------------------ HTML


def _when(ts: int) -> str:
    return datetime.fromtimestamp(ts / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _duration(ms: float) -> str:
    s = ms / 1000
    if s < 120:
        return f"{s:.3g} s"
    if s < 7200:
        return f"{s / 60:.3g} min"
    return f"{s / 3600:.3g} h"


def _num(x: Any) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return f"{x:.4g}"
    return html.escape(str(x))


def _anchor(*parts: Any) -> str:
    return "-".join(str(p) for p in parts if p is not None).replace(" ", "_")


def _figure(caption: str, svg: str, cls: str) -> str:
    return (
        f"<figure class='plot {cls}'>{svg}<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _table(header: list[str], rows: list[list[str]], cls: str) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table class='{cls}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


@dataclass
class Episode:
    """An alert from firing to resolved (``end`` None: still firing at the end of the data)."""

    firing: dict
    end: int | None = None

    def key(self) -> tuple:
        a = self.firing
        return a["variant"], a["check"], a.get("feature")


def episodes(alerts: list[dict]) -> list[Episode]:
    """Pair each firing alert with the next resolution of the same (variant, check, feature)."""
    open_: dict[tuple, Episode] = {}
    out = []
    for a in sorted(alerts, key=lambda a: a["ts"]):
        key = (a["model"], a["variant"], a["check"], a.get("feature"))
        if a["state"] == "firing" and key not in open_:
            open_[key] = Episode(a)
            out.append(open_[key])
        elif a["state"] == "resolved" and key in open_:
            open_.pop(key).end = a["ts"]
    return out


def _summary(model: str, eps: list[Episode], commands: list[dict], end: int, count: int) -> str:
    rows = []
    for ep in eps:
        a = ep.firing
        stop = ep.end if ep.end is not None else end
        rows.append(
            [
                f"<span id='alert-{html.escape(a['alert_id'])}'>{html.escape(a['variant'])}</span>",
                html.escape(a["check"]),
                html.escape(a.get("feature") or ""),
                _when(a["ts"]),
                _when(ep.end) if ep.end is not None else "<b>still firing</b>",
                _duration(stop - a["ts"]),
                html.escape(a["message"]),
            ]
        )
    alerts = (
        _table(
            ["variant", "check", "feature", "fired", "resolved", "for", "when it fired"],
            rows,
            "alerts",
        )
        if rows
        else "<p>No alert fired.</p>"
    )
    crows = []
    for c in commands:
        evidence = ", ".join(f"{html.escape(k)} = {_num(v)}" for k, v in c["evidence"].items())
        links = " ".join(
            f"<a href='#alert-{html.escape(i)}'>{html.escape(i[:8])}</a>" for i in c["alert_ids"]
        )
        target = c.get("weight") if c.get("weight") is not None else c.get("stage") or ""
        crows.append(
            [
                _when(c["ts"]),
                html.escape(c["action"]),
                html.escape(c["version"]),
                _num(target),
                html.escape(c["reason"]),
                evidence,
                links,
            ]
        )
    cmds = (
        _table(
            ["time", "action", "version", "weight / stage", "reason", "evidence", "alerts"],
            crows,
            "commands",
        )
        if crows
        else "<p>No command was issued.</p>"
    )
    still = sum(ep.end is None for ep in eps)
    return (
        f"<section class='summary' id='{_anchor(model, 'summary')}'><h3>Summary</h3>"
        f"<p>{count:,} evaluations; {len(eps)} alert{'s' * (len(eps) != 1)} fired"
        f" ({still} still firing at the end); {len(commands)} command"
        f"{'s' * (len(commands) != 1)}.</p><h4>Alerts</h4>{alerts}<h4>Commands</h4>{cmds}</section>"
    )


def _features_section(
    plot: Plotter,
    model: str,
    collector: Collector,
    eps: list[Episode],
    references: dict[str, dict[str, np.ndarray]] | None,
    windows: dict[tuple[str, str], list] | None,
) -> str:
    fired: dict[tuple, list[Episode]] = defaultdict(list)
    for ep in eps:
        fired[ep.key()].append(ep)
    rows = []
    worst = [
        (ratio, e)
        for (m, _, check, feature), (ratio, e) in collector.worst.items()
        if m == model and feature is not None and check not in ROLLOUT_CHECKS
    ]
    for ratio, e in sorted(worst, key=lambda re: -re[0]):
        n = len(fired.get(e.key, []))
        rows.append(
            [
                html.escape(e.feature or ""),
                html.escape(e.variant),
                html.escape(e.check),
                html.escape(e.statistic),
                _num(e.value),
                _num(e.threshold),
                f"<b>{ratio:.3g}</b>" if ratio > 1 else f"{ratio:.3g}",
                _when(e.ts),
                str(n),
            ]
        )
    table = _table(
        [
            "feature",
            "variant",
            "check",
            "statistic",
            "worst value",
            "threshold",
            "value / threshold",
            "at",
            "times fired",
        ],
        rows,
        "features",
    )
    plots = []
    if references is None or windows is None:
        plots.append(
            "<p class='note'>Distributions need the reference and the events: give --config "
            "and --predictions with the replay's outputs.</p>"
        )
    else:
        ref = references.get(model, {})
        for (m, column), values in sorted(windows.items()):
            if m != model or column not in ref:
                continue
            variant, e = _worst_windows(collector)[(m, column)]
            caption = (
                f"{column}: reference vs the {variant} window "
                f"{_when(e.window.start_ts)} to {_when(e.window.end_ts)} "
                f"({e.statistic} = {_num(e.value)}, threshold {_num(e.threshold)})"
            )
            plots.append(
                _figure(caption, _distribution_figure(plot, column, ref[column], values), "dist")
            )
    return (
        f"<section class='features' id='{_anchor(model, 'features')}'><h3>Features</h3>"
        "<p>Each column's furthest excursion past its calibrated threshold, over every "
        f"evaluation (not the drawn sample).</p>{table}<h4>Reference and the worst window</h4>"
        f"<div class='grid'>{''.join(plots)}</div></section>"
    )


CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.6em}h2{border-bottom:2px solid #444;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0;font-size:12px}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:left;vertical-align:top}
th{background:#f2f2f2}figure{margin:.5em 0}figcaption{font-size:12px;color:#555}
figure svg{max-width:100%;height:auto}.grid{display:flex;flex-wrap:wrap;gap:8px}
.grid figure{width:49%}.note{color:#a33}table.alerts td:nth-child(6){white-space:nowrap}
"""


def render(
    collector: Collector,
    alerts: list[dict],
    commands: list[dict],
    *,
    references: dict[str, dict[str, np.ndarray]] | None = None,
    windows: dict[tuple[str, str], list] | None = None,
    source: str = "",
) -> str:
    """The report's HTML: per model a summary, the checks, the features and the rollout."""
    plot = Plotter()
    models = sorted(set(collector.extent) | {a["model"] for a in alerts})
    body = []
    for model in models:
        start, end = collector.extent.get(model, [0, 0])
        eps = [ep for ep in episodes(alerts) if ep.firing["model"] == model]
        mcommands = sorted((c for c in commands if c["model"] == model), key=lambda c: c["ts"])
        body.append(
            f"<h2 id='{_anchor(model)}'>Model {html.escape(model)}</h2>"
            f"<p>Event time {_when(start)} to {_when(end)} (UTC).</p>"
            + _summary(model, eps, mcommands, end, collector.count[model])
        )
        checks: dict[tuple[str, str], dict[str, dict[str | None, Series]]] = defaultdict(
            lambda: defaultdict(dict)
        )
        for (m, variant, check, feature, statistic), s in collector.series.items():
            if m == model and check not in ROLLOUT_CHECKS:
                checks[(variant, check)][statistic][feature] = s
        figures = []
        for (variant, check), stats in sorted(checks.items()):
            spans = [
                (ep.firing["ts"], ep.end if ep.end is not None else end)
                for ep in eps
                if ep.key()[:2] == (variant, check)
            ]
            figures.append(
                _figure(
                    f"{variant}: {check} (alert spans shaded)",
                    _check_figure(plot, stats, spans),
                    "check",
                )
            )
        body.append(
            f"<section class='checks' id='{_anchor(model, 'checks')}'><h3>Checks</h3>"
            + "".join(figures)
            + "</section>"
        )
        body.append(_features_section(plot, model, collector, eps, references, windows))
        body.append(_rollout_section(plot, model, collector.rollout.get(model, []), mcommands, end))
    title = "coalmine report" + (f": {source}" if source else "")
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        # nothing may be fetched: the file must show the same offline, years later
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; "
        "style-src 'unsafe-inline'; img-src data:\">"
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>" + "".join(body) + "</body></html>"
    )


def write_report(path: str | Path, text: str) -> int:
    """Write the report; returns its size in bytes."""
    data = text.encode()
    Path(path).write_bytes(data)
    return len(data)
