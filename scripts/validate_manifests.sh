#!/usr/bin/env bash
# Validate deploy/kubernetes offline, without a cluster:
#   1. core manifests against the Kubernetes OpenAPI schemas (kubernetes-validate --strict);
#   2. KEDA's ScaledObject and TriggerAuthentication against the vendored CRDs (scripts/validate_crd.py);
#   3. agreement with the binary's source and the Dockerfile (scripts/manifest_agreement.py);
#   4. the kustomization builds (kubectl kustomize; skipped without kubectl).
# Needs python3 with venv; the first run creates target/manifest-venv (pip, PyPI), later runs reuse it.
# K8S_VERSION=1.36 scripts/validate_manifests.sh checks against another Kubernetes version (1.25-1.37).
# Exits non-zero on any failure. Never runs cargo.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DIR=deploy/kubernetes
K8S_VERSION=${K8S_VERSION:-1.33}
VENV=target/manifest-venv
REQUIREMENTS="kubernetes-validate==1.37.0 jsonschema==4.26.0 PyYAML==6.0.4"

if [[ "$(cat "$VENV/.requirements" 2>/dev/null)" != "$REQUIREMENTS" ]]; then
    echo "== creating $VENV ($REQUIREMENTS)"
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    # shellcheck disable=SC2086 # word splitting of the requirement list is intended
    "$VENV/bin/pip" install --quiet --disable-pip-version-check $REQUIREMENTS
    echo "$REQUIREMENTS" > "$VENV/.requirements"
fi
PY="$VENV/bin/python"

core=() custom=()
for f in "$DIR"/*.yaml; do
    api=$(sed -n 's/^apiVersion:[[:space:]]*//p' "$f" | head -n1)
    case "$api" in
        keda.sh/*) custom+=("$f") ;;
        kustomize.config.k8s.io/*) ;; # checked by manifest_agreement.py and step 4
        "") echo "FAIL $f: no top-level apiVersion"; exit 1 ;;
        *) core+=("$f") ;;
    esac
done

status=0
echo "== Kubernetes $K8S_VERSION schemas (strict: unknown fields rejected)"
"$VENV/bin/kubernetes-validate" --strict --kubernetes-version "$K8S_VERSION" "${core[@]}" || status=1

echo "== KEDA CRD schemas (deploy/kubernetes/schemas)"
"$PY" scripts/validate_crd.py \
    --crd "$DIR/schemas/keda.sh_scaledobjects.yaml" \
    --crd "$DIR/schemas/keda.sh_triggerauthentications.yaml" \
    "${custom[@]}" || status=1

echo "== agreement with src/, the Dockerfile and each other"
"$PY" scripts/manifest_agreement.py || status=1

echo "== kustomize build"
if command -v kubectl >/dev/null; then
    if objects=$(kubectl kustomize "$DIR" | grep -c '^kind:'); then
        echo "ok   $DIR/kustomization.yaml builds: $objects objects"
    else
        echo "FAIL $DIR/kustomization.yaml does not build"; status=1
    fi
else
    echo "skip kubectl not installed"
fi

if [[ $status -ne 0 ]]; then
    echo "manifests: FAILED"
    exit 1
fi
echo "manifests: all checks passed"
