#!/usr/bin/env bash
# Generate a private CA and TLS certificates for the clipfed Flower deployment (openssl only;
# ECDSA keys: CA P-384, servers P-256).
#
# Usage: docker/gen-certs.sh [OUT_DIR] [NUM_SUPERNODES]
#   OUT_DIR          where to write (default: deploy/certs)
#   NUM_SUPERNODES   how many SuperNode certificates to issue (default: 3)
#
# Writes
#   ca.crt, ca.key                  the CA (ca.crt goes to every client: SuperNodes, SuperExecs, flwr CLI)
#   superlink.pem, superlink.key    SuperLink (Fleet + Control + Runtime API, port 8000);
#                                   SANs: superlink, localhost, 127.0.0.1
#   supernode-<i>.pem/.key          SuperNode i's Runtime API (port 9094, used by its ClientApp SuperExec);
#                                   SANs: supernode-<i>, localhost, 127.0.0.1
# Existing files are kept (re-run after adding nodes to issue only the new certificates); delete
# OUT_DIR to start over. Extra SANs for the SuperLink (e.g. its public DNS name or IP when SuperNodes
# run on other hosts): SUPERLINK_SANS="DNS:fl.example.org,IP:10.0.0.5" docker/gen-certs.sh
set -euo pipefail

OUT_DIR="${1:-deploy/certs}"
NUM_SUPERNODES="${2:-3}"
DAYS="${CERT_DAYS:-365}"

if ! command -v openssl >/dev/null 2>&1; then
  echo "gen-certs.sh: openssl not found (apt-get install openssl)" >&2
  exit 1
fi
if ! [[ "$NUM_SUPERNODES" =~ ^[0-9]+$ ]]; then
  echo "gen-certs.sh: NUM_SUPERNODES must be a non-negative integer, got '$NUM_SUPERNODES'" >&2
  exit 2
fi

mkdir -p "$OUT_DIR"
cd "$OUT_DIR"

if [[ ! -f ca.crt || ! -f ca.key ]]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-384 -sha384 -nodes -days "$DAYS" \
    -keyout ca.key -out ca.crt -subj "/CN=clipfed-flower-ca" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    2>/dev/null
  echo "gen-certs.sh: wrote CA $OUT_DIR/ca.crt"
fi

# issue NAME SANS: a server certificate NAME.pem/NAME.key signed by the CA
issue() {
  local name="$1" sans="$2"
  if [[ -f "$name.pem" && -f "$name.key" ]]; then
    return
  fi
  local ext
  ext="$(mktemp)"
  printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=%s\n' \
    "$sans" >"$ext"
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -sha256 -nodes -keyout "$name.key" -out "$name.csr" \
    -subj "/CN=$name" 2>/dev/null
  openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days "$DAYS" -sha256 \
    -extfile "$ext" -out "$name.pem" 2>/dev/null
  rm -f "$name.csr" "$ext"
  echo "gen-certs.sh: wrote $OUT_DIR/$name.pem ($sans)"
}

issue superlink "DNS:superlink,DNS:localhost,IP:127.0.0.1${SUPERLINK_SANS:+,$SUPERLINK_SANS}"
for ((i = 0; i < NUM_SUPERNODES; i++)); do
  issue "supernode-$i" "DNS:supernode-$i,DNS:localhost,IP:127.0.0.1"
done
chmod 600 ./*.key
chmod 644 ./*.crt ./*.pem
