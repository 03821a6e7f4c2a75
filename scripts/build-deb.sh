#!/usr/bin/env bash
# Builds the Debian package mgpu_VERSION-1_ARCH.deb (cargo-deb; metadata in crates/mgpu/Cargo.toml)
# and prints its path. Usage: scripts/build-deb.sh [DIST]
# DIST: the output of scripts/build-release.sh (binaries, and share/ with man pages and
# completions), reused as is; without it, build-release.sh is run first.
# The binaries are staged in packaging/build (stripped of their symbols) with share/, and the
# package takes them, the unit, the PAM file, the default config and the docs from there.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo=${CARGO:-cargo}
if ! "$cargo" deb --version >/dev/null 2>&1; then
  echo "build-deb.sh: cargo-deb is missing: cargo install cargo-deb" >&2
  exit 1
fi
dist=${1:-$(bash scripts/build-release.sh)}
stage=packaging/build
rm -rf "$stage"
mkdir -p "$stage/bin"
for b in "$dist"/mgpu_*; do
  install -m 755 "$b" "$stage/bin/"
  strip --strip-unneeded "$stage/bin/$(basename "$b")"
done
cp -r "$dist/share" "$stage/share"
# bash-completion finds a command's completion by the command's name.
for f in "$stage"/share/bash-completion/completions/*.bash; do
  mv "$f" "${f%.bash}"
done
out=$("$cargo" deb -p mgpu --no-build --locked 2>&1 | tee -a /dev/stderr | grep '\.deb$' | tail -n1)
echo "$out"
