#!/usr/bin/env bash
# Builds the Debian package (scripts/build-deb.sh) and checks it:
# - its control data: name, dependencies, conffiles (/etc/mgpu/mgpu.toml, /etc/pam.d/mgpu),
#   maintainer scripts that enable/start the unit and restart it on upgrade without stopping it;
# - its contents: every binary of crates/mgpu/src/bin in /usr/bin, without debug info, and
#   running; a man page and bash/zsh/fish completions for each; the unit with
#   KillMode=process; the PAM file; the docs;
# - with --install (as root, on a machine without mgpu: CI's fresh container): dpkg -i, the
#   installed daemon on the FHS layout (database in /var/lib/mgpu, job logs in /var/log/mgpu)
#   runs a job, an upgrade (dpkg -i again) keeps the job database, `dpkg -r` keeps it and
#   `dpkg -P` removes it. Without systemd running, the unit is enabled but not started.
# Usage: scripts/package-test.sh [--install] [DIST]   (DIST: from scripts/build-release.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
install=false
if [ "${1:-}" = --install ]; then
  install=true
  shift
fi
fail() {
  echo "package-test: FAIL: $*" >&2
  exit 1
}
if $install; then
  [ "$(id -u)" = 0 ] || fail "--install needs root"
  for p in /var/lib/mgpu /var/log/mgpu /etc/mgpu /usr/bin/mgpu_scheduler_server; do
    [ -e "$p" ] && fail "$p exists: --install is for a machine without mgpu"
  done
  dpkg -s mgpu >/dev/null 2>&1 && fail "the mgpu package is installed here already"
fi

deb=$(bash scripts/build-deb.sh "$@")
[ -f "$deb" ] || fail "no package built"
echo "== $deb ($(du -k "$deb" | cut -f1) KiB)"
tmp=$(mktemp -d /tmp/mgpu-package-test.XXXXXX)
trap 'rm -rf "$tmp"' EXIT

info=$(dpkg-deb -I "$deb")
echo "$info" | sed -n '/Package:/,$p'
field() { dpkg-deb -f "$deb" "$1"; }
[ "$(field Package)" = mgpu ] || fail "package name"
field Depends | grep -q libc6 || fail "no libc6 dependency: $(field Depends)"
echo "== installed size: $(field Installed-Size) KiB"
dpkg-deb -e "$deb" "$tmp/control"
for c in /etc/mgpu/mgpu.toml /etc/pam.d/mgpu; do
  grep -qx "$c" "$tmp/control/conffiles" || fail "$c is not a conffile"
done
grep -q 'deb-systemd-helper' "$tmp/control/postinst" || fail "postinst does not enable the unit"
grep -q 'restart' "$tmp/control/postinst" || fail "postinst does not restart the unit on upgrade"
grep -q 'rm -rf /var/lib/mgpu' "$tmp/control/postrm" || fail "postrm does not purge the state"
if [ -f "$tmp/control/prerm" ] && grep -q 'upgrade' "$tmp/control/prerm" &&
  grep -A3 '"upgrade"' "$tmp/control/prerm" | grep -q 'stop'; then
  fail "prerm stops the daemon on upgrade"
fi

dpkg-deb -c "$deb" | awk '{print $6}' | sed 's,^\./,/,' >"$tmp/files"
has() { grep -qx "$1" "$tmp/files" || fail "$1 missing from the package"; }
dpkg-deb -x "$deb" "$tmp/root"
bins=$(cd crates/mgpu/src/bin && ls ./*.rs | sed 's,^\./,,; s,\.rs$,,')
for b in $bins; do
  has "/usr/bin/$b"
  has "/usr/share/man/man1/$b.1.gz"
  has "/usr/share/bash-completion/completions/$b"
  has "/usr/share/zsh/vendor-completions/_$b"
  has "/usr/share/fish/vendor_completions.d/$b.fish"
  if readelf -SW "$tmp/root/usr/bin/$b" | grep -qE '\.debug_(info|line|str) '; then
    fail "/usr/bin/$b has debug info"
  fi
  "$tmp/root/usr/bin/$b" --version >/dev/null || fail "$b --version"
  printf '   %-24s %6s KiB\n' "$b" "$(du -k "$tmp/root/usr/bin/$b" | cut -f1)"
done
unit=$(grep -E '/systemd/system/mgpu\.service$' "$tmp/files") || fail "no unit"
grep -qx 'KillMode=process' "$tmp/root$unit" || fail "the unit does not keep jobs on restart"
grep -q '^ExecStart=/usr/bin/mgpu_scheduler_server' "$tmp/root$unit" || fail "ExecStart"
has /etc/mgpu/mgpu.toml
has /etc/pam.d/mgpu
has /usr/share/doc/mgpu/README.md
has /usr/share/doc/mgpu/docs/layout.md
echo "== contents and control data: ok"
$install || exit 0

echo "== dpkg -i"
# Whatever happens next, the machine is left without mgpu.
cleanup() {
  set +e
  [ -n "${server:-}" ] && kill "$server" 2>/dev/null
  dpkg -P mgpu >/dev/null 2>&1
  rm -rf "$tmp" /run/mgpu/runs
  rmdir /run/mgpu 2>/dev/null
  return 0
}
trap cleanup EXIT
dpkg -i "$deb"
for b in $bins; do
  [ "$(command -v "$b")" = "/usr/bin/$b" ] || fail "$b is not on PATH"
done
[ -d /var/lib/mgpu ] && [ "$(stat -c %a /var/lib/mgpu)" = 700 ] || fail "/var/lib/mgpu"
[ -f /etc/mgpu/mgpu.toml ] || fail "/etc/mgpu/mgpu.toml"
sock="$tmp/mgpu.sock"
export MGPU_SOCKET=$sock
# The installed daemon on its own defaults (a private socket: this machine may run others).
start_server() {
  mgpu_scheduler_server --simulate-gpus 1x1GiB 2>>"$tmp/server.log" &
  server=$!
  for _ in $(seq 200); do [ -S "$sock" ] && return; sleep 0.05; done
  cat "$tmp/server.log" >&2
  fail "the installed daemon did not start"
}
stop_server() {
  kill "$server"
  wait "$server" || true
  server=
}
start_server
id=$(mgpu_srun --parsable --detach -- echo hello-from-the-package)
for _ in $(seq 200); do mgpu_acct -j "$id" | grep -q COMPLETED && break; sleep 0.05; done
grep -q hello-from-the-package "/var/log/mgpu/job-$id.log" || fail "job log not in /var/log/mgpu"
[ -f /var/lib/mgpu/mgpu.db ] || fail "database not in /var/lib/mgpu"
stop_server

echo "== upgrade (dpkg -i again): the job database stays"
dpkg -i "$deb"
start_server
mgpu_acct -j "$id" | grep -q COMPLETED || fail "job $id lost by the upgrade"
stop_server

echo "== dpkg -r keeps the state, dpkg -P removes it"
dpkg -r mgpu
[ -f /var/lib/mgpu/mgpu.db ] || fail "dpkg -r removed the database"
[ -e /usr/bin/mgpu_srun ] && fail "dpkg -r left the binaries"
dpkg -P mgpu
for p in /var/lib/mgpu /var/log/mgpu /etc/mgpu /etc/pam.d/mgpu; do
  [ -e "$p" ] && fail "$p left after purge"
done
rm -rf /run/mgpu/runs
rmdir /run/mgpu 2>/dev/null || true
echo "== install, upgrade, remove, purge: ok"
