#!/usr/bin/env bash
# Make sure commands from Debian packages are installed: apt-tools.sh COMMAND=PACKAGE ...
# A command already on PATH costs nothing; a missing one is installed with apt-get
# (the package lists are refreshed once if the first attempt fails). Fails loudly when a
# command is still missing: a check that needs it must never be skipped.
set -euo pipefail

missing=()
for pair in "$@"; do
  command -v "${pair%%=*}" >/dev/null 2>&1 || missing+=("${pair#*=}")
done
[ "${#missing[@]}" -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  echo "error: need ${missing[*]} (apt-get install ${missing[*]}) and not running as root" >&2
  exit 1
fi
apt_install() {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
echo "installing ${missing[*]}"
if ! apt_install "${missing[@]}"; then
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  apt_install "${missing[@]}"
fi

for pair in "$@"; do
  if ! command -v "${pair%%=*}" >/dev/null 2>&1; then
    echo "error: ${pair%%=*} is still missing after installing ${pair#*=}" >&2
    exit 1
  fi
done
