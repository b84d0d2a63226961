#!/bin/sh
# Installs Debian's chromium for the studio page's browser tests (tests/serve/test_studio_browser.py drives it
# through Playwright with executable_path=/usr/bin/chromium; no Playwright browser download). A no-op when it is
# already there. Needs root (or sudo) for apt-get.
set -eu
CHROMIUM=/usr/bin/chromium
if [ -x "$CHROMIUM" ]; then
    echo "chromium already installed: $CHROMIUM"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: apt-get not found; install chromium so that $CHROMIUM exists (the browser tests skip without it)" >&2
    exit 2
fi
if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
else
    echo "error: installing chromium needs root: run this script as root (or install sudo)" >&2
    exit 2
fi
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends chromium
if [ ! -x "$CHROMIUM" ]; then
    echo "error: the chromium package did not install $CHROMIUM" >&2
    exit 2
fi
echo "chromium installed: $CHROMIUM"
