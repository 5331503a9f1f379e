#!/usr/bin/env bash
# Generate SuperNode authentication key pairs (ECDSA P-384, OpenSSH format) for Flower 1.42.
#
# Usage: docker/gen-supernode-keys.sh [OUT_DIR] [NUM_SUPERNODES]
#   OUT_DIR          where to write (default: deploy/keys)
#   NUM_SUPERNODES   how many key pairs (default: 3)
#
# Writes supernode-<i> (private key: `flower-supernode --auth-supernode-private-key`) and
# supernode-<i>.pub (public key: `flwr supernode register supernode-<i>.pub <connection>`, once,
# against a SuperLink started with `--enable-supernode-auth`, which requires TLS).
# Flower 1.42 loads the private key with cryptography's load_ssh_private_key (unencrypted) and the
# public key with load_ssh_public_key; it must be an EC key on a NIST curve. Existing keys are kept.
# Uses ssh-keygen when present, else Python's `cryptography` package (a Flower dependency).
set -euo pipefail

OUT_DIR="${1:-deploy/keys}"
NUM_SUPERNODES="${2:-3}"
PYTHON="${PYTHON:-python3}"

if ! [[ "$NUM_SUPERNODES" =~ ^[0-9]+$ ]]; then
  echo "gen-supernode-keys.sh: NUM_SUPERNODES must be a non-negative integer, got '$NUM_SUPERNODES'" >&2
  exit 2
fi
mkdir -p "$OUT_DIR"

for ((i = 0; i < NUM_SUPERNODES; i++)); do
  key="$OUT_DIR/supernode-$i"
  if [[ -f "$key" && -f "$key.pub" ]]; then
    continue
  fi
  if command -v ssh-keygen >/dev/null 2>&1; then
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "clipfed-supernode-$i" -f "$key" <<<y >/dev/null
  else
    "$PYTHON" - "$key" <<'PY'
import os
import sys

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

path = sys.argv[1]
key = ec.generate_private_key(ec.SECP384R1())
private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                            serialization.NoEncryption())
public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
with os.fdopen(fd, "wb") as f:
    f.write(private)
with open(path + ".pub", "wb") as f:
    f.write(public + b"\n")
PY
  fi
  chmod 600 "$key"
  chmod 644 "$key.pub"
  echo "gen-supernode-keys.sh: wrote $key and $key.pub"
done
