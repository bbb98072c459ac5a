"""Kubernetes: the generated manifests, checked against the Kubernetes schemas, and DNS discovery.

No cluster runs here. The manifests are validated with kubernetes-validate (its
schemas ship inside the package: no network), and the endpoints backend's
``dns://`` discovery, which a headless Service feeds in a cluster, is tested
against a name the test adds to /etc/hosts for several loopback addresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from rollout import EnvPool
from rollout.commands.k8s import TOKEN_DIR, TOKEN_FILE, K8sOptions, files, manifests, render
from tests.conftest import ServerProcess, skip_or_fail

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "k8s"
KUBE_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())


def _by_kind(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {doc["kind"]: doc for doc in docs}


def test_deploy_dir_is_the_generator_output_for_the_defaults() -> None:
    expected = files()
    on_disk = {path.name: path.read_text() for path in DEPLOY.iterdir()}
    assert on_disk == expected, "deploy/k8s is stale: run `rollout fleet k8s-manifest --out deploy/k8s`"
    kustomization = yaml.safe_load(on_disk["kustomization.yaml"])
    assert sorted(kustomization["resources"]) == sorted(name for name in on_disk if name != "kustomization.yaml")


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_manifests_validate_against_the_kubernetes_schemas(version: str) -> None:
    for path in sorted(DEPLOY.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue  # a kustomize file, not a Kubernetes resource
        for doc in yaml.safe_load_all(path.read_text()):
            kubernetes_validate.validate(doc, version, strict=True)
    docs = manifests(K8sOptions(replicas=128, image="registry.example/envfleet:1", token="t0k", max_sessions=64))
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_a_schema_violation_is_caught() -> None:
    deployment = _by_kind(manifests())["Deployment"]
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFs"] = True  # typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kubernetes_validate.latest_version(), strict=True)


def test_pods_are_hardened_probed_and_bounded() -> None:
    docs = _by_kind(manifests())
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["runAsUser"] != 0 and security["runAsNonRoot"] is True
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert set(container["resources"]) == {"requests", "limits"}
    for probe in ("readinessProbe", "livenessProbe"):
        command = container[probe]["exec"]["command"]
        assert "/health" in command[-1] and TOKEN_FILE in command[-1]


def test_the_token_is_a_mounted_file_and_no_secret_is_committed() -> None:
    """No Secret with a known token ships (kubectl apply -k would deploy it); the pod reads it from a file."""
    docs = _by_kind(manifests())
    assert "Secret" not in docs and not (DEPLOY / "secret.yaml").exists()
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert "env" not in container  # not in the environment, which code the server runs could read
    command = container["command"]
    assert command[command.index("--token-file") + 1] == TOKEN_FILE
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == TOKEN_DIR]
    assert mount["readOnly"] is True
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == "envfleet-token"
    with_token = _by_kind(manifests(K8sOptions(token="t0k")))  # asked for: a Secret of that token
    assert with_token["Secret"]["metadata"]["name"] == "envfleet-token"
    assert with_token["Secret"]["stringData"] == {"token": "t0k"}
    assert docs["Service"]["spec"]["clusterIP"] == "None"
    assert docs["Service"]["spec"]["selector"] == docs["Deployment"]["spec"]["selector"]["matchLabels"]
    assert docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == docs["Service"]["spec"]["selector"]
    assert docs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == docs["Deployment"]["metadata"]["name"]


def test_cli_prints_the_manifests(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "rollout.cli", "fleet", "k8s-manifest", "--replicas", "16", "--image", "reg/envfleet:2",
         "--token", "s3cret", "--game", "tic_tac_toe", "--max-sessions", "64"],
        capture_output=True, text=True, check=True, timeout=60,
    )
    docs = list(yaml.safe_load_all(run.stdout))
    opts = K8sOptions(replicas=16, image="reg/envfleet:2", token="s3cret", env_options={"game": "tic_tac_toe"}, max_sessions=64)
    assert docs == manifests(opts)
    assert yaml.safe_load_all(render(docs)) is not None
    kinds = _by_kind(docs)
    assert kinds["Deployment"]["spec"]["replicas"] == 16
    container = kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "reg/envfleet:2"
    assert json.loads(container["command"][container["command"].index("--env-options") + 1]) == {"game": "tic_tac_toe"}
    assert kinds["Secret"]["stringData"]["token"] == "s3cret"
    subprocess.run(
        [sys.executable, "-m", "rollout.cli", "fleet", "k8s-manifest", "--out", str(tmp_path)],
        capture_output=True, check=True, timeout=60,
    )
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == files()


# -- DNS discovery through a name with several addresses (what a headless Service gives)

NAME = "envfleet-test-svc"


@contextlib.contextmanager
def _hosts_entries(entries: list[str]) -> Iterator[Any]:
    """Append ``addr NAME`` lines to /etc/hosts; the yielded function swaps them; restore the file exactly."""
    hosts = Path("/etc/hosts")
    if not os.access(hosts, os.W_OK):
        skip_or_fail("/etc/hosts is not writable here")
    original = hosts.read_bytes()
    base = original if original.endswith(b"\n") or not original else original + b"\n"

    def point_to(addresses: list[str]) -> None:
        hosts.write_bytes(base + "".join(f"{a} {NAME}\n" for a in addresses).encode())

    try:
        point_to(entries)
        yield point_to
    finally:
        hosts.write_bytes(original)  # in place: /etc/hosts may be a bind mount
    assert hosts.read_bytes() == original


def _free_port(*hosts: str) -> int:
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((hosts[0], 0))
            port = probe.getsockname()[1]
        try:
            for host in hosts[1:]:
                with socket.socket() as other:
                    other.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no port free on every address")


def _server(host: str, port: int) -> ServerProcess:
    return ServerProcess(("--host", host, "--port", str(port), "--game", "catch")).wait_ready()


async def test_endpoints_backend_discovers_every_address_and_re_resolves() -> None:
    port = _free_port("127.0.0.2", "127.0.0.3", "127.0.0.4")
    servers: list[ServerProcess] = []
    with _hosts_entries(["127.0.0.2", "127.0.0.3"]) as point_to:
        try:
            servers += [_server("127.0.0.2", port), _server("127.0.0.3", port)]
            async with EnvPool(n=6, game="catch", backend="endpoints", endpoints=(f"dns://{NAME}:{port}",)) as pool:
                assert sorted(pool.servers) == [f"http://127.0.0.2:{port}", f"http://127.0.0.3:{port}"]
                first = [(r.episode, r.reward, r.length) async for r in pool.run(lambda o: o.legal_actions[1], 30, seed=3)]
                assert sorted(r[0] for r in first) == list(range(30))

                # The pod at .3 goes; the Service now names .2 and a new pod at .4.
                async def move() -> None:
                    servers[1].proc.send_signal(signal.SIGKILL)
                    point_to(["127.0.0.2", "127.0.0.4"])
                    servers.append(await asyncio.to_thread(_server, "127.0.0.4", port))

                records = []
                async for record in pool.run(lambda o: o.legal_actions[1], 120, seed=3):
                    records.append((record.episode, record.reward, record.length))
                    if len(records) == 10:
                        await move()
                assert sorted(r[0] for r in records) == list(range(120)), "an episode was lost or repeated"
                assert sorted(records)[:30] == sorted(first)
                for _ in range(100):
                    if f"http://127.0.0.4:{port}" in pool.servers:
                        break
                    await asyncio.sleep(0.1)
                assert sorted(pool.servers) == [f"http://127.0.0.2:{port}", f"http://127.0.0.4:{port}"]
                assert [old for old, _, _ in pool.replacements_log] == [f"http://127.0.0.3:{port}"]
        finally:
            for server in servers:
                server.stop()


@pytest.mark.docker
async def test_the_probe_command_works_in_the_image(tmp_path: Path) -> None:
    """The exec probe of the Deployment passes with the pod's token and fails without it."""
    import aiodocker

    from .docker_support import IMAGE, require_docker

    await require_docker()
    container_spec = _by_kind(manifests())["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    probe = container_spec["readinessProbe"]["exec"]["command"]
    secret_dir = tmp_path / "secret"  # stands in for the mounted Secret
    secret_dir.mkdir()
    secret_dir.chmod(0o755)
    (secret_dir / "token").write_text("pod-token\n")
    (secret_dir / "token").chmod(0o444)
    config = {
        "Image": IMAGE,
        "Cmd": container_spec["command"],
        "User": "65534:65534",
        "Labels": {"envfleet.test": "k8s-probe"},
        "HostConfig": {"ReadonlyRootfs": True, "Tmpfs": {"/tmp": "size=64m"}, "CapDrop": ["ALL"],
                       "SecurityOpt": ["no-new-privileges"], "NetworkMode": "none",
                       "Binds": [f"{secret_dir}:{TOKEN_DIR}:ro"]},
    }

    async def exit_code(container: Any) -> int:
        run = await container.exec(probe)
        async with run.start(detach=False) as stream:
            while await stream.read_out() is not None:
                pass
        return int((await run.inspect())["ExitCode"])

    async with aiodocker.Docker() as docker:
        container = await docker.containers.run(config, name=f"envfleet-k8s-probe-{os.getpid()}")
        try:
            for _ in range(150):  # the server is up in ~1 s; the probe fails until then
                if await exit_code(container) == 0:
                    break
                await asyncio.sleep(0.2)
            else:
                pytest.fail("the probe never passed against a healthy server")
            (secret_dir / "token").write_text("wrong\n")  # the server keeps the token it read at start
            assert await exit_code(container) != 0
        finally:
            await container.delete(force=True)
