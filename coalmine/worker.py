"""Start one coalmine worker: validate the config, create the topics, run the Faust app.

Start several with the same ``--app-id`` to scale out: Kafka splits the partitions between them.
"""

from __future__ import annotations

import asyncio
import logging

from coalmine import topics
from coalmine.broker import ensure_topics, parse_broker_url
from coalmine.config import Config


def run_worker(config: Config, broker_url: str, *, web_port: int = 6066, web_host: str = "127.0.0.1",
               app_id: str = "coalmine",
               partitions: int = topics.DEFAULT_PARTITIONS, loglevel: str = "warning") -> None:
    """Blocks until the worker is stopped (SIGINT/SIGTERM)."""
    import faust

    from coalmine.agents.app import create_app
    from coalmine.streams.monitor import ModelMonitor

    logging.basicConfig(level=loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # calibrate before joining the group, so a slow start never stalls a rebalance
    monitors = {name: ModelMonitor(m) for name, m in config.models.items()}
    asyncio.run(ensure_topics(parse_broker_url(broker_url), topics.all_topics(partitions)))
    app = create_app(config, broker_url, web_port=web_port, web_host=web_host, app_id=app_id,
                     partitions=partitions,
                     monitors=monitors)
    worker = faust.Worker(app, loglevel=loglevel, quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()
