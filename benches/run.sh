#!/usr/bin/env bash
# Reproduces the table in benches/README.md. Run as root (loop devices, mounts) on an
# otherwise idle machine; each bench prints its own table.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $(id -u) -eq 0 ]] || { echo "run as root: the lifecycle and migration benches attach loop devices" >&2; exit 1; }
cargo bench --locked --bench lifecycle -- --block 1000 --mount 48 --in-flight 8
cargo bench --locked --bench migration -- --migrations 50
cargo bench --locked --bench attachments -- --volumes 10000 --in-flight 64
cargo bench --locked --bench dataplane -- --seconds 3 --size-mib 256
cargo bench --locked --bench rds -- --rounds 200
