"""Keys, tokens and kubeconfigs for the one-machine cluster, generated once per state dir with openssl."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

import yaml

from .system import HarnessError, run

SERVICE_IP = "10.96.0.1"


@dataclass(frozen=True)
class Pki:
    root: Path

    @property
    def ca_crt(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def serving_crt(self) -> Path:
        return self.root / "apiserver.crt"

    @property
    def serving_key(self) -> Path:
        return self.root / "apiserver.key"

    @property
    def sa_key(self) -> Path:
        return self.root / "sa.key"

    @property
    def sa_pub(self) -> Path:
        return self.root / "sa.pub"

    @property
    def token_file(self) -> Path:
        return self.root / "tokens.csv"

    def token(self, user: str) -> str:
        for line in self.token_file.read_text().splitlines():
            token, name = line.split(",")[:2]
            if name == user:
                return token
        raise HarnessError(f"no token for {user} in {self.token_file}")


def _openssl(*args: str) -> None:
    out = run(["openssl", *args], check=False)
    if out.returncode != 0:
        raise HarnessError(f"openssl {' '.join(args[:2])} failed: {out.stdout[-800:]}")


def ensure_pki(root: Path, host_ip: str, node_name: str) -> Pki:
    """A CA, an apiserver serving cert (SANs: host IP, loopback, the service IP, kubernetes.default names),
    a service-account key pair and a static token file (admin in system:masters, the kubelet as its node)."""
    pki = Pki(root)
    root.mkdir(parents=True, exist_ok=True)
    marker = root / "sans"
    sans = (f"IP:{host_ip},IP:127.0.0.1,IP:{SERVICE_IP},DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,"
            "DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local")
    if pki.serving_crt.exists() and marker.exists() and marker.read_text() == sans and pki.token_file.exists():
        return pki
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650", "-subj", "/CN=kubetune-test-ca",
             "-keyout", str(pki.ca_key), "-out", str(pki.ca_crt))
    csr = root / "apiserver.csr"
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=kube-apiserver", "-keyout", str(pki.serving_key),
             "-out", str(csr))
    ext = root / "apiserver.ext"
    ext.write_text(f"subjectAltName={sans}\nextendedKeyUsage=serverAuth\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(pki.ca_crt), "-CAkey", str(pki.ca_key), "-CAcreateserial",
             "-days", "3650", "-extfile", str(ext), "-out", str(pki.serving_crt))
    _openssl("genrsa", "-out", str(pki.sa_key), "2048")
    _openssl("rsa", "-in", str(pki.sa_key), "-pubout", "-out", str(pki.sa_pub))
    pki.token_file.write_text(
        f'{secrets.token_hex(16)},admin,admin,"system:masters"\n'
        f'{secrets.token_hex(16)},system:node:{node_name},kubelet,"system:nodes"\n'
    )
    for path in root.iterdir():
        path.chmod(0o600)
    marker.write_text(sans)
    return pki


def write_kubeconfig(path: Path, server: str, ca: Path, token: str, user: str) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kubetune", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "kubetune", "context": {"cluster": "kubetune", "user": user}}],
        "current-context": "kubetune",
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path
