# The coalmine worker image used by docker-compose.yml (`docker compose build`).
FROM python:3.11.10-slim-bookworm
WORKDIR /app
COPY pyproject.toml README.md ./
COPY coalmine ./coalmine
RUN pip install --no-cache-dir . \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin coalmine
# not root: a worker needs no privilege; its calibration cache and Faust's data are its own
USER coalmine
ENV COALMINE_CACHE_DIR=/home/coalmine/.cache/coalmine \
    COALMINE_DATA_DIR=/home/coalmine/data \
    PYTHONUNBUFFERED=1
ENTRYPOINT ["coalmine"]
CMD ["worker", "--help"]
