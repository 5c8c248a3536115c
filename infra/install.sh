#!/usr/bin/env bash
# Install what the cluster needs besides the project (docs/deploy.md walks through it):
# KubeRay's CRDs (server-side) and operator (Helm, pinned), then Redis + MinIO (infra/k8s).
# Secrets are not created here: see docs/deploy.md ("Secrets").
set -euo pipefail
cd "$(dirname "$0")"
KUBERAY_VERSION=1.7.0

kubectl create namespace kuberay-system --dry-run=client -o yaml | kubectl apply -f -
# Server-side: the CRDs are too large for the last-applied annotation of client-side apply.
kubectl apply --server-side --force-conflicts \
  -k "github.com/ray-project/kuberay/ray-operator/config/crd?ref=v${KUBERAY_VERSION}"
helm repo add kuberay https://ray-project.github.io/kuberay-helm/ >/dev/null
helm repo update kuberay >/dev/null
helm upgrade --install kuberay-operator kuberay/kuberay-operator --version "${KUBERAY_VERSION}" \
  --namespace kuberay-system --skip-crds --values kuberay/values.yaml --wait

kubectl apply -k k8s
