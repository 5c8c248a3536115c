"""The Dockerfile, linted statically (no Docker here): pinned base, the lock, every package copied,
a numeric non-root user, exec-form commands, and a build context that carries no data or secrets."""

from __future__ import annotations

import fnmatch
import re
import tomllib

import yaml

from tests.deploy.conftest import ROOT


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def _ignored(path: str) -> bool:
    """.dockerignore semantics for the patterns used: later lines win, `!` re-includes."""
    ignored = False
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate, pattern = pattern.startswith("!"), pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/") or \
                fnmatch.fnmatch(path, pattern.replace("**/", "*/")):
            ignored = not negate
    return ignored


def test_base_image_pinned_and_user_not_root():
    steps = _instructions()
    froms = [arg for op, arg in steps if op == "FROM"]
    assert froms and all(re.search(r":[\w.-]+", f) and "latest" not in f for f in froms)
    users = [arg for op, arg in steps if op == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*(:[1-9]\d*)?", users[-1])  # numeric: runAsNonRoot can verify it
    assert [op for op, _ in steps].index("USER") > max(i for i, (op, _) in enumerate(steps) if op == "RUN")
    assert not [arg for op, arg in steps if op == "ADD"]
    for op in ("ENTRYPOINT", "CMD"):
        assert all(arg.startswith("[") for o, arg in steps if o == op)


def test_dependencies_from_the_lock_only():
    runs = " ".join(arg for op, arg in _instructions() if op == "RUN")
    assert "pip install -r requirements.runtime.lock" in runs
    assert re.findall(r"pip install (?!-r|--index-url)", runs) == []
    assert "rm -rf /var/lib/apt/lists/*" in runs and "--no-install-recommends" in runs


def test_every_package_copied_and_context_lean():
    copies = [arg.split() for op, arg in _instructions() if op == "COPY"]
    sources = {src for parts in copies for src in parts[:-1] if not src.startswith("--")}
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    runtime = {p.rstrip("*") for p in packages["include"]} - {"bench"}
    assert runtime <= sources
    for src in sources:
        assert (ROOT / src).exists(), src
        assert not _ignored(src), f"{src} is excluded by .dockerignore"
    for path in ("data", ".venv", "tests", ".git", "bench", "k8s", "serving/__pycache__/x.pyc"):
        assert _ignored(path), path


def test_one_dockerfile_two_torch_builds():
    """TORCH_FLAVOR selects torch's build: the CPU wheel from PyTorch's CPU index, the CUDA wheel from PyPI;
    anything else fails the build instead of silently picking one."""
    steps = _instructions()
    args = [arg for op, arg in steps if op == "ARG"]
    assert "TORCH_FLAVOR=cpu" in args
    runs = " ".join(arg for op, arg in steps if op == "RUN")
    assert "cpu) TORCH_INDEX=https://download.pytorch.org/whl/cpu" in runs
    assert "cuda) TORCH_INDEX=https://pypi.org/simple" in runs
    assert 'pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"' in runs
    assert "exit 1" in runs


def test_base_image_patched_and_pinned_by_digest():
    """Python 3.11.14 or later (3.11.7 predates published CVE fixes), by digest: a tag moves when Docker rebuilds
    it, a digest never does. The pipeline's control image has the same base."""
    digest = r"sha256:[0-9a-f]{64}"
    for dockerfile in ("Dockerfile", "k8s/pipeline/Dockerfile"):
        text = (ROOT / dockerfile).read_text()
        froms = re.findall(r"^FROM (.+)$", text, re.MULTILINE)
        assert froms, dockerfile
        for ref in froms:
            found = re.fullmatch(rf"python:3\.11\.(\d+)-slim-bookworm@{digest}( AS \w+)?", ref)
            assert found and int(found.group(1)) >= 14, (dockerfile, ref)
    assert "docker buildx imagetools inspect python:3.11.14-slim-bookworm" in (ROOT / "Dockerfile").read_text()


def test_no_test_or_lint_tools_in_the_image():
    """The image installs requirements.runtime.lock: requirements.lock's pins for the runtime closure only
    (infra/runtime_lock.py), regenerated whenever the lock changes."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("runtime_lock", ROOT / "infra" / "runtime_lock.py")
    runtime_lock = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runtime_lock)
    runtime = (ROOT / "requirements.runtime.lock").read_text()
    assert runtime == runtime_lock.render(), "stale: run python infra/runtime_lock.py"
    pins = [line for line in runtime.splitlines() if line and not line.startswith("#")]
    full = set((ROOT / "requirements.lock").read_text().splitlines())
    assert pins and set(pins) <= full  # the exact versions CI tests
    names = {line.split("==")[0].lower() for line in pins}
    assert not names & {"pytest", "pytest-timeout", "ruff", "mypy", "hypothesis", "moto", "schemathesis"}
    assert {"torch", "ray", "deltalake", "feast", "kubernetes", "boto3"} <= names
    instructions = " ".join(arg for _, arg in _instructions())
    assert "requirements.lock" not in instructions.replace("requirements.runtime.lock", "")
    assert not re.search(r"\b(pytest|ruff|mypy)\b", instructions)


def test_writable_home_for_the_non_root_user():
    """uid 1000 owns /data, its HOME (Ray's ~/.ray, torch and Feast caches); TMPDIR is /tmp. The manifests
    mount emptyDirs on both (tests/deploy/test_kuberay_rules.py), so the root filesystem may be read-only."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    assert re.search(r"HOME=/data\b", text) and re.search(r"TMPDIR=/tmp\b", text)
    assert "--home-dir /data" in text and "chown 1000:1000 /data" in text


def test_the_image_compiles_the_data_docs_templates_where_the_cluster_profiles_read_them():
    """Every pod starts from the image (HOME is an emptyDir): the templates must be compiled into it, readable by
    uid 1000, at the folder the cluster profiles name (`ingest.gx_template_cache`)."""
    runs = [arg for op, arg in _instructions() if op == "RUN"]
    compiled = [m.group(1) for arg in runs if (m := re.search(r"--compile-templates (\S+)", arg))]
    assert len(compiled) == 1 and any(f"chmod -R a+rX {compiled[0].rsplit('/', 1)[0]}" in arg for arg in runs)
    for profile in ("k8s/base/profile.yaml", "k8s/overlays/prod/profile.yaml", "config/profiles/cluster.yaml"):
        assert yaml.safe_load((ROOT / profile).read_text())["ingest"]["gx_template_cache"] == compiled[0], profile
