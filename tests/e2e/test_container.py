"""What can be checked of the container image without a Docker engine.

* the Dockerfile installs as the README says (torch pinned the same, then the package),
  with the documented entry point, user, thread and TemplateFlow settings;
* the build context that ``.dockerignore`` lets through is enough to build the package, and the
  wheel built from it carries the model weights (hash-checked), the template/atlas kit and the
  report templates: the image needs nothing at run time that the wheel lacks;
* the TemplateFlow images fetched at build time are the ones the template registration reads.

The run with a read-only HOME and TMPDIR is ``tests/e2e/test_readonly_home.py``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined; heredoc bodies are skipped."""
    out, lines = [], iter(DOCKERFILE.read_text().splitlines())
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        while line.endswith("\\"):
            line = line[:-1] + " " + next(lines).strip()
        keyword, _, rest = line.strip().partition(" ")
        out.append((keyword.upper(), rest.strip()))
        heredoc = re.search(r"<<'?(\w+)'?", rest)
        if heredoc:
            for body in lines:
                if body.strip() == heredoc.group(1):
                    break
    return out


def _env() -> dict[str, str]:
    """The runtime stage's ENV settings (the last FROM onwards)."""
    instructions = _instructions()
    last_from = max(i for i, (k, _) in enumerate(instructions) if k == "FROM")
    env = {}
    for keyword, rest in instructions[last_from:]:
        if keyword == "ENV":
            for key, value in re.findall(r"(\w+)=(\S+)", rest):
                env[key] = value
    return env


def test_dockerfile_installs_as_the_readme_says():
    readme = (ROOT / "README.md").read_text()
    pin = re.search(r"pip install (torch==[\d.]+)", readme).group(1)
    runs = [rest for keyword, rest in _instructions() if keyword == "RUN"]
    assert any(f"pip install {pin} " in run for run in runs), "torch pinned as in the README"
    torch_step = next(i for i, r in enumerate(runs) if f"pip install {pin}" in r)
    package_step = next(i for i, r in enumerate(runs) if "pip install /src" in r)
    assert torch_step < package_step  # torch first, as the README says
    args = {rest.split("=")[0]: rest.split("=")[1] for keyword, rest in _instructions() if keyword == "ARG"}
    assert args["TORCH_VARIANT"] == "cpu"
    assert "${TORCH_VARIANT}" in runs[torch_step]


def test_runtime_stage_settings():
    instructions = _instructions()
    assert [k for k, _ in instructions].count("FROM") == 2  # build stage, then a slim runtime stage
    assert ("ENTRYPOINT", '["epvs-bids"]') in instructions
    user = [rest for keyword, rest in instructions if keyword == "USER"]
    assert user and user[-1] not in ("root", "0")
    env = _env()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        assert env[var] == "1"
    assert env["TEMPLATEFLOW_HOME"] == "/opt/templateflow" and env["TEMPLATEFLOW_AUTOUPDATE"] == "0"
    for var in ("MPLCONFIGDIR", "TORCH_HOME", "XDG_CACHE_HOME", "DENO_DIR", "NUMBA_CACHE_DIR"):
        assert var not in env, f"{var} must follow the work directory at run time, not be fixed in the image"
    assert any(k == "COPY" and "--from=build /opt/templateflow" in r for k, r in instructions)


def test_templateflow_images_are_the_ones_the_registration_reads():
    from epvsprep import anatomy

    text = DOCKERFILE.read_text()
    assert f'"{anatomy.TEMPLATEFLOW_NAME}"' in text
    for suffix in ('"T1w", None', '"T2w", None', '"mask", "brain"'):
        assert suffix in text


def _context_files() -> list[Path]:
    """Files of the repository that ``.dockerignore`` sends to the build (allow-list form)."""
    rules = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    files = [Path(p) for p in tracked.stdout.splitlines() if (ROOT / p).is_file()]
    sent = []
    for rel in files:
        keep = True
        for rule in rules:
            negate = rule.startswith("!")
            anywhere = rule.lstrip("!").startswith("**/")  # otherwise anchored at the context root, as Docker does
            pattern = rule.lstrip("!").rstrip("/").removeprefix("**/")
            parts = [rel.as_posix()] + [p.as_posix() for p in rel.parents if p != Path(".")]
            parts += list(rel.parts) if anywhere else []
            if any(fnmatch.fnmatch(part, pattern) for part in parts):
                keep = negate
        if keep:
            sent.append(rel)
    return sent


def test_build_context_is_small_and_complete(tmp_path):
    sent = _context_files()
    tops = {p.parts[0] for p in sent}
    assert tops == {"pyproject.toml", "README.md", "bids_app", "epvsprep", "epvsseg"}
    copied = {source for keyword, rest in _instructions() if keyword == "COPY" and not rest.startswith("--from")
              for source in rest.split()[:-1]}
    assert copied == {"pyproject.toml", "README.md", "bids_app", "epvsprep", "epvsseg"}
    for source in copied:
        assert source in tops, f"COPY {source} is not in the build context"


def _build_wheel(src: Path, dest: Path) -> Path:
    """``pip wheel`` of ``src`` without network or build isolation (hatchling and hatch-vcs: the test extra)."""
    missing = [m for m in ("hatchling", "hatch_vcs") if importlib.util.find_spec(m) is None]
    assert not missing, f"{missing} missing: install the test extra (pip install -e '.[test]')"
    env = {**os.environ, "SETUPTOOLS_SCM_PRETEND_VERSION": "0.1.0", "PIP_NO_INDEX": "1"}
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(dest), str(src)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = dest.glob("epvs_bids-*.whl")
    return wheel


@pytest.mark.skipif(shutil.which("git") is None, reason="git is needed to list the repository")
def test_wheel_from_the_build_context_carries_weights_and_kit(tmp_path):
    from epvsseg.spec import DEFAULT_MODEL, available_models

    src = tmp_path / "src"
    for rel in _context_files():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, src / rel)
    wheel = _build_wheel(src, tmp_path / "wheel")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        # the default model, complete and hash-checked: what every run without --model loads
        default = f"epvsseg/weights/{DEFAULT_MODEL}"
        assert {f"{default}/model.json", f"{default}/weights.pt", f"{default}/MODEL_CARD.md"} <= names
        meta = json.loads(zf.read(f"{default}/model.json"))
        assert meta["model_id"] == DEFAULT_MODEL
        assert hashlib.sha256(zf.read(f"{default}/weights.pt")).hexdigest() == meta["sha256"]
        # every shipped model, with weights whose hash matches its model.json
        assert available_models() and DEFAULT_MODEL in available_models()
        for model_id in available_models():
            folder = f"epvsseg/weights/{model_id}"
            assert {f"{folder}/model.json", f"{folder}/weights.pt", f"{folder}/MODEL_CARD.md"} <= names, model_id
            meta = json.loads(zf.read(f"{folder}/model.json"))
            assert hashlib.sha256(zf.read(f"{folder}/weights.pt")).hexdigest() == meta["sha256"], model_id
        # the template kit (hash-checked against its manifest) and the subcortical atlas
        manifest = json.loads(zf.read("epvsprep/data/templates/MANIFEST.json"))
        assert manifest["sha256"]
        for name, digest in manifest["sha256"].items():
            assert hashlib.sha256(zf.read(f"epvsprep/data/templates/{name}")).hexdigest() == digest, name
        atlases = {p.relative_to(ROOT).as_posix() for p in (ROOT / "epvsprep/data/atlases").iterdir()
                   if p.is_file()}
        assert atlases and atlases <= names
        for name in atlases:
            assert zf.read(name) == (ROOT / name).read_bytes(), name
        assert {"bids_app/data/report.html.j2", "bids_app/data/queries.json",
                "bids_app/data/demo/sub-01_T2w.nii.gz"} <= names
        entry_points = zf.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
        assert "epvs-bids = bids_app.cli.run:main" in entry_points
        assert not [n for n in names if "__pycache__" in n or n.startswith("tests/")]


def test_entrypoint_answers_with_the_image_environment(tmp_path):
    """``epvs-bids --version`` under the image's ENV, with a HOME that does not exist (uid without home)."""
    env = {**os.environ, **_env(), "HOME": str(tmp_path / "file" / "home"), "PATH": os.environ["PATH"]}
    (tmp_path / "file").write_text("")
    proc = subprocess.run([sys.executable, "-m", "bids_app.cli.run", "--version"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("epvs-bids ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
