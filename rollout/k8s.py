"""Kubernetes manifests for a fleet of envservers: ``rollout fleet k8s-manifest``.

A Deployment of hardened envserver pods, a headless Service (its DNS name
resolves to one address per ready pod, which the ``endpoints`` backend uses as
``dns://<name>.<namespace>.svc:8000``), a PodDisruptionBudget, an example
HorizontalPodAutoscaler, and the Secret holding the bearer token only when a token
is given: the defaults in ``deploy/k8s/`` (``write(...)`` of them; a test keeps them
in step) carry no Secret, so ``kubectl apply -k`` cannot deploy a known token. Create
it first: ``kubectl create secret generic envfleet-token --from-literal=token=...``.

The token reaches the server as a file (the Secret mounted read-only under
``/run/secrets/envfleet``, read with ``--token-file``), not as an environment
variable that code the server runs could read. Kubernetes HTTP probes cannot take
a header from a Secret, so the probes exec a tiny stdlib-only Python check that
sends the token from that file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import msgspec

from .config import FleetConfig

__all__ = ["K8sOptions", "files", "manifests", "render", "write"]

PORT = 8000
TOKEN_DIR = "/run/secrets/envfleet"  # where the Secret is mounted
TOKEN_FILE = f"{TOKEN_DIR}/token"
_PROBE = (
    "import urllib.request as u; "
    f"u.urlopen(u.Request('http://127.0.0.1:{PORT}/health', "
    f"headers={{'Authorization': 'Bearer ' + open('{TOKEN_FILE}').read().strip()}}), timeout=2)"
)


class K8sOptions(msgspec.Struct, frozen=True, kw_only=True):
    """What the manifests vary in."""

    name: str = "envfleet"
    replicas: int = 2
    image: str = "envfleet:latest"
    token: str | None = None  # None: no Secret in the manifests; create it with kubectl (see the README)
    env: str = "openspiel"
    env_options: dict[str, Any] = msgspec.field(default_factory=lambda: {"game": "catch"})
    max_sessions: int | None = None
    cpu_request: str = "500m"
    cpu_limit: str = "1"
    memory_request: str = "128Mi"
    memory_limit: str = "512Mi"
    max_replicas: int | None = None  # HPA ceiling; None: 4 x replicas


def _labels(opts: K8sOptions) -> dict[str, str]:
    return {"app.kubernetes.io/name": opts.name, "app.kubernetes.io/component": "envserver"}


def _meta(opts: K8sOptions, name: str) -> dict[str, Any]:
    return {"name": name, "labels": {**_labels(opts), "app.kubernetes.io/part-of": "envfleet"}}


def _secret_name(opts: K8sOptions) -> str:
    return f"{opts.name}-token"


def _deployment(opts: K8sOptions) -> dict[str, Any]:
    args = FleetConfig(env=opts.env, env_options=opts.env_options, max_sessions=opts.max_sessions).server_args()
    probe = {"exec": {"command": ["python", "-c", _PROBE]}, "timeoutSeconds": 3}
    seccomp = {"type": "RuntimeDefault"}
    container = {
        "name": "envserver",
        "image": opts.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["envserver", "--host", "0.0.0.0", "--port", str(PORT), "--token-file", TOKEN_FILE, *args],
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        "resources": {
            "requests": {"cpu": opts.cpu_request, "memory": opts.memory_request},
            "limits": {"cpu": opts.cpu_limit, "memory": opts.memory_limit},
        },
        "readinessProbe": {**probe, "periodSeconds": 5, "failureThreshold": 2},
        "livenessProbe": {**probe, "initialDelaySeconds": 10, "periodSeconds": 10, "failureThreshold": 3},
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 65534,
            "runAsGroup": 65534,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "privileged": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": seccomp,
        },
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}, {"name": "token", "mountPath": TOKEN_DIR, "readOnly": True}],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(opts, opts.name),
        "spec": {
            "replicas": opts.replicas,
            "selector": {"matchLabels": _labels(opts)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 1}},
            "template": {
                "metadata": {"labels": _labels(opts)},
                "spec": {
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "terminationGracePeriodSeconds": 10,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": 65534,
                        "runAsGroup": 65534,
                        "fsGroup": 65534,  # the token file is root:65534, mode 0440
                        "seccompProfile": seccomp,
                    },
                    "containers": [container],
                    "volumes": [
                        {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}},
                        {"name": "token", "secret": {"secretName": _secret_name(opts), "defaultMode": 0o440}},
                    ],
                },
            },
        },
    }


def _service(opts: K8sOptions) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(opts, opts.name),
        "spec": {
            "clusterIP": "None",  # headless: the name resolves to every ready pod
            "selector": _labels(opts),
            "ports": [{"name": "http", "port": PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def _pdb(opts: K8sOptions) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(opts, opts.name),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": _labels(opts)}},
    }


def _hpa(opts: K8sOptions) -> dict[str, Any]:
    ceiling = opts.max_replicas if opts.max_replicas is not None else 4 * opts.replicas
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _meta(opts, opts.name),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": opts.name},
            "minReplicas": opts.replicas,
            "maxReplicas": max(ceiling, opts.replicas),
            "metrics": [
                {"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}}
            ],
        },
    }


def _secret(opts: K8sOptions) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(opts, _secret_name(opts)),
        "type": "Opaque",
        "stringData": {"token": opts.token},
    }


_PARTS = {
    "deployment.yaml": _deployment,
    "service.yaml": _service,
    "pdb.yaml": _pdb,
    "hpa.yaml": _hpa,
}


def _parts(opts: K8sOptions) -> dict[str, Any]:
    """File name -> maker of each manifest; the Secret only when the options hold a token."""
    return {"secret.yaml": _secret, **_PARTS} if opts.token else dict(_PARTS)


def manifests(opts: K8sOptions | None = None) -> list[dict[str, Any]]:
    """The Deployment, headless Service, PodDisruptionBudget and HPA (and the Secret, given a token), as dicts."""
    opts = opts or K8sOptions()
    if opts.replicas < 1:
        raise ValueError("replicas must be at least 1")
    return [make(opts) for make in _parts(opts).values()]


# -- a small YAML writer (block style; strings quoted whenever plain style could misread them)

_PLAIN = re.compile(r"[A-Za-z_/][A-Za-z0-9_./@-]*")
_RESERVED = {"true", "false", "yes", "no", "on", "off", "y", "n", "null", "~"}


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return json.dumps(value)
    text = str(value)
    if _PLAIN.fullmatch(text) and text.lower() not in _RESERVED:
        return text
    return json.dumps(text)  # a JSON string is a valid double-quoted YAML scalar


def _yaml(value: Any, indent: int = 0) -> list[str]:
    pad = " " * indent
    lines: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, (dict, list)) and item:
                lines.append(f"{pad}{_scalar(key)}:")
                lines += _yaml(item, indent + (2 if isinstance(item, dict) else 0))
            else:
                lines.append(f"{pad}{_scalar(key)}: {_empty(item)}")
    else:
        for item in value:
            if isinstance(item, (dict, list)) and item:
                inner = _yaml(item, indent + 2)
                lines.append(f"{pad}- {inner[0].lstrip()}")
                lines += inner[1:]
            else:
                lines.append(f"{pad}- {_empty(item)}")
    return lines


def _empty(item: Any) -> str:
    if isinstance(item, dict):
        return "{}"
    if isinstance(item, list):
        return "[]"
    return _scalar(item)


def render(docs: list[dict[str, Any]]) -> str:
    """The documents as one multi-document YAML stream."""
    return "".join("---\n" + "\n".join(_yaml(doc)) + "\n" for doc in docs)


def files(opts: K8sOptions | None = None) -> dict[str, str]:
    """File name -> YAML text of each manifest, plus a ``kustomization.yaml`` listing them."""
    opts = opts or K8sOptions()
    header = "# Generated by `rollout fleet k8s-manifest --out DIR`; edit the generator (rollout/k8s.py), not this file.\n"
    parts = _parts(opts)
    out = {name: header + render([make(opts)]) for name, make in parts.items()}
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": list(parts),
    }
    out["kustomization.yaml"] = header + render([kustomization])
    return out


def write(directory: str | Path, opts: K8sOptions | None = None) -> list[Path]:
    """Write ``files(opts)`` into ``directory``; return the paths written."""
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in files(opts).items():
        path = target / name
        path.write_text(text)
        written.append(path)
    return written
