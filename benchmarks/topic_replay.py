"""Topic replay against file replay of the same events, on the embedded broker: the events of
``benchmarks/replay_speed.py`` (10 numeric features, 1,000 per second of event time) written to
a file and published to a prediction topic of 6 partitions; each replay is timed end to end
(topic: starting the reading process, connecting, offsets, fetching, the event-time merge of
partitions, and the replay), twice: called in this process (``replay_files`` against
``replay_topics``, imports and calibration done), and as a user runs them
(``coalmine replay --predictions FILE`` against ``coalmine replay --from-topics``, each a process
of its own, whose alerts must be byte-identical).
Target: topic replay at least as fast as file replay.

usage: python benchmarks/topic_replay.py [--events N] [--repeat K]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from coalmine.baselines import build_baselines
from coalmine.broker import EmbeddedBroker
from coalmine.config import load_config
from coalmine.launch import Namespace
from coalmine.replay import replay_files, replay_topics

sys.path.insert(0, str(Path(__file__).parent))
from replay_speed import BENCH_MODEL, bench_work  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each, interleaved")
    args = ap.parse_args()
    work = bench_work(
        "coalmine-topic-bench-",
        args.events,
        '[defaults]\nwindow = "60s"\n\n'
        + BENCH_MODEL
        + 'checks = ["drift", "prediction_drift", "missing_rate"]\n',
        own_cache=True,
    )
    config = load_config(work / "monitor.toml")
    build_baselines(config)  # calibration cached: neither replay below pays for it
    with EmbeddedBroker() as broker:
        ns = Namespace(broker)
        lines = (work / "stream.jsonl").read_bytes().splitlines()
        t0 = time.perf_counter()
        ns.publish(("prediction", line) for line in lines)
        publish = time.perf_counter() - t0
        runs, cli_runs = [], []
        for _ in range(args.repeat):  # interleaved: both see the same machine state
            t0 = time.perf_counter()
            run = replay_files(config, work / "stream.jsonl", progress=False)
            file_rate = args.events / (time.perf_counter() - t0)
            file_counts = run.counts
            t0 = time.perf_counter()
            run = replay_topics(
                config,
                broker.bootstrap,
                predictions=ns.topic["predictions"],
                labels=ns.topic["labels"],
                progress=False,
            )
            runs.append((file_rate, args.events / (time.perf_counter() - t0)))
            assert run.counts == file_counts, (run.counts, file_counts)
            cli_runs.append(cli_rates(work, broker.url, ns.prefix, args.events))
    print(
        f"# topic vs file replay, {args.events:,} events, 6 partitions, embedded broker "
        f"(publishing took {publish:.1f} s); target: topics / file >= 1"
    )
    print_runs("in this process: replay_files, replay_topics", runs)
    print_runs("command line: coalmine replay --predictions, --from-topics", cli_runs)


def cli_rates(work: Path, broker_url: str, namespace: str, events: int) -> tuple[float, float]:
    """Events/s of ``coalmine replay`` from the file, then from the topics, each end to end
    (a process of its own); their alerts must be byte-identical."""
    command = [sys.executable, "-m", "coalmine", "replay", "--config", str(work / "monitor.toml")]
    env = {**os.environ, "COALMINE_NAMESPACE": namespace}
    rates = []
    for source in (
        ["--predictions", str(work / "stream.jsonl")],
        ["--from-topics", "--broker", broker_url],
    ):
        t0 = time.perf_counter()
        subprocess.run(
            [*command, *source, "--alerts", str(work / f"alerts{len(rates)}.jsonl"), "--quiet"],
            env=env,
            check=True,
            capture_output=True,
        )
        rates.append(events / (time.perf_counter() - t0))
    alerts = [(work / f"alerts{i}.jsonl").read_bytes() for i in range(2)]
    assert alerts[0] == alerts[1], "the topic replay's alerts differ from the file replay's"
    return rates[0], rates[1]


def print_runs(title: str, runs: list[tuple[float, float]]) -> None:
    print(f"\n{title}")
    print("| run | file events/s | topics (--from-topics) events/s | topics / file |")
    print("|---|---|---|---|")
    for i, (file_rate, topic_rate) in enumerate(runs, 1):
        print(f"| {i} | {file_rate:,.0f} | {topic_rate:,.0f} | {topic_rate / file_rate:.2f} |")
    best_file, best_topic = (max(rates) for rates in zip(*runs, strict=True))
    print(f"| best | {best_file:,.0f} | {best_topic:,.0f} | {best_topic / best_file:.2f} |")


if __name__ == "__main__":
    main()
