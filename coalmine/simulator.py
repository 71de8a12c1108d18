"""Traffic simulator: real data (the Statlog Shuttle set that ships inside ``river``) served by
a trained model, with drift injected at known events and labels that arrive late.

The demo, the integration tests and the benchmarks all draw their streams from here, so
a change point is always known exactly.

>>> s = Scenario(n_events=1000, drift_at=500, drift_feature="f1", drift_size=1.0, seed=1)
>>> events = list(generate(s))
>>> kinds = [k for k, _ in events]
>>> kinds.count("prediction"), kinds.count("label") > 0
(1000, True)
"""

from __future__ import annotations

import asyncio
import gzip
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import orjson

from coalmine import topics

#: rows used to train the champion; the rest are served (held out)
TRAIN_ROWS = 20_000


@lru_cache(maxsize=1)
def load_shuttle() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Shuttle as arrays: X (49,097 x 9 sensor readings, float), y (1 = anomaly, ~7%), and
    the dataset's own feature names ``f1`` .. ``f9``."""
    import river.datasets

    path = Path(river.datasets.__file__).parent / "shuttle.csv.gz"
    with gzip.open(path, "rt") as fh:
        header = fh.readline().strip().split(",")
        data = np.loadtxt(fh, delimiter=",")
    return data[:, :-1], data[:, -1].astype(int), header[:-1]


class Champion:
    """Logistic regression on standardized features (numpy, batch gradient descent):
    small, fast, vectorised, and accurate on Shuttle (about 97% on held-out rows)."""

    def __init__(self, X: np.ndarray, y: np.ndarray, steps: int = 400, lr: float = 0.5, noise: float = 0.0):
        self.mean, self.sd = X.mean(axis=0), X.std(axis=0) + 1e-9
        self.noise = noise
        Z = self._design(X)
        w = np.zeros(Z.shape[1])
        for _ in range(steps):
            p = 1 / (1 + np.exp(-np.clip(Z @ w, -30, 30)))
            w -= lr * Z.T @ (p - y) / len(y)
        self.w = w

    def _design(self, X: np.ndarray) -> np.ndarray:
        Z = (X - self.mean) / self.sd
        return np.hstack([np.ones((len(Z), 1)), Z, Z**2])

    def predict_proba(self, X: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """Probability of an anomaly per row; ``noise`` (a degraded model) perturbs the inputs."""
        Z = self._design(X)
        if self.noise and rng is not None:
            Z[:, 1:] += rng.normal(0, self.noise, Z[:, 1:].shape)
        return 1 / (1 + np.exp(-np.clip(Z @ self.w, -30, 30)))

    def predict(self, X: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        return (self.predict_proba(X, rng) >= 0.5).astype(int)


@lru_cache(maxsize=4)
def trained_model(noise: float = 0.0) -> Champion:
    """The champion (``noise=0``) or a degraded variant, trained once per process."""
    X, y, _ = load_shuttle()
    return Champion(X[:TRAIN_ROWS], y[:TRAIN_ROWS], noise=noise)


@dataclass
class Scenario:
    """What to simulate. Event times are spaced ``1000 / rate_per_s`` ms apart from
    ``start_ts_ms``; drift applies to events ``drift_at <= i < drift_until``."""

    model: str = "shuttle"
    version: str = "v1"
    n_events: int = 10_000
    rate_per_s: float = 200.0
    start_ts_ms: int = 1_700_000_000_000
    drift_at: int | None = None
    drift_until: int | None = None
    drift_feature: str = "f1"
    drift_kind: str = "shift"  # shift: + size x reference sd | scale: x size about the mean
    drift_size: float = 0.5
    label_delay_ms: int = 2000
    label_fraction: float = 0.5
    error_rate: float = 0.0
    bad_event_every: int = 0
    seed: int = 0


def _drifted(X: np.ndarray, s: Scenario, names: list[str]) -> np.ndarray:
    if s.drift_at is None:
        return X
    X = X.copy()
    j = names.index(s.drift_feature)
    rows = slice(s.drift_at, s.drift_until)
    ref_X, _, _ = load_shuttle()
    ref = ref_X[TRAIN_ROWS:, j]
    if s.drift_kind == "shift":
        X[rows, j] += s.drift_size * ref.std()
    elif s.drift_kind == "scale":
        X[rows, j] = ref.mean() + (X[rows, j] - ref.mean()) * s.drift_size
    else:
        raise ValueError(f"drift_kind: expected 'shift' or 'scale', got {s.drift_kind!r}")
    return X


_DEFECTS = (
    lambda e: b"{not json",
    lambda e: orjson.dumps({k: v for k, v in e.items() if k != "ts"}),
    lambda e: orjson.dumps({**e, "variant": "blue"}),
    lambda e: orjson.dumps({**e, "features": {**e["features"], "f2": True}}),
)


@dataclass
class Version:
    """A model version as the simulator serves it: the trained model, or a degraded copy
    (noise on its inputs), failing a share of requests, with its own latency."""

    name: str
    noise: float = 0.0
    error_rate: float = 0.0
    latency_scale: float = 1.0


def serve(version: Version, variant: str, X: np.ndarray, ts: np.ndarray, ids: list[str], units: list[str],
          names: list[str], model: str, rng: np.random.Generator) -> list[dict]:
    """Prediction events of ``version`` answering the requests ``ids`` (rows of ``X``)."""
    proba = trained_model(version.noise).predict_proba(X, rng)
    pred = (proba >= 0.5).astype(int).tolist()
    latency = np.round(rng.gamma(4.0, 2.0 * version.latency_scale, len(X)), 2).tolist()
    failed = (rng.random(len(X)) < version.error_rate).tolist()
    rows, proba, ts = X.tolist(), np.round(proba, 4).tolist(), ts.tolist()
    out = []
    for i, rid in enumerate(ids):
        e = {"event_id": f"{rid}-{variant}", "request_id": rid, "model": model, "version": version.name,
             "variant": variant, "ts": ts[i], "features": dict(zip(names, rows[i])), "prediction": pred[i],
             "scores": {"0": round(1 - proba[i], 4), "1": proba[i]}, "latency_ms": latency[i],
             "status": "ok", "unit_id": units[i]}
        if failed[i]:
            e.update(status="error", prediction=None, error="model server timeout")
        out.append(e)
    return out


def predictions(s: Scenario) -> tuple[list[dict], np.ndarray]:
    """The scenario's prediction events (dicts, all served by the champion) and their true labels."""
    X_all, y_all, names = load_shuttle()
    rng = np.random.default_rng(s.seed)
    idx = rng.integers(TRAIN_ROWS, len(X_all), s.n_events)
    X = _drifted(X_all[idx], s, names)
    ts = (s.start_ts_ms + np.arange(s.n_events) * (1000.0 / s.rate_per_s)).astype(np.int64)
    ids = [f"req-{s.seed}-{i}" for i in range(s.n_events)]
    units = [f"user-{i % 5000}" for i in range(s.n_events)]
    events = serve(Version(s.version, error_rate=s.error_rate), "champion", X, ts, ids, units, names, s.model, rng)
    return events, y_all[idx]


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

    def events(self, start: int, stop: int, start_ts_ms: int, rate_per_s: float, seed: int,
               model: str = "shuttle", drift: tuple[str, float] | None = None,
               label_delay_ms: int = 2000, label_fraction: float = 0.5) -> list[tuple[str, dict]]:
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
            X[:, names.index(drift[0])] += drift[1] * X_all[TRAIN_ROWS:, names.index(drift[0])].std()
        ts = (start_ts_ms + np.arange(start, stop) * (1000.0 / rate_per_s)).astype(np.int64)
        ids = [f"req-{seed}-{i}" for i in range(start, stop)]
        units = [f"user-{i * 7919 % 5000}" for i in range(start, stop)]
        weights = {"champion": 100 - self.canary_weight, "canary": self.canary_weight}
        to_canary = np.array([self.canary is not None and assign_variant(u, weights) == "canary" for u in units])
        out: list[tuple[str, dict]] = []
        served: dict[str, dict] = {}
        for variant, version, mask in (("champion", self.champion, ~to_canary), ("canary", self.canary, to_canary),
                                       ("shadow", self.shadow, ~to_canary)):
            if version is None or not mask.any():
                continue
            pick = np.flatnonzero(mask)
            events = serve(version, variant, X[pick], ts[pick], [ids[i] for i in pick], [units[i] for i in pick],
                           names, model, rng)
            out += [("prediction", e) for e in events]
            if variant != "shadow":
                served.update({e["request_id"]: e for e in events})
        labelled = rng.random(n) < label_fraction
        for i in np.flatnonzero(labelled).tolist():
            e = served[ids[i]]
            if e["status"] == "ok":
                out.append(("label", {"event_id": f"label-{ids[i]}", "request_id": ids[i], "model": model,
                                      "ts": int(ts[i]) + label_delay_ms, "label": int(y[i]),
                                      "outcome": float(e["prediction"] == y[i])}))
        out.sort(key=lambda ke: (ke[1]["ts"], ke[0] == "label"))
        return out


def generate(s: Scenario) -> Iterator[tuple[str, dict | bytes]]:
    """("prediction" | "label", event) in event-time order; malformed events come as bytes."""
    preds, truth = predictions(s)
    rng = np.random.default_rng(s.seed + 1)
    labelled = rng.random(s.n_events) < s.label_fraction
    labels = [{"event_id": f"label-{s.seed}-{i}", "request_id": preds[i]["request_id"], "model": s.model,
               "ts": preds[i]["ts"] + s.label_delay_ms, "label": int(truth[i])}
              for i in np.flatnonzero(labelled).tolist() if preds[i]["status"] == "ok"]
    stream: list[tuple[int, int, str, dict | bytes]] = []
    for i, e in enumerate(preds):
        if s.bad_event_every and i % s.bad_event_every == s.bad_event_every - 1:
            stream.append((e["ts"], 0, "prediction", _DEFECTS[(i // s.bad_event_every) % len(_DEFECTS)](e)))
        else:
            stream.append((e["ts"], 0, "prediction", e))
    stream += [(e["ts"], 1, "label", e) for e in labels]
    stream.sort(key=lambda t: (t[0], t[1]))
    return ((kind, e) for _, _, kind, e in stream)


def write_jsonl(path: Path, events: Iterable[dict | bytes]) -> int:
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
    return write_jsonl(path, ({**e, "label": int(y)} for e, y in zip(preds, truth)))


ROLLOUT_SETTINGS = (
    'checks = ["drift", "prediction_drift", "missing_rate", "performance", "shadow", "canary", "ab"]\n\n'
    "[models.shadow]\nmin_events = 1000\nmin_duration = \"3s\"\n\n"
    "[models.canary]\nsteps = [10, 50, 100]\nmin_events = 100\nmin_duration = \"3s\"\n"
)


def write_demo_config(path: Path, reference_path: Path, bucket: str = "1s", window: str = "20s",
                      model: str = "shuttle", rollout: bool = False) -> None:
    """A monitor config for the simulator's model; ``rollout`` adds shadow, canary and A/B
    checks with short steps, for a demo that lasts a minute."""
    checks = ROLLOUT_SETTINGS if rollout else 'checks = ["drift", "prediction_drift", "missing_rate", "performance"]\n'
    path.write_text(
        "[defaults]\n"
        f'bucket = "{bucket}"\n'
        f'window = "{window}"\n'
        'allowed_lateness = "2s"\n'
        "false_alarm_every_events = 1000000\n\n"
        "[[models]]\n"
        f'name = "{model}"\n'
        f'reference = "{Path(reference_path).name if Path(reference_path).parent == path.parent else reference_path}"\n'
        + checks
    )


async def publish(bootstrap: str, events: Iterable[tuple[str, dict | bytes]], *, realtime: bool,
                  speed: float = 1.0) -> dict[str, int]:
    """Send predictions and labels to their topics; when ``realtime``, event time advances at
    ``speed`` x the wall clock (event ``ts`` should then start near now)."""
    from coalmine.client import Publisher

    counts = {"prediction": 0, "label": 0}
    target = {"prediction": topics.PREDICTIONS, "label": topics.LABELS}
    first_ts, t0 = None, time.monotonic()
    async with Publisher(bootstrap) as pub:
        pending = []
        for kind, event in events:
            if realtime and isinstance(event, dict):
                first_ts = event["ts"] if first_ts is None else first_ts
                ahead = (event["ts"] - first_ts) / 1000 / speed - (time.monotonic() - t0)
                if ahead > 0.02:
                    await asyncio.gather(*pending)
                    pending.clear()
                    await asyncio.sleep(ahead)
            pending.append(await pub._send(target[kind], event))
            counts[kind] += 1
            if len(pending) >= 5000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    return counts


async def run_live(bootstrap: str, serving: Serving, *, seconds: float, rate_per_s: float, seed: int = 7,
                   plan=None, bad_event_every: int = 0, step_s: float = 0.2,
                   targets: dict[str, str] | None = None) -> dict[str, int]:
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
                raw = event
                if kind == "prediction" and bad_event_every and counts["prediction"] % bad_event_every == bad_event_every - 1:
                    raw = _DEFECTS[counts["malformed"] % len(_DEFECTS)](event)
                    counts["malformed"] += 1
                sends.append(await pub._send(target[kind], raw))
                counts[kind] += 1
            await asyncio.gather(*sends)
            done += per_step
            step += 1
            await asyncio.sleep(max(0.0, t0 + step * step_s - time.monotonic()))
    return counts
