# kubeshim's image: the daemon, plus the example backend and the clients the compose lab uses.
#   docker build -t kubeshim:0.1.0 .
# The recipe is scripts/image-install.sh; tests/peers/images.py runs the same script over a
# debootstrapped Debian base without a container engine. Any Debian bookworm base works:
#   docker build --build-arg BASE=my-debian-base:bookworm -t kubeshim:0.1.0 .
ARG BASE=debian:bookworm-slim
FROM ${BASE}

WORKDIR /app
COPY pyproject.toml README.md ./
COPY cluster cluster
COPY proxy proxy
COPY dns dns
COPY kubeshim kubeshim
COPY scripts/image-install.sh /usr/local/lib/kubeshim/image-install.sh
# An offline build: --build-arg KUBESHIM_WHEELS=<folder or http:// URL of wheels>.
ARG KUBESHIM_WHEELS=
RUN sh /usr/local/lib/kubeshim/image-install.sh
COPY examples examples

# healthz (/healthz, /livez), metrics (/metrics, /status), DNS.
EXPOSE 10256 10249 53/udp 53/tcp
ENTRYPOINT ["kubeshim"]
CMD ["--help"]
