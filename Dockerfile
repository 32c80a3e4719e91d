# One small image with every Strait binary: strait-proxy (sidecar and its iptables init),
# strait-control-plane, strait-injector, strait-cni (copied onto each node in CNI mode; it
# runs there with the node's iptables) and the strait CLI.
#   docker build -t ghcr.io/strait-mesh/strait:0.1.0 .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked \
      -p strait-proxy -p strait-control-plane -p strait-injector -p strait-cni -p strait-cli --bins \
 && mkdir /out \
 && cp target/release/strait-proxy target/release/strait-control-plane \
       target/release/strait-injector target/release/strait-cni target/release/strait /out/

FROM debian:bookworm-slim
# iptables for `strait-proxy init`; nothing else runs in the image.
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/ /usr/local/bin/
# The proxy's UID (the injector runs each container with its own securityContext).
USER 2102:2102
ENTRYPOINT ["strait"]
