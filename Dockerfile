# The sidecar image: mitmdump with the durable addon, listening on 8080, CA in /certs.
FROM python:3.12-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY addon ./addon
RUN pip install --no-cache-dir . && useradd --create-home durable && mkdir /certs && chown durable /certs
USER durable
EXPOSE 8080
# DATABASE_URL (or --set durable_dsn=...) points at the journal's PostgreSQL.
ENTRYPOINT ["mitmdump", "-s", "/app/addon/durable.py", \
            "--listen-host", "0.0.0.0", "-p", "8080", "--set", "confdir=/certs"]
