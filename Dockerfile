# Waygate's container image.
#
# With access to an image registry (the usual way):
#
#   docker build -t waygate .
#
# builds `waygate` from source in a Rust stage and copies it into a slim Debian runtime.
#
# Without a registry, scripts/docker-image.sh builds the same runtime stage on a Debian base made
# by debootstrap and a binary built on the host:
#
#   docker build --build-arg BASE=waygate-base:bookworm --build-arg BIN=prebuilt \
#       --target runtime CONTEXT     (CONTEXT holds only the `waygate` binary)
#
# The image runs `waygate serve` as the unprivileged user `waygate` (uid 10001). It needs no
# capability for its defaults: WireGuard listens on UDP 51820, every flow leaves from the gateway's
# own sockets (no TUN device, no NAT rules), and Docker lets unprivileged processes bind ports
# below 1024 (net.ipv4.ip_unprivileged_port_start=0 since Docker 20.10), so `dns.listen` on 53
# works too. Virtual networks routed through a next hop install a routing table, a rule and a
# firewall mark of their own: that takes `--user 0 --cap-add NET_ADMIN` (which also lets the
# gateway size its UDP buffers past the host's rmem_max).
#
#   docker run -d --name waygate -p 51820:51820/udp -v waygate-data:/var/lib/waygate \
#       -e WAYGATE_PUBLIC_ENDPOINT=gw.example.com:51820 waygate
#   docker exec waygate waygate device enroll --email ada@example.com > ada.conf
#
# Config: a file mounted at /etc/waygate/waygate.toml (or named by WAYGATE_CONFIG); without one,
# the entrypoint writes a minimal config from WAYGATE_PUBLIC_ENDPOINT into the data volume.

# Where the runtime's base comes from: a registry image, or the debootstrap base of
# scripts/docker-image.sh.
ARG BASE=debian:bookworm-slim
# Where the binary comes from: `build` (compiled here) or `prebuilt` (the build context's file).
ARG BIN=build

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# --strip-debug: the release profile keeps line tables for profiling (most of the binary's size);
# symbols stay, so a panic's backtrace still names functions.
RUN cargo build --release --locked --bin waygate \
    && install -D -m 0755 target/release/waygate /out/waygate \
    && strip --strip-debug /out/waygate

FROM scratch AS prebuilt
COPY waygate /out/waygate

# Named stage so `COPY --from` can follow the BIN argument (COPY --from takes no variables).
FROM ${BIN} AS bin

FROM ${BASE} AS runtime
# ca-certificates: the roots for DoT/DoH upstreams; iproute2: virtual networks' next-hop routes
# (`ip route`/`ip rule`). The debootstrap base has both; a registry base gets them here (the only
# step that needs the network).
RUN if [ ! -e /etc/ssl/certs/ca-certificates.crt ] || ! command -v ip >/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends ca-certificates iproute2 \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && groupadd --system --gid 10001 waygate \
    && useradd --system --uid 10001 --gid waygate --home-dir /var/lib/waygate \
        --shell /usr/sbin/nologin waygate \
    && install -d -o waygate -g waygate -m 0700 /var/lib/waygate \
    && install -d -o waygate -g waygate -m 0755 /var/run/wireguard /etc/waygate
COPY --from=bin /out/waygate /usr/local/bin/waygate
COPY scripts/docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
USER waygate
WORKDIR /var/lib/waygate
ENV WAYGATE_CONFIG=/etc/waygate/waygate.toml
VOLUME ["/var/lib/waygate"]
EXPOSE 51820/udp
# `waygate health` asks the running gateway over its WireGuard UAPI socket, which the data plane
# answers: a wedged serving loop fails the check.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["waygate", "health"]
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["serve"]
