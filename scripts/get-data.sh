#!/usr/bin/env bash
# Install the offline data and tools fedmoe uses from Debian packages when they are missing.
# Without apt (or without root) fedmoe falls back to the Hugging Face hub at run time.
set -euo pipefail
need=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || need+=(dataset-fashion-mnist)
# charlm: one Debian fortunes package per language (fedmoe.data.text.LANGUAGE_PACKAGES)
for pkg in fortunes fortunes-min fortunes-de fortunes-it fortunes-es fortunes-ru fortunes-pl fortunes-cs fortunes-br; do
  [ -f "/var/lib/dpkg/info/$pkg.list" ] || need+=("$pkg")
done
command -v docker-compose >/dev/null || need+=(docker-compose)
command -v ip >/dev/null || need+=(iproute2)
command -v openssl >/dev/null || need+=(openssl)
[ ${#need[@]} -eq 0 ] && exit 0
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "get-data: installing ${need[*]} with apt-get"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
else
  echo "get-data: missing ${need[*]} and apt-get is not usable here;" \
       "Fashion-MNIST will be read from the hub (data-source=hub) if reachable" >&2
fi
