# syntax=docker/dockerfile:1
# Multi-stage build of handoff-csi. The runtime image carries exactly what the node
# plugin executes: mkfs.ext4 and resize2fs (e2fsprogs), mkfs.xfs and xfs_growfs (xfsprogs),
# blkid (util-linux), modprobe (kmod); deploy/image/build.sh builds the same image offline.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY src src
COPY benches benches
RUN cargo build --release --locked --bin handoff-csi

FROM debian:bookworm-slim
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="handoff-csi" \
      org.opencontainers.image.description="CSI block-storage driver with safe attach tracking for KubeVirt live migration" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN apt-get update \
 && apt-get install -y --no-install-recommends e2fsprogs xfsprogs util-linux kmod \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/handoff-csi /usr/local/bin/handoff-csi
# The node plugin must run privileged as root (loop devices, mount(2) with
# Bidirectional propagation); the controller needs no privileges and runs as nobody
# through its Deployment's securityContext.
ENTRYPOINT ["/usr/local/bin/handoff-csi"]
