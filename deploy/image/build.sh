#!/bin/sh
# The runtime image, built from Debian's packages alone (no Docker engine, no registry):
# a bookworm root filesystem with exactly the Dockerfile's runtime packages (mmdebstrap),
# the handoff-csi binary, and the Dockerfile's entrypoint and labels, packed as an OCI
# image archive (umoci). tests/image.rs checks that PACKAGES and the Dockerfile agree.
#
#   deploy/image/build.sh OUT_DIR
#
# Leaves OUT_DIR/rootfs (the unpacked image) and OUT_DIR/handoff-csi.oci.tar. Load it
# with `skopeo copy oci-archive:OUT_DIR/handoff-csi.oci.tar docker://REGISTRY/handoff-csi:TAG`
# or `podman load -i OUT_DIR/handoff-csi.oci.tar`.
#
# Needs root, mmdebstrap and umoci (apt-get install mmdebstrap umoci). The binary is
# target/release/handoff-csi (built with cargo unless it exists), or HANDOFF_BINARY.
# HANDOFF_MIRROR overrides the Debian mirror.
set -eu

# What the node plugin executes: blkid (util-linux), mkfs.ext4 and resize2fs (e2fsprogs),
# mkfs.xfs and xfs_growfs (xfsprogs), modprobe for nbd.ko (kmod).
PACKAGES="e2fsprogs xfsprogs util-linux kmod"

out=${1:?usage: deploy/image/build.sh OUT_DIR}
top=$(cd "$(dirname "$0")/../.." && pwd)
mirror=${HANDOFF_MIRROR:-http://deb.debian.org/debian}
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$top/Cargo.toml" | head -n 1)

for tool in mmdebstrap umoci; do
    command -v "$tool" >/dev/null || { echo "build.sh: $tool is missing (apt-get install $tool)" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "build.sh: run as root (mmdebstrap builds the root filesystem)" >&2; exit 1; }

binary=${HANDOFF_BINARY:-$top/target/release/handoff-csi}
if [ -z "${HANDOFF_BINARY:-}" ] && [ ! -x "$binary" ]; then
    echo "build.sh: building the release binary" >&2
    (cd "$top" && cargo build --release --locked --bin handoff-csi)
fi
[ -x "$binary" ] || { echo "build.sh: no binary at $binary" >&2; exit 1; }

mkdir -p "$out"
out=$(cd "$out" && pwd)
rootfs=$out/rootfs
# A root filesystem someone still has /dev or /proc bound into must not be removed.
if awk -v d="$out/" 'index($5, d) == 1 { found = 1 } END { exit !found }' /proc/self/mountinfo; then
    echo "build.sh: something is still mounted under $out; unmount it first" >&2
    exit 1
fi
rm -rf --one-file-system "$rootfs" "$out/layout" "$out/bundle" "$out/handoff-csi.oci.tar"

echo "build.sh: bookworm root filesystem with: $PACKAGES" >&2
# The same trimming as debian:bookworm-slim: no documentation, manuals or locales.
# No recommended packages, as the Dockerfile's --no-install-recommends; /usr merged by
# mmdebstrap's hook instead of the usrmerge package (which would pull in perl).
mmdebstrap --quiet --variant=minbase \
    --aptopt='APT::Install-Recommends "false"' \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --include="$(echo "$PACKAGES" | tr ' ' ',')" \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
    bookworm "$rootfs" "$mirror"
install -D -m 0755 "$binary" "$rootfs/usr/local/bin/handoff-csi"

echo "build.sh: OCI image handoff-csi:$version" >&2
umoci init --layout "$out/layout"
umoci new --image "$out/layout:$version"
umoci unpack --image "$out/layout:$version" "$out/bundle"
rm -rf "$out/bundle/rootfs"
cp -a "$rootfs" "$out/bundle/rootfs"
umoci repack --image "$out/layout:$version" "$out/bundle"
# The Dockerfile's ENTRYPOINT and LABELs.
umoci config --image "$out/layout:$version" \
    --config.entrypoint /usr/local/bin/handoff-csi \
    --config.label org.opencontainers.image.title=handoff-csi \
    --config.label "org.opencontainers.image.description=CSI block-storage driver with safe attach tracking for KubeVirt live migration" \
    --config.label "org.opencontainers.image.version=$version" \
    --config.label org.opencontainers.image.licenses=Apache-2.0
umoci gc --layout "$out/layout"
rm -rf "$out/bundle"
tar -C "$out/layout" -cf "$out/handoff-csi.oci.tar" .
rm -rf "$out/layout"

size=$(du -sb "$out/handoff-csi.oci.tar" | cut -f1)
echo "build.sh: $out/handoff-csi.oci.tar: $size bytes" >&2
