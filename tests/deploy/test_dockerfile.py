"""The Dockerfile, linted statically (no Docker here): pinned base, the lock, every package copied,
a numeric non-root user, exec-form commands, and a build context that carries no data or secrets."""

from __future__ import annotations

import fnmatch
import re
import tomllib

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
    assert "pip install -r requirements.lock" in runs
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
