#!/usr/bin/env bash
# Self-signed CA and SuperLink server certificate for the TLS overlay (docker/compose.tls.yml).
#   docker/make-certs.sh [OUT_DIR] [extra SAN entries, e.g. IP:10.200.0.1 DNS:link.example]
# Writes ca.crt, ca.key, server.pem, server.key. The server certificate is valid for the compose
# service name "superlink", localhost and 127.0.0.1, plus the extra names given.
set -euo pipefail
out=${1:-"$(dirname "$0")/certs"}
shift || true
san="DNS:superlink,DNS:localhost,IP:127.0.0.1"
for extra in "$@"; do san="$san,$extra"; done
mkdir -p "$out"
cd "$out"
openssl genrsa -out ca.key 4096 2>/dev/null
openssl req -new -x509 -key ca.key -sha256 -days 365 -subj "/CN=fedmoe-ca" -out ca.crt
openssl genrsa -out server.key 4096 2>/dev/null
openssl req -new -key server.key -subj "/CN=superlink" -out server.csr
printf "subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n" "$san" > server.ext
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.pem -days 365 -sha256 -extfile server.ext 2>/dev/null
rm -f server.csr server.ext ca.srl
echo "certificates in $out (SAN $san)"
