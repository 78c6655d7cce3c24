# Arbiter container image.
#
# With access to an image registry (the usual case):
#   docker build -t arbiter .
# The base images are build arguments, e.g. for a mirror:
#   docker build --build-arg BUILDER_IMAGE=mirror/rust:1-bookworm \
#                --build-arg BASE_IMAGE=mirror/distroless/cc-debian12 .
# On a machine with a Docker engine but no registry, use docker/build-local.sh
# instead: it builds the binary on the host and a minimal base from Debian's
# packages with debootstrap (docker/make-base.sh).
#
# The runtime stage needs only glibc and libgcc (any Debian-12-based image,
# distroless/cc included: it runs no shell). It runs as uid 10001, keeps state
# in /data, and serves the client API on 7070, Raft on 7071 and metrics on 9090.
ARG BUILDER_IMAGE=rust:1-bookworm
ARG BASE_IMAGE=gcr.io/distroless/cc-debian12

FROM ${BUILDER_IMAGE} AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin arbiter \
 && strip -o /arbiter target/release/arbiter \
 && mkdir /data

FROM ${BASE_IMAGE}
COPY --from=build /arbiter /usr/local/bin/arbiter
COPY --from=build --chown=10001:10001 /data /data
USER 10001:10001
VOLUME ["/data"]
EXPOSE 7070 7071 9090
ENV ARBITER_LISTEN=0.0.0.0:7070 \
    ARBITER_PEER_LISTEN=0.0.0.0:7071 \
    ARBITER_METRICS_LISTEN=0.0.0.0:9090 \
    ARBITER_DATA_DIR=/data \
    ARBITER_LOG_FORMAT=json
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/arbiter"]
CMD ["serve"]
