#!/bin/sh
# The Debian packages the tests need, installed with apt-get when missing: the shells tab
# completion is tested in (zsh, fish; bash is there), tmux to type into them, groff and man
# for the manual pages, espeak-ng to speak the sentences transcribe is tested on. Needs
# root (or sudo without a password); elsewhere the missing tools are named and the tests
# that need them fail with the same words.
set -eu
missing=""
for pair in zsh:zsh fish:fish tmux:tmux groff:groff-base man:man-db espeak-ng:espeak-ng; do
    tool=${pair%%:*}
    command -v "$tool" >/dev/null 2>&1 || missing="$missing ${pair#*:}"
done
[ -n "$missing" ] || exit 0
if [ "$(id -u)" = 0 ]; then
    sudo=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo="sudo -n"
else
    echo "warning: the tests need these Debian packages:$missing (install them as root)" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "warning: the tests need:$missing (no apt-get here: install them another way)" >&2
    exit 0
fi
echo "installing Debian packages for the tests:$missing" >&2
$sudo apt-get update -qq >&2
# shellcheck disable=SC2086  (one word per package)
$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >&2
