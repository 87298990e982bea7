"""Static checks of the images and the e2e harness (no Docker engine, no cluster here).

The Dockerfiles are parsed into instructions; the worker image's requirement filter is run
for real against pyproject.toml, and e2e/run.sh and e2e/test_e2e.py are run far enough to
prove they refuse to start, with a clear message, when their tools are missing.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml
from packaging_support import EXAMPLES_DIR, REPO, load_yaml

OPERATOR_DOCKERFILE = REPO / "operator" / "Dockerfile"
WORKER_DOCKERFILE = REPO / "worker" / "Dockerfile"
E2E_DOCKERFILE = REPO / "e2e" / "Dockerfile"
RUN_SH = REPO / "e2e" / "run.sh"


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def _all(path: Path, keyword: str) -> list[str]:
    return [rest for kw, rest in instructions(path) if kw == keyword]


def _final_stage(path: Path) -> list[tuple[str, str]]:
    steps = instructions(path)
    last_from = max(i for i, (kw, _) in enumerate(steps) if kw == "FROM")
    return steps[last_from:]


def _runs_as_non_root(path: Path) -> bool:
    users = [rest for kw, rest in _final_stage(path) if kw == "USER"]
    return bool(users) and users[-1].split(":")[0] not in {"0", "root"}


def test_operator_image_is_slim_python_without_torch() -> None:
    args = " ".join(_all(OPERATOR_DOCKERFILE, "ARG"))
    assert "PYTHON_IMAGE=python:3.11-slim" in args
    runs = " ".join(_all(OPERATOR_DOCKERFILE, "RUN"))
    assert "pip install -c constraints.txt '.[operator]'" in runs
    installs = re.findall(r"pip install[^&;]*", runs)
    assert installs and not any("worker" in i or "torch" in i for i in installs), installs
    assert "pip show torch" in runs  # the build fails if torch sneaks in as a dependency


def test_operator_image_runs_the_operator_as_non_root() -> None:
    assert _runs_as_non_root(OPERATOR_DOCKERFILE)
    assert json.loads(_all(OPERATOR_DOCKERFILE, "ENTRYPOINT")[-1]) == ["diffcascade", "operator"]


def test_worker_image_keeps_the_base_images_cuda_torch() -> None:
    base = [a for a in _all(WORKER_DOCKERFILE, "ARG") if a.startswith("BASE_IMAGE=")]
    assert base and re.match(
        r"BASE_IMAGE=pytorch/pytorch:2\.\d+\.\d+-cuda12\.\d+-cudnn9-runtime@sha256:[0-9a-f]{64}$",
        base[0],
    )
    runs = " ".join(_all(WORKER_DOCKERFILE, "RUN"))
    assert "grep -v -i '^torch==' constraints.txt" in runs
    assert "pip install --no-deps ." in runs
    assert "torch.version.cuda" in runs


def test_worker_requirement_filter_drops_only_torch() -> None:
    runs = " ".join(_all(WORKER_DOCKERFILE, "RUN"))
    match = re.search(r'python -c "(import tomllib[^"]*)"', runs)
    assert match is not None
    result = subprocess.run(
        [sys.executable, "-c", match.group(1)], cwd=REPO, capture_output=True, text=True, check=True
    )
    requirements = result.stdout.split()
    assert not any(r.lower().startswith("torch") for r in requirements)
    assert any(r.startswith("diffusers") for r in requirements)
    assert any(r.startswith("pydantic") for r in requirements)  # the base dependencies too
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"torch==' in pyproject  # the reason for the filter; drop it when this changes


def test_worker_image_serves_on_port_8000_as_non_root() -> None:
    assert _all(WORKER_DOCKERFILE, "EXPOSE") == ["8000"]
    assert _runs_as_non_root(WORKER_DOCKERFILE)
    entrypoint = json.loads(_all(WORKER_DOCKERFILE, "ENTRYPOINT")[-1])
    assert entrypoint == ["diffcascade-worker", "serve"]
    assert _all(WORKER_DOCKERFILE, "WORKDIR")[-1] == "/app"


def test_dockerignore_keeps_the_context_small() -> None:
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".git", ".venv", ".models", "tests"} <= ignored
    assert not {"operator", "worker", "pyproject.toml", "constraints.txt", "README.md"} & ignored


def test_e2e_images_put_the_tiny_models_where_the_example_points() -> None:
    doc = load_yaml(EXAMPLES_DIR / "tiny-cpu.yaml")
    light = doc["spec"]["variants"][0]
    curve = light["gate"]["deferCurve"]["path"]
    text = E2E_DOCKERFILE.read_text()
    assert "make_tiny_model" in text
    copy = [c for c in _all(E2E_DOCKERFILE, "COPY") if "defer_curve.json" in c]
    assert copy and copy[0].split()[-1] == f"/app/{curve}"
    assert "Path('.models') / f'tiny-{kind}'" in text
    assert light["model"] == ".models/tiny-light"


def test_e2e_script_is_valid_bash() -> None:
    assert os.access(RUN_SH, os.X_OK)
    subprocess.run(["bash", "-n", str(RUN_SH)], check=True)


def test_e2e_script_refuses_to_start_without_its_tools(tmp_path: Path) -> None:
    # A PATH holding only `dirname`: the script must stop at its first check.
    dirname = subprocess.run(["bash", "-c", "command -v dirname"], capture_output=True, text=True)
    (tmp_path / "dirname").symlink_to(dirname.stdout.strip())
    result = subprocess.run(
        ["/bin/bash", str(RUN_SH)],
        env={"PATH": str(tmp_path), "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "e2e: docker is not installed" in result.stderr


def test_e2e_suite_is_skipped_with_a_reason_when_tools_are_missing(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "e2e/"],
        cwd=REPO,
        env={**os.environ, "PATH": str(tmp_path), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-2000:]
    assert "1 skipped" in result.stdout
    assert "e2e needs docker, kind, helm, kubectl, curl on PATH" in result.stdout


def test_default_pytest_run_does_not_collect_e2e() -> None:
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'testpaths\s*=\s*\["tests"\]', pyproject)


def test_operator_code_imports_without_torch() -> None:
    # What the operator image runs must not need the worker extra (torch, diffusers, ...).
    code = (
        "import sys\n"
        "for name in ('torch', 'diffusers', 'transformers', 'accelerate'):\n"
        "    sys.modules[name] = None  # any import of them raises ImportError\n"
        "import diffcascade_operator.kube.handlers, diffcascade_operator.kube.cli\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]


MAKE_IMAGES = REPO / "scripts" / "build-images.sh"
RELEASE = REPO / ".github" / "workflows" / "release.yml"


def test_base_images_are_pinned_by_digest() -> None:
    for path, arg in ((OPERATOR_DOCKERFILE, "PYTHON_IMAGE"), (WORKER_DOCKERFILE, "BASE_IMAGE")):
        [default] = [a for a in _all(path, "ARG") if a.startswith(f"{arg}=")]
        assert re.fullmatch(rf"{arg}=[\w./:-]+@sha256:[0-9a-f]{{64}}", default), default
    # The kind e2e's CPU worker builds on the operator's pinned base.
    operator_base = _all(OPERATOR_DOCKERFILE, "ARG")[0].split("=", 1)[1]
    assert f'PYTHON_IMAGE="{operator_base}"' in RUN_SH.read_text()


def _make_images(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", "images"],
        cwd=REPO,
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_make_images_asks_for_the_registry(tmp_path: Path) -> None:
    done = _make_images(tmp_path)
    assert done.returncode != 0
    assert "name the registry to push to: make images REGISTRY=" in done.stderr


def test_make_images_builds_both_dockerfiles_tagged_with_the_package_version(
    tmp_path: Path,
) -> None:
    import tomllib

    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    done = _make_images(tmp_path, REGISTRY="registry.example.com/ml/", DRY_RUN="1")
    assert done.returncode == 0, done.stderr
    commands = [line[2:] for line in done.stderr.splitlines() if line.startswith("+ ")]
    assert [c.split()[:2] for c in commands] == [["docker", "build"], ["docker", "push"]] * 2
    for image, build, push in (("operator", *commands[:2]), ("worker", *commands[2:])):
        ref = f"registry.example.com/ml/{image}:{version}"
        assert f"-f {image}/Dockerfile -t {ref} " in build and build.endswith(" .")
        assert push == f"docker push {ref}"
    values = yaml.safe_load(done.stdout)
    assert values["image"]["repository"] == "registry.example.com/ml/operator"
    assert values["workerImage"]["repository"] == "registry.example.com/ml/worker"
    assert values["allowedImageRegistries"] == ["registry.example.com/ml"]


def test_make_images_refuses_to_start_without_docker(tmp_path: Path) -> None:
    # A PATH with only what the script needs before docker (bash, python3 for the version).
    (tmp_path / "python3").symlink_to(sys.executable)
    for tool in ("bash", "dirname", "make"):
        found = subprocess.run(["bash", "-c", f"command -v {tool}"], capture_output=True, text=True)
        (tmp_path / tool).symlink_to(found.stdout.strip())
    done = subprocess.run(
        [str(tmp_path / "make"), "--no-print-directory", "images"],
        cwd=REPO,
        env={"PATH": str(tmp_path), "HOME": str(tmp_path), "REGISTRY": "ghcr.io/acme"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "images: docker is not installed" in done.stderr


def test_release_workflow_tests_then_pushes_the_images_on_a_tag() -> None:
    workflow = yaml.safe_load(RELEASE.read_text())
    triggers = workflow[True]  # YAML 1.1 reads the key `on` as a boolean
    assert triggers == {"push": {"tags": ["v*"]}}
    test, images = workflow["jobs"]["test"], workflow["jobs"]["images"]
    assert any(step.get("run") == ".ci/run" for step in test["steps"])
    assert images["needs"] == "test"
    assert images["permissions"]["packages"] == "write"
    runs = " ".join(step.get("run", "") for step in images["steps"])
    assert 'make images REGISTRY="ghcr.io/${owner}"' in runs
    assert "helm package helm/diffcascade" in runs
    assert workflow["defaults"]["run"]["shell"] == "bash"


def test_dependabot_keeps_the_pinned_bases_current() -> None:
    config = yaml.safe_load((REPO / ".github" / "dependabot.yml").read_text())
    docker = {u["directory"] for u in config["updates"] if u["package-ecosystem"] == "docker"}
    assert docker == {"/operator", "/worker"}


def test_the_package_declares_its_licence_as_an_spdx_string() -> None:
    """A TOML-table licence makes setuptools warn at every install (three times a `make demo`)."""
    import tomllib

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] == "Apache-2.0"
    assert pyproject["build-system"]["requires"] == ["setuptools>=77"]
