#!/usr/bin/env bash
# Every secret of a fedmoe deployment, one folder per party (see README, "Deployment").
#   docker/make-credentials.sh OUT_DIR SITES [extra SAN entries, e.g. IP:10.200.0.1 DNS:link.example]
# OUT_DIR/ca/         ca.key, ca.crt: the certificate authority (keep ca.key offline; mounted nowhere)
# OUT_DIR/superlink/  ca.crt, server.pem + server.key (TLS of the SuperLink's one port),
#                     superexec.secret (shared with the ServerApp's SuperExec)
# OUT_DIR/site-N/     ca.crt, supernode.key + supernode.key.pub (ECDSA P-384, OpenSSH format: the
#                     SuperNode's identity; the SuperLink operator registers the .pub),
#                     runtime.pem + runtime.key (TLS of the SuperNode's API for its ClientApp SuperExec),
#                     superexec.secret (shared between the site's SuperNode and its SuperExec)
# Server certificates name the compose service ("superlink", "supernode-N"), localhost, 127.0.0.1
# and the extra SAN entries. Folders are 0700, private files 0600. An existing folder is kept:
# delete it to rotate its keys.
set -euo pipefail
if [ $# -lt 2 ]; then sed -n 2,14p "$0"; exit 2; fi
out=$1 sites=$2
shift 2
extra=""
for san in "$@"; do extra="$extra,$san"; done
umask 077
mkdir -p "$out"
cd "$out"

server_cert() {  # server_cert DIR NAME CN SANS: DIR/NAME.pem and DIR/NAME.key signed by the CA
  local dir=$1 name=$2 cn=$3 san=$4
  openssl req -newkey rsa:3072 -nodes -keyout "$dir/$name.key" -out "$dir/$name.csr" -subj "/CN=$cn" 2>/dev/null
  printf "subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n" \
    "$san" > "$dir/$name.ext"
  openssl x509 -req -in "$dir/$name.csr" -CA ca/ca.crt -CAkey ca/ca.key -CAcreateserial -out "$dir/$name.pem" \
    -days 365 -sha256 -extfile "$dir/$name.ext" 2>/dev/null
  rm -f "$dir/$name.csr" "$dir/$name.ext" ca/ca.srl
}

if [ ! -d ca ]; then
  mkdir ca
  openssl req -x509 -newkey rsa:4096 -sha256 -days 365 -nodes -keyout ca/ca.key -out ca/ca.crt -subj "/CN=fedmoe-ca" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
fi
if [ ! -d superlink ]; then
  mkdir superlink
  cp ca/ca.crt superlink/
  server_cert superlink server superlink "DNS:superlink,DNS:localhost,IP:127.0.0.1$extra"
  head -c 32 /dev/urandom > superlink/superexec.secret
fi
for ((i = 0; i < sites; i++)); do
  site=site-$i
  [ -d "$site" ] && continue
  mkdir "$site"
  cp ca/ca.crt "$site/"
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "fedmoe-$site" -f "$site/supernode.key"
  server_cert "$site" runtime "supernode-$i" "DNS:supernode-$i,DNS:localhost,IP:127.0.0.1$extra"
  head -c 32 /dev/urandom > "$site/superexec.secret"
done
chmod 0644 ca/ca.crt ./*/ca.crt ./*/*.pem ./site-*/supernode.key.pub 2>/dev/null || true
echo "credentials for the SuperLink and $sites sites in $out (SAN extras:${extra:- none})"
