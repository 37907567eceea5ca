#!/usr/bin/env bash
# Installs the real NBD programs the test suites and the bench drive (Debian/Ubuntu, as root).
set -euo pipefail
if [ "$(id -u)" -ne 0 ]; then
  echo "install-tools.sh: run as root (apt-get), e.g. sudo $0" >&2
  exit 1
fi
apt-get update
DEBIAN_FRONTEND=noninteractive apt-get install -y \
  nbdkit libnbd-bin python3-libnbd qemu-utils fio fuse3 e2fsprogs fuse2fs tmux
