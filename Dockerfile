# The coalmine worker image used by docker-compose.yml.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY coalmine ./coalmine
RUN pip install --no-cache-dir .
ENTRYPOINT ["coalmine"]
CMD ["worker", "--help"]
