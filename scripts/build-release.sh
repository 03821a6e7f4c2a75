#!/usr/bin/env bash
# Builds the release binaries into TARGET/dist (TARGET is $CARGO_TARGET_DIR, else ./target):
# - mgpu_scheduler_server linked dynamically: it loads NVIDIA's NVML library at run time;
# - the client commands (mgpu_srun, mgpu_queue, ...) linked statically with glibc: they are
#   started once per call, and the dynamic loader's work (about 0.5 ms per start here) is a
#   quarter of a trivial `mgpu_srun --detach`. They resolve no user or host names, so glibc's
#   static-linking caveats (NSS modules) do not apply.
# Usage: scripts/build-release.sh            (prints the dist directory last)
set -euo pipefail
cd "$(dirname "$0")/.."
target_dir=${CARGO_TARGET_DIR:-target}
clients=(mgpu_srun mgpu_queue mgpu_cancel mgpu_log mgpu_acct)

cargo build --release --locked --bins >&2
host=$(rustc -vV | sed -n 's/^host: //p')
src="$target_dir/release"
if [[ $host == *-linux-gnu ]]; then
  # With an explicit --target, RUSTFLAGS reach only the target's crates, not build scripts or
  # proc macros (which cannot be linked statically); the output goes to TARGET/HOST/release.
  bins=()
  for c in "${clients[@]}"; do bins+=(--bin "$c"); done
  RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
    cargo build --release --locked --target "$host" -p mgpu "${bins[@]}" >&2
  src="$target_dir/$host/release"
fi
dist="$target_dir/dist"
mkdir -p "$dist"
install -m 755 "$target_dir/release/mgpu_scheduler_server" "$dist/"
for c in "${clients[@]}"; do install -m 755 "$src/$c" "$dist/"; done
echo "$dist"
