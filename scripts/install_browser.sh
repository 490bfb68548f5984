#!/usr/bin/env bash
# The browser test of scripts/serve.py drives Debian's chromium with playwright. Install chromium where we can
# (root with apt-get, as in CI); elsewhere say so, and that test is skipped with the reason.
set -uo pipefail
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing chromium for the browser test (apt-get)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
    || echo "note: could not install chromium; the browser test will be skipped"
else
  echo "note: chromium is not installed (apt-get install chromium); the browser test will be skipped"
fi
exit 0
