#!/usr/bin/env bash
# Builds the release binaries into TARGET/dist (TARGET: cargo's target directory) and prints
# that directory's absolute path:
# - mgpu_scheduler_server linked dynamically: it loads NVIDIA's NVML library at run time;
# - the client commands (mgpu_srun, mgpu_queue, ...) linked statically with glibc: they are
#   started once per call, and the dynamic loader's work (about 0.5 ms per start here) is a
#   fifth of a `mgpu_srun --detach`. They resolve no user or host names, so glibc's
#   static-linking caveats (NSS modules) do not apply. Where that cannot be built (no libc.a,
#   or not a glibc target), the clients are the usual dynamically linked ones.
# Usage: scripts/build-release.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo=${CARGO:-cargo}
clients=(mgpu_srun mgpu_sbatch mgpu_queue mgpu_cancel mgpu_log mgpu_acct mgpu_top mgpu_control)

"$cargo" build --release --locked --bins >&2
target_dir=$("$cargo" metadata --format-version 1 --no-deps |
  grep -o '"target_directory":"[^"]*"' | sed 's/.*:"\(.*\)"/\1/')
host=$("${RUSTC:-rustc}" -vV | sed -n 's/^host: //p')
src="$target_dir/release"
if [[ $host == *-linux-gnu ]]; then
  # With an explicit --target, RUSTFLAGS reach only the target's crates, not build scripts or
  # proc macros (which cannot be linked statically); the output goes to TARGET/HOST/release.
  bins=()
  for c in "${clients[@]}"; do bins+=(--bin "$c"); done
  if RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
    "$cargo" build --release --locked --target "$host" -p mgpu "${bins[@]}" >&2; then
    src="$target_dir/$host/release"
  else
    echo "build-release.sh: static clients failed to build (is libc6-dev's libc.a there?);" \
      "using dynamically linked ones" >&2
  fi
fi
dist="$target_dir/dist"
rm -rf "$dist"
mkdir -p "$dist"
install -m 755 "$target_dir/release/mgpu_scheduler_server" "$dist/"
for c in "${clients[@]}"; do install -m 755 "$src/$c" "$dist/"; done
# Man pages and shell completions, from the same argument definitions as --help.
"$cargo" run --quiet --release --locked -p mgpu --example gen-docs -- "$dist/share" >&2
echo "$dist"
