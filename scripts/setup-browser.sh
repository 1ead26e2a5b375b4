#!/usr/bin/env bash
# Headless Chromium for the report browser tests (tests/test_browser.py), from Debian's own package:
# Playwright's browser download is not reachable from CI, Debian's `chromium` is (DESIGN.md section 4).
# Idempotent; never fails the caller's job by itself (.ci/run calls it with `|| true`): without a browser
# the browser tests skip and say why.
set -uo pipefail
if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then
  echo "setup-browser: $(chromium --version 2>/dev/null || echo chromium) already installed"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "setup-browser: not root; install Debian's chromium yourself (sudo apt-get install -y chromium)" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "setup-browser: no apt-get here; install a headless chromium on PATH" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq && apt-get install -y -qq chromium >/dev/null \
  && echo "setup-browser: installed $(chromium --version 2>/dev/null)"
