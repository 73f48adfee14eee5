#!/usr/bin/env bash
# Make a throw-away CA and a PS certificate for TLS tests and trials (needs openssl).
#   scripts/make_test_certs.sh DIR [HOST]    HOST: the PS address workers use (default 127.0.0.1)
# Writes DIR/ca.pem (give to workers as server.tls.ca), DIR/server.pem and DIR/server.key
# (server.tls.cert / server.tls.key on the PS). Not for production: the CA key is left in DIR.
set -euo pipefail
DIR=${1:?usage: make_test_certs.sh DIR [HOST]}
HOST=${2:-127.0.0.1}
command -v openssl >/dev/null || { echo "make_test_certs: openssl not found (apt-get install openssl)" >&2; exit 1; }
mkdir -p "$DIR"
if [[ $HOST =~ ^[0-9.]+$ || $HOST == *:* ]]; then SAN="IP:$HOST"; else SAN="DNS:$HOST"; fi
openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=byzps test CA" \
  -keyout "$DIR/ca.key" -out "$DIR/ca.pem" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=$HOST" -keyout "$DIR/server.key" \
  -out "$DIR/server.csr" 2>/dev/null
printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
  "$SAN" > "$DIR/server.ext"
openssl x509 -req -in "$DIR/server.csr" -CA "$DIR/ca.pem" -CAkey "$DIR/ca.key" \
  -CAcreateserial -days 30 -extfile "$DIR/server.ext" -out "$DIR/server.pem" 2>/dev/null
chmod 600 "$DIR/server.key" "$DIR/ca.key"
rm -f "$DIR/server.csr" "$DIR/server.ext"
echo "wrote $DIR/ca.pem, $DIR/server.pem, $DIR/server.key for $SAN"
