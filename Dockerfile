# kubeshim's image: the daemon, plus the example backend and the clients the compose lab uses.
#   docker build -t kubeshim:0.1.0 .
FROM python:3.11-slim

# iproute2: the lab client routes the Service CIDR; curl and dig: clients for the lab.
RUN apt-get update \
    && apt-get install -y --no-install-recommends iproute2 curl dnsutils \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY cluster cluster
COPY proxy proxy
COPY dns dns
COPY kubeshim kubeshim
RUN pip install --no-cache-dir . && rm -rf build
COPY examples examples

# healthz (/healthz, /livez), metrics (/metrics, /status), DNS.
EXPOSE 10256 10249 53/udp 53/tcp
ENTRYPOINT ["kubeshim"]
CMD ["--help"]
