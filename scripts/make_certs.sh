#!/usr/bin/env bash
# Make a private CA and a TLS certificate for the SuperLink, plus ECDSA keys for SuperNode auth.
#
#   scripts/make_certs.sh OUT_DIR [SERVER_NAMES] [NUM_NODE_KEYS]
#
# SERVER_NAMES: comma-separated DNS names / IPs the SuperLink is reached at
#               (default "localhost,127.0.0.1"); they go into the certificate's subjectAltName.
# NUM_NODE_KEYS: how many SuperNode key pairs to make (default 0): OUT_DIR/node-<i>{,.pub}.
# Output: ca.crt ca.key server.crt server.key (+ node keys). Keep ca.key and node-*.key private;
# hand ca.crt to every hospital (SuperNode --root-certificates) and to the `flwr` connection.
set -euo pipefail

if [[ $# -lt 1 || $# -gt 3 ]]; then
    echo "usage: $0 OUT_DIR [SERVER_NAMES] [NUM_NODE_KEYS]" >&2
    exit 2
fi
out=$1
names=${2:-localhost,127.0.0.1}
nkeys=${3:-0}
if ! [[ $nkeys =~ ^[0-9]+$ ]]; then
    echo "NUM_NODE_KEYS must be a non-negative integer, got '$nkeys'" >&2
    exit 2
fi
command -v openssl >/dev/null || { echo "openssl not found on PATH" >&2; exit 3; }
mkdir -p "$out"
umask 077

san=""
IFS=',' read -ra parts <<<"$names"
for n in "${parts[@]}"; do
    [[ -z $n ]] && continue
    if [[ $n =~ ^[0-9.]+$ || $n == *:* ]]; then san+="IP:$n,"; else san+="DNS:$n,"; fi
done
san=${san%,}
[[ -n $san ]] || { echo "SERVER_NAMES is empty" >&2; exit 2; }

# CA (10 years), then the SuperLink key + certificate signed by it (1 year), with SANs because
# gRPC checks the name the SuperNode dialled against subjectAltName, not the CN.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-384 -sha384 -days 3650 -nodes \
    -keyout "$out/ca.key" -out "$out/ca.crt" -subj "/CN=KidneyScan federation CA" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-384 -sha384 -nodes \
    -keyout "$out/server.key" -out "$out/server.csr" -subj "/CN=${parts[0]}" 2>/dev/null
printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
    "$san" >"$out/server.ext"
openssl x509 -req -in "$out/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" \
    -CAcreateserial -out "$out/server.crt" -days 365 -sha384 -extfile "$out/server.ext" 2>/dev/null
rm -f "$out/server.csr" "$out/server.ext" "$out/ca.srl"
chmod 644 "$out/ca.crt" "$out/server.crt"

if ((nkeys > 0)); then
    command -v ssh-keygen >/dev/null || { echo "ssh-keygen not found on PATH" >&2; exit 3; }
    for ((i = 0; i < nkeys; i++)); do
        rm -f "$out/node-$i" "$out/node-$i.pub"
        ssh-keygen -q -t ecdsa -b 384 -N "" -C "kidneyscan-node-$i" -f "$out/node-$i"
    done
fi
openssl verify -CAfile "$out/ca.crt" "$out/server.crt" >/dev/null
echo "wrote CA, SuperLink certificate ($san) and $nkeys SuperNode key pair(s) to $out"
