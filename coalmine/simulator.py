"""Traffic simulator: real data (the Statlog Shuttle set that ships inside ``river``) served by
a trained model, with drift injected at known events and labels that arrive late.

The demo, the integration tests and the benchmarks all draw their streams from here, so
a change point is always known exactly. Everything is deterministic given the seed.

River ships Shuttle in its binary anomaly-detection form (ODDS): 49,097 rows, nine integer
sensor readings named ``f1`` .. ``f9`` (the dataset's own names, used as feature names in
events), label 1 for the ~7 % anomalies, 0 otherwise. The champion learns the first
:data:`TRAIN_ROWS` rows; traffic samples the rows after them (with replacement).

>>> s = Scenario(n_events=1000, drift_at=500, drift_feature="f1", drift_size=1.0, seed=1)
>>> events = list(generate(s))
>>> kinds = [k for k, _ in events]
>>> kinds.count("prediction"), kinds.count("label") > 0
(1000, True)
"""

from __future__ import annotations

import asyncio
import copy
import gzip
import heapq
import importlib.util
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import chain, repeat
from operator import itemgetter
from pathlib import Path

import numpy as np
import orjson

from coalmine import topics

#: rows used to train the champion; the rest are served (held out)
TRAIN_ROWS = 20_000
#: events built per step of :func:`generate`: bounds memory and the garbage collector's work
CHUNK = 10_000
DRIFT_KINDS = ("shift", "scale", "class_mix")


@lru_cache(maxsize=1)
def load_shuttle() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Shuttle as arrays: X (49,097 x 9 sensor readings, float), y (1 = anomaly, ~7%), and
    the dataset's own feature names ``f1`` .. ``f9``. The data ships in ``river``, an optional
    dependency: ``pip install 'coalmine[demo]'``."""
    river = importlib.util.find_spec("river")  # found, not imported: river.datasets loads pandas
    if river is None or not river.submodule_search_locations:
        raise ImportError(
            "the simulator's Shuttle data set comes with the optional dependency river: "
            "pip install 'coalmine[demo]'"
        )
    path = Path(river.submodule_search_locations[0]) / "datasets" / "shuttle.csv.gz"
    with gzip.open(path, "rt") as fh:
        header = fh.readline().strip().split(",")
        data = np.loadtxt(fh, delimiter=",")
    return data[:, :-1], data[:, -1].astype(int), header[:-1]


class Champion:
    """Logistic regression on standardized features and their squares (numpy, batch gradient
    descent): small, fast, vectorised, and accurate on Shuttle (99.7 % on held-out rows,
    where always answering 0 scores 92.8 %).

    With :math:`z` the standardized row, :math:`P(y = 1 \\mid x) = \\sigma(w_0 + w^\\top z
    + v^\\top z^2)`. A model with ``noise`` reads its terms (:math:`z` and :math:`z^2`) through
    independent Gaussian noise of that many standard deviations: a degraded copy, the same weights.

    >>> X, y, _ = load_shuttle()
    >>> model = Champion(X[:5000], y[:5000])
    >>> round(float((model.predict(X[40000:]) == y[40000:]).mean()), 2)
    1.0
    """

    def __init__(
        self,
        X: np.ndarray,
        y: np.ndarray,
        quadratic: bool = True,
        steps: int = 400,
        lr: float = 0.5,
    ):
        self.X_train, self.y_train = X, y
        self.mean, self.sd = X.mean(axis=0), X.std(axis=0) + 1e-9
        self.quadratic, self.noise = quadratic, 0.0
        Z = self._design(X)
        w = np.zeros(Z.shape[1])
        for _ in range(steps):
            p = 1 / (1 + np.exp(-np.clip(Z @ w, -30, 30)))
            w -= lr * Z.T @ (p - y) / len(y)
        self.w = w

    def _design(self, X: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        Z = (X - self.mean) / self.sd
        D = np.hstack(
            [np.ones((len(Z), 1)), Z, Z**2] if self.quadratic else [np.ones((len(Z), 1)), Z]
        )
        if self.noise:
            D[:, 1:] += (rng if rng is not None else np.random.default_rng(0)).normal(
                0, self.noise, D[:, 1:].shape
            )
        return D

    def predict_proba(self, X: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """Probability of an anomaly per row; a noisy model draws its noise from ``rng``."""
        return 1 / (1 + np.exp(-np.clip(self._design(X, rng) @ self.w, -30, 30)))

    def predict(self, X: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """Class per row: 1 (anomaly) when its probability is at least one half."""
        return (self.predict_proba(X, rng) >= 0.5).astype(int)

    def with_noise(self, noise: float) -> Champion:
        """This model reading its inputs through Gaussian noise (``noise`` standard deviations)."""
        degraded = copy.copy(self)
        degraded.noise = noise
        return degraded

    def make_variant(self, kind: str) -> Champion:
        """A model for rollout demos: ``"bad_canary"`` is this one with noisy inputs (1.5 sd:
        about 92 % accurate, no better than always answering 0); ``"shadow"`` is a different
        model of similar accuracy (linear terms only, the same training rows; agrees with this
        one on 99.9 % of held-out rows)."""
        if kind == "bad_canary":
            return self.with_noise(1.5)
        if kind == "shadow":
            return Champion(self.X_train, self.y_train, quadratic=False)
        raise ValueError(f"kind: expected 'bad_canary' or 'shadow', got {kind!r}")


@lru_cache(maxsize=8)
def trained_model(noise: float = 0.0, kind: str = "champion") -> Champion:
    """The champion (or its ``kind`` variant, see :meth:`Champion.make_variant`) trained once
    per process on the first :data:`TRAIN_ROWS` rows, with ``noise`` on its inputs."""
    if noise:
        return trained_model(0.0, kind).with_noise(noise)
    if kind != "champion":
        return trained_model().make_variant(kind)
    X, y, _ = load_shuttle()
    return Champion(X[:TRAIN_ROWS], y[:TRAIN_ROWS])


@dataclass
class Scenario:
    """What to simulate. Event times are spaced ``1000 / rate_per_s`` ms apart from
    ``start_ts_ms``; drift applies to events ``drift_at <= i < drift_until``:

    - ``shift``: ``drift_feature`` + ``drift_size`` x its held-out standard deviation;
    - ``scale``: ``drift_feature`` stretched ``drift_size`` times about its held-out mean;
    - ``class_mix``: rows drawn with ``drift_size`` x the held-out share of anomalies.

    ``label_fraction`` of the served (status ok) predictions get a label ``label_delay_ms``
    later; ``error_rate`` of them fail (status error, no prediction); every
    ``bad_event_every``-th event (0: none) is malformed bytes, one of four defects in turn.
    """

    model: str = "shuttle"
    version: str = "v1"
    n_events: int = 10_000
    rate_per_s: float = 200.0
    start_ts_ms: int = 1_700_000_000_000
    drift_at: int | None = None
    drift_until: int | None = None
    drift_feature: str = "f1"
    drift_kind: str = "shift"
    drift_size: float = 0.5
    label_delay_ms: int = 2000
    label_fraction: float = 0.5
    error_rate: float = 0.0
    bad_event_every: int = 0
    seed: int = 0


def _drifted(X: np.ndarray, s: Scenario, names: list[str]) -> np.ndarray:
    """``X`` (the scenario's rows in order) with the feature drift applied."""
    if s.drift_kind not in DRIFT_KINDS:
        raise ValueError(
            f"drift_kind: expected one of {', '.join(DRIFT_KINDS)}, got {s.drift_kind!r}"
        )
    if s.drift_at is None or s.drift_kind == "class_mix":
        return X
    X = X.copy()
    j = names.index(s.drift_feature)
    rows = slice(s.drift_at, s.drift_until)
    ref = load_shuttle()[0][TRAIN_ROWS:, j]
    if s.drift_kind == "shift":
        X[rows, j] += s.drift_size * ref.std()
    else:
        X[rows, j] = ref.mean() + (X[rows, j] - ref.mean()) * s.drift_size
    return X


def _class_mixed(rows: np.ndarray, s: Scenario) -> np.ndarray:
    """Held-out rows, redrawn in the drift span so anomalies come at ``drift_size`` x their
    share (from a generator of their own: the other draws stay what they were)."""
    if s.drift_kind != "class_mix" or s.drift_at is None:
        return rows
    y = load_shuttle()[1][TRAIN_ROWS:]
    pos, neg = np.flatnonzero(y == 1) + TRAIN_ROWS, np.flatnonzero(y != 1) + TRAIN_ROWS
    rng = np.random.default_rng([s.seed, 1])
    span = np.arange(len(rows))[s.drift_at : s.drift_until]
    anomalous = rng.random(len(span)) < min(1.0, s.drift_size * y.mean())
    rows = rows.copy()
    rows[span[anomalous]] = rng.choice(pos, int(anomalous.sum()))
    rows[span[~anomalous]] = rng.choice(neg, int((~anomalous).sum()))
    return rows


_DEFECTS = (
    lambda e: b"{not json",
    lambda e: orjson.dumps({k: v for k, v in e.items() if k != "ts"}),
    lambda e: orjson.dumps({**e, "variant": "blue"}),
    lambda e: orjson.dumps({**e, "features": {**e["features"], "f2": True}}),
)


@dataclass
class Version:
    """A model version as the simulator serves it: the trained champion (or ``kind``, one of
    its variants, see :meth:`Champion.make_variant`), possibly with noise on its inputs,
    failing a share of requests, with its own latency."""

    name: str
    noise: float = 0.0
    error_rate: float = 0.0
    latency_scale: float = 1.0
    kind: str = "champion"


def _answers(version: Version, X: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """What ``version`` answers to the rows ``X``: probability of an anomaly, latency, failed."""
    proba = trained_model(version.noise, version.kind).predict_proba(X, rng)
    latency = np.round(rng.gamma(4.0, 2.0 * version.latency_scale, len(X)), 2)
    return proba, latency, rng.random(len(X)) < version.error_rate


def _prediction_events(
    model: str,
    version: str,
    variant: str,
    names: list[str],
    ids: list[str],
    units: list[str],
    X: np.ndarray,
    ts: np.ndarray,
    proba: np.ndarray,
    latency: np.ndarray,
    failed: np.ndarray,
) -> list[dict]:
    """The events, one per row; numpy arrays become Python lists first (no numpy per event)."""
    score = np.round(proba, 4)
    events = [
        {
            "event_id": f"{rid}-{variant}",
            "request_id": rid,
            "model": model,
            "version": version,
            "variant": variant,
            "ts": t,
            "features": dict(zip(names, row)),
            "prediction": c,
            "scores": {"0": s0, "1": s1},
            "latency_ms": ms,
            "status": "ok",
            "unit_id": u,
        }
        for rid, u, t, row, c, s0, s1, ms in zip(
            ids,
            units,
            ts.tolist(),
            X.tolist(),
            (proba >= 0.5).astype(int).tolist(),
            np.round(1 - score, 4).tolist(),
            score.tolist(),
            latency.tolist(),
        )
    ]
    for i in np.flatnonzero(failed).tolist():
        events[i].update(status="error", prediction=None, error="model server timeout")
    return events


def serve(
    version: Version,
    variant: str,
    X: np.ndarray,
    ts: np.ndarray,
    ids: list[str],
    units: list[str],
    names: list[str],
    model: str,
    rng: np.random.Generator,
) -> list[dict]:
    """Prediction events of ``version`` answering the requests ``ids`` (rows of ``X``)."""
    return _prediction_events(
        model, version.name, variant, names, ids, units, X, ts, *_answers(version, X, rng)
    )


def _request_ids(seed: int, indices: Iterable[int]) -> list[str]:
    return [f"req-{seed}-{i}" for i in indices]


def _unit_ids(indices: Iterable[int]) -> list[str]:
    """5,000 users; request i comes from user i x 7919 mod 5000 (a prime stride spreads them)."""
    return [f"user-{i * 7919 % 5000}" for i in indices]


def _label(request_id: str, model: str, ts: int, label: int, **extra) -> dict:
    return {
        "event_id": f"label-{request_id}",
        "request_id": request_id,
        "model": model,
        "ts": ts,
        "label": label,
        **extra,
    }


@dataclass
class _Draws:
    """Every random draw of a scenario, made up front as arrays, so that building the events
    a chunk at a time changes nothing."""

    names: list[str]
    X: np.ndarray
    y: np.ndarray
    ts: np.ndarray
    proba: np.ndarray
    latency: np.ndarray
    failed: np.ndarray
    labelled: np.ndarray


def _draw(s: Scenario) -> _Draws:
    X_all, y_all, names = load_shuttle()
    rng = np.random.default_rng(s.seed)
    rows = _class_mixed(rng.integers(TRAIN_ROWS, len(X_all), s.n_events), s)
    X = _drifted(X_all[rows], s, names)
    ts = (s.start_ts_ms + np.arange(s.n_events) * (1000.0 / s.rate_per_s)).astype(np.int64)
    proba, latency, failed = _answers(Version(s.version, error_rate=s.error_rate), X, rng)
    labelled = np.random.default_rng(s.seed + 1).random(s.n_events) < s.label_fraction
    return _Draws(names, X, y_all[rows], ts, proba, latency, failed, labelled & ~failed)


def _spans(n: int) -> Iterator[tuple[int, int]]:
    return ((a, min(a + CHUNK, n)) for a in range(0, n, CHUNK))


def _prediction_chunks(s: Scenario, d: _Draws) -> Iterator[list[dict]]:
    for a, b in _spans(s.n_events):
        yield _prediction_events(
            s.model,
            s.version,
            "champion",
            d.names,
            _request_ids(s.seed, range(a, b)),
            _unit_ids(range(a, b)),
            d.X[a:b],
            d.ts[a:b],
            d.proba[a:b],
            d.latency[a:b],
            d.failed[a:b],
        )


def predictions(s: Scenario) -> tuple[list[dict], np.ndarray]:
    """The scenario's prediction events (dicts, all served by the champion, none malformed)
    and their true labels."""
    d = _draw(s)
    return list(chain.from_iterable(_prediction_chunks(s, d))), d.y


def _prediction_stream(s: Scenario, d: _Draws) -> Iterator[tuple[int, str, dict | bytes]]:
    """(ts, "prediction", event) with every ``bad_event_every``-th event broken: the defects
    take turns."""
    k = s.bad_event_every
    for (a, b), chunk in zip(_spans(s.n_events), _prediction_chunks(s, d)):
        events: list[dict | bytes] = list(chunk)  # some become malformed bytes
        for i in range((k - 1 - a) % k, b - a, k) if k else ():
            events[i] = _DEFECTS[((a + i) // k) % len(_DEFECTS)](chunk[i])
        yield from zip(d.ts[a:b].tolist(), repeat("prediction"), events)


def _label_stream(s: Scenario, d: _Draws) -> Iterator[tuple[int, str, dict]]:
    """(ts, "label", event) for the labelled requests, ``label_delay_ms`` after their prediction."""
    for a, b in _spans(s.n_events):
        picked = np.flatnonzero(d.labelled[a:b]) + a
        ids = _request_ids(s.seed, picked.tolist())
        ts = (d.ts[picked] + s.label_delay_ms).tolist()
        yield from (
            (t, "label", _label(rid, s.model, t, y))
            for rid, t, y in zip(ids, ts, d.y[picked].tolist())
        )


def generate(s: Scenario) -> Iterator[tuple[str, dict | bytes]]:
    """("prediction" | "label", event) in event-time order, a label after the predictions of
    its millisecond; malformed events come as bytes. Lazy: the events are built a chunk at a
    time (10^6 of them in about 5 s), never all in memory."""
    d = _draw(s)
    merged = heapq.merge(
        _prediction_stream(s, d), _label_stream(s, d), key=itemgetter(0)
    )  # stable: predictions first
    return ((kind, event) for _, kind, event in merged)


@dataclass
class Serving:
    """Which versions serve now, as a router would keep it; :meth:`apply` obeys coalmine's
    commands (set_weight, promote, rollback)."""

    champion: Version
    canary: Version | None = None
    canary_weight: float = 0.0
    shadow: Version | None = None
    candidates: dict[str, Version] = field(default_factory=dict)

    def apply(self, command: dict) -> str:
        """Follow one command; returns what changed, for people."""
        version, action = command["version"], command["action"]
        if action == "set_weight":
            if self.shadow is not None and self.shadow.name == version:
                self.canary, self.shadow = self.shadow, None
            if self.canary is not None and self.canary.name == version:
                self.canary_weight = float(command["weight"])
                return f"{version} now serves {self.canary_weight:g}% as canary"
        elif action == "promote" and self.canary is not None and self.canary.name == version:
            self.champion, self.canary, self.canary_weight = self.canary, None, 0.0
            return f"{version} promoted to champion"
        elif action == "pause":
            return f"rollout of {version} paused: weight stays at {self.canary_weight:g}%"
        elif action == "rollback":
            if self.canary is not None and self.canary.name == version:
                self.canary, self.canary_weight = None, 0.0
                return f"{version} rolled back"
            if self.shadow is not None and self.shadow.name == version:
                self.shadow = None
                return f"shadow {version} dropped"
        return "ignored"

    def events(
        self,
        start: int,
        stop: int,
        start_ts_ms: int,
        rate_per_s: float,
        seed: int,
        model: str = "shuttle",
        drift: tuple[str, float] | None = None,
        label_delay_ms: int = 2000,
        label_fraction: float = 0.5,
    ) -> list[tuple[str, dict]]:
        """Requests ``start`` to ``stop``: routed by a deterministic hash of their unit (canary
        at ``canary_weight`` percent), mirrored to the shadow, labelled later with an outcome
        (1 when the served answer was right). In event-time order."""
        from coalmine.client import assign_variant

        X_all, y_all, names = load_shuttle()
        rng = np.random.default_rng([seed, start])
        n = stop - start
        rows = rng.integers(TRAIN_ROWS, len(X_all), n)
        X, y = X_all[rows].copy(), y_all[rows]
        if drift:
            X[:, names.index(drift[0])] += (
                drift[1] * X_all[TRAIN_ROWS:, names.index(drift[0])].std()
            )
        ts = (start_ts_ms + np.arange(start, stop) * (1000.0 / rate_per_s)).astype(np.int64)
        ids, units = _request_ids(seed, range(start, stop)), _unit_ids(range(start, stop))
        weights = {"champion": 100 - self.canary_weight, "canary": self.canary_weight}
        to_canary = np.array(
            [self.canary is not None and assign_variant(u, weights) == "canary" for u in units]
        )
        out: list[tuple[str, dict]] = []
        served: dict[str, dict] = {}
        for variant, version, mask in (
            ("champion", self.champion, ~to_canary),
            ("canary", self.canary, to_canary),
            ("shadow", self.shadow, ~to_canary),
        ):
            if version is None or not mask.any():
                continue
            pick = np.flatnonzero(mask)
            events = serve(
                version,
                variant,
                X[pick],
                ts[pick],
                [ids[i] for i in pick],
                [units[i] for i in pick],
                names,
                model,
                rng,
            )
            out += [("prediction", e) for e in events]
            if variant != "shadow":
                served.update({e["request_id"]: e for e in events})
        labelled = rng.random(n) < label_fraction
        for i in np.flatnonzero(labelled).tolist():
            e = served[ids[i]]
            if e["status"] == "ok":
                out.append(
                    (
                        "label",
                        _label(
                            ids[i],
                            model,
                            int(ts[i]) + label_delay_ms,
                            int(y[i]),
                            outcome=float(e["prediction"] == y[i]),
                        ),
                    )
                )
        out.sort(key=lambda ke: (ke[1]["ts"], ke[0] == "label"))
        return out


def write_jsonl(path: Path, events: Iterable[dict | bytes]) -> int:
    """One event per line (orjson; bytes as they are); returns the count."""
    n = 0
    with open(path, "wb") as fh:
        for e in events:
            fh.write((e if isinstance(e, bytes) else orjson.dumps(e)) + b"\n")
            n += 1
    return n


def write_streams(s: Scenario, predictions_path: Path, labels_path: Path) -> None:
    """A scenario as the two files a user would export from the topics."""
    events = list(generate(s))
    write_jsonl(predictions_path, (e for k, e in events if k == "prediction"))
    write_jsonl(labels_path, (e for k, e in events if k == "label"))


def write_reference(path: Path, n: int = 5000, seed: int = 12345) -> int:
    """A reference slice: ``n`` undrifted prediction events, each with its true ``label``
    (so the performance check knows the reference error rate)."""
    preds, truth = predictions(Scenario(n_events=n, seed=seed, start_ts_ms=0))
    return write_jsonl(path, ({**e, "label": y} for e, y in zip(preds, truth.tolist())))


ROLLOUT_SETTINGS = (
    'checks = ["drift", "prediction_drift", "missing_rate", "performance", "shadow", "canary", "ab"]\n\n'
    '[models.shadow]\nmin_events = 1000\nmin_duration = "3s"\n\n'
    '[models.canary]\nsteps = [10, 50, 100]\nmin_events = 100\nmin_duration = "3s"\n'
)


def write_demo_config(
    path: Path,
    reference_path: Path,
    bucket: str | None = "1s",
    window: str = "20s",
    model: str = "shuttle",
    rollout: bool = False,
    false_alarm_every_events: int | None = 1_000_000,
) -> None:
    """A monitor config for the simulator's model, naming the reference relative to the config
    file; ``rollout`` adds shadow, canary and A/B checks with short steps, for a demo that
    lasts a minute (and a false-alarm budget of 10^6 events, a demo's worth many times over,
    so that its canary decisions take seconds; None leaves coalmine's default)."""
    checks = (
        ROLLOUT_SETTINGS
        if rollout
        else 'checks = ["drift", "prediction_drift", "missing_rate", "performance"]\n'
    )
    reference = os.path.relpath(Path(reference_path).resolve(), Path(path).resolve().parent)
    Path(path).write_text(
        "[defaults]\n"
        + (f'bucket = "{bucket}"\n' if bucket else "")  # None: coalmine's default
        + f'window = "{window}"\n'
        'allowed_lateness = "2s"\n'
        + (
            f"false_alarm_every_events = {false_alarm_every_events}\n"
            if false_alarm_every_events
            else ""
        )
        + "\n"
        "[[models]]\n"
        f'name = "{model}"\n'
        f"reference = {orjson.dumps(reference).decode()}\n" + checks
    )


async def publish(
    bootstrap: str,
    events: Iterable[tuple[str, dict | bytes]],
    *,
    realtime: bool,
    speed: float = 1.0,
    progress: Callable[[int], object] | None = None,
    chunk: int = 5000,
    targets: dict[str, str] | None = None,
) -> dict[str, int]:
    """Send predictions and labels to their topics (``targets``, kind -> topic; by default
    coalmine's), keyed by request_id, returning the count of each kind. When ``realtime``, event time advances at ``speed`` x the wall clock from the
    first event (whose ``ts`` should then be near now); otherwise as fast as the broker takes
    them, acknowledged ``chunk`` at a time. ``progress(n)`` (e.g. a tqdm bar's ``update``)
    hears of every ``n`` events acknowledged."""
    from coalmine.client import Publisher

    counts = {"prediction": 0, "label": 0}
    target = targets or {"prediction": topics.PREDICTIONS, "label": topics.LABELS}
    first_ts, t0 = None, time.monotonic()
    pending: list[asyncio.Future] = []

    async def settle() -> None:
        await asyncio.gather(*pending)
        if progress is not None and pending:
            progress(len(pending))
        pending.clear()

    async with Publisher(bootstrap) as pub:
        for kind, event in events:
            if realtime and isinstance(event, dict):
                first_ts = event["ts"] if first_ts is None else first_ts
                ahead = (event["ts"] - first_ts) / 1000 / speed - (time.monotonic() - t0)
                if ahead > 0.02:
                    await settle()
                    await asyncio.sleep(ahead)
            pending.append(await pub.send(target[kind], event))
            counts[kind] += 1
            if len(pending) >= chunk:
                await settle()
        await settle()
    return counts


async def run_live(
    bootstrap: str,
    serving: Serving,
    *,
    seconds: float,
    rate_per_s: float,
    seed: int = 7,
    plan=None,
    bad_event_every: int = 0,
    step_s: float = 0.2,
    targets: dict[str, str] | None = None,
) -> dict[str, int]:
    """Serve traffic in real time for ``seconds``: every ``step_s`` the router (``serving``,
    which the caller updates from coalmine's commands) answers the next requests. ``plan(t,
    serving)`` may change versions or return a drift (feature, size) for second t."""
    from coalmine.client import Publisher

    counts = {"prediction": 0, "label": 0, "malformed": 0}
    target = targets or {"prediction": topics.PREDICTIONS, "label": topics.LABELS}
    start_ts, t0, done = int(time.time() * 1000), time.monotonic(), 0
    per_step = max(1, int(rate_per_s * step_s))
    async with Publisher(bootstrap) as pub:
        step = 0
        while (step + 1) * step_s <= seconds:
            drift = plan(step * step_s, serving) if plan else None
            events = serving.events(done, done + per_step, start_ts, rate_per_s, seed, drift=drift)
            sends = []
            for kind, event in events:
                raw: dict | bytes = event
                if (
                    kind == "prediction"
                    and bad_event_every
                    and counts["prediction"] % bad_event_every == bad_event_every - 1
                ):
                    raw = _DEFECTS[counts["malformed"] % len(_DEFECTS)](event)
                    counts["malformed"] += 1
                sends.append(await pub.send(target[kind], raw))
                counts[kind] += 1
            await asyncio.gather(*sends)
            done += per_step
            step += 1
            await asyncio.sleep(max(0.0, t0 + step * step_s - time.monotonic()))
    return counts
