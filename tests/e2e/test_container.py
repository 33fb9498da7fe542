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
    torch_step = next((i for i, r in enumerate(runs) if re.search(rf'pip install "?{re.escape(pin)}"? ', r)), None)
    assert torch_step is not None, "torch pinned as in the README"
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
    assert f"'{anatomy.TEMPLATEFLOW_NAME}'" in text
    for suffix in ("('T1w', None)", "('T2w', None)", "('mask', 'brain')"):
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
    # bids_app/environment.py alone first: the torch variant check runs before the package is installed
    assert copied == {"pyproject.toml", "README.md", "bids_app", "epvsprep", "epvsseg", "bids_app/environment.py"}
    for source in copied:
        assert Path(source).parts[0] in tops and (ROOT / source).exists(), f"COPY {source} is not in the context"


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
        # the review viewer: the vendored NiiVue build (hash-checked against VENDOR.json), its licence, our code
        viewer = {p.relative_to(ROOT).as_posix() for p in (ROOT / "bids_app/data/viewer").iterdir() if p.is_file()}
        assert "bids_app/data/viewer/LICENSE_NiiVue.txt" in viewer and viewer <= names
        vendor = json.loads(zf.read("bids_app/data/viewer/VENDOR.json"))
        assert hashlib.sha256(zf.read(f"bids_app/data/viewer/{vendor['file']}")).hexdigest() == vendor["sha256"]
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
        # the real-anatomy label maps of the randomised generator, hash-checked against their manifest
        anatomies = json.loads(zf.read("epvsseg/synth/data/anatomies/MANIFEST.json"))["anatomies"]
        assert anatomies
        for entry in anatomies.values():
            data = zf.read(f"epvsseg/synth/data/anatomies/{entry['file']}")
            assert hashlib.sha256(data).hexdigest() == entry["sha256"], entry["file"]
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


# ------------------------------------------------------------ portability of the build (issue #14)
def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, rest in _instructions():
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, rest))
    return stages


def test_no_heredoc_and_no_remote_syntax_directive():
    """A heredoc breaks on podman/buildah < 4.9/1.33; a syntax directive makes BuildKit pull an image."""
    text = DOCKERFILE.read_text()
    assert not re.search(r"<<-?\s*'?\w+'?", text)
    assert not re.match(r"\s*#\s*syntax\s*=", text, flags=re.I)
    assert not [line for line in text.splitlines() if re.match(r"#\s*(syntax|escape|check)\s*=", line, re.I)]


def test_build_arguments_stay_in_the_build_stage():
    """Index, pip and TemplateFlow settings are build-stage ARGs: none reaches the runtime stage."""
    build, runtime = _stages()
    build_args = {rest.split("=")[0] for k, rest in build if k == "ARG"}
    assert {"TORCH_INDEX_URL", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_CERT",
            "PIP_TRUSTED_HOST", "TEMPLATEFLOW_FETCH", "TORCH_VARIANT"} <= build_args
    runtime_args = {rest.split("=")[0] for k, rest in runtime if k == "ARG"}
    assert runtime_args <= {"VERSION", "TORCH_VARIANT"}
    runtime_text = " ".join(rest for _, rest in runtime)
    assert "PIP_" not in runtime_text and "TORCH_INDEX_URL" not in runtime_text
    torch_run = next(rest for k, rest in build if k == "RUN" and "torch==" in rest)
    assert '--index-url "${TORCH_INDEX_URL}"' in torch_run and "--check-torch" in torch_run
    fetch = next(rest for k, rest in build if k == "RUN" and "templateflow import api" in rest)
    assert '"${TEMPLATEFLOW_FETCH}" = 1' in fetch  # optional: TEMPLATEFLOW_FETCH=0 builds without the server


@pytest.mark.parametrize(("variant", "cuda", "dists", "ok"), [
    ("cpu", None, ["torch", "numpy"], True),
    ("cpu", "12.6", ["torch", "nvidia-cublas-cu12", "nvidia_cudnn_cu12"], False),  # PyPI's default wheel
    ("cpu", None, ["torch", "nvidia-nccl-cu12"], False),
    ("cu126", "12.6", ["torch", "nvidia-cublas-cu12"], True),
    ("cu126", None, ["torch"], False),  # a cpu wheel in a CUDA image
    ("cu128", "12.6", ["torch", "nvidia-cublas-cu12"], False),
    ("cu126", "12.6", ["torch"], False),
    ("rocm6", None, ["torch"], False),
])
def test_torch_variant_check(variant, cuda, dists, ok):
    from bids_app.environment import torch_variant_problem

    problem = torch_variant_problem(variant, cuda, dists)
    assert (problem is None) is ok, problem


def test_torch_variant_check_runs_standalone_as_in_the_build():
    """The build runs bids_app/environment.py as a script before the package is installed."""
    proc = subprocess.run([sys.executable, str(ROOT / "bids_app" / "environment.py"), "--check-torch", "cu126"],
                          capture_output=True, text=True, timeout=300, cwd="/")
    import torch

    assert proc.returncode == (1 if torch.version.cuda != "12.6" else 0), proc.stderr
    if proc.returncode:
        assert "torch variant check failed" in proc.stderr


# ------------------------------------------------------------ CPU counts (affinity, cgroup quota)
def _cgroup(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


@pytest.mark.parametrize(("files", "affinity", "expected"), [
    ({}, 8, 8),
    ({"cpu.max": "max 100000\n"}, 8, 8),
    ({"cpu.max": "150000 100000\n"}, 8, 2),  # --cpus 1.5 -> 2 processes
    ({"cpu.max": "50000 100000\n"}, 8, 1),
    ({"cpu.max": "400000 100000\n"}, 2, 2),  # affinity is the tighter limit
    ({"cpu,cpuacct/cpu.cfs_quota_us": "300000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, 16, 3),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, 4, 4),  # v1 without quota
])
def test_available_cpus(tmp_path, monkeypatch, files, affinity, expected):
    from bids_app import environment

    monkeypatch.setattr(environment.os, "sched_getaffinity", lambda pid: set(range(affinity)))
    assert environment.available_cpus(_cgroup(tmp_path, files)) == expected


def test_default_nprocs_follows_the_affinity(tmp_path, monkeypatch):
    from bids_app import environment
    from bids_app.cli.parser import parse_args

    (tmp_path / "bids").mkdir()
    monkeypatch.setattr(environment.os, "sched_getaffinity", lambda pid: {0})
    config = parse_args([str(tmp_path / "bids"), str(tmp_path / "out"), "participant"])
    assert config.nprocs == 1 and config.omp_nthreads == 1
    config = parse_args([str(tmp_path / "bids"), str(tmp_path / "out"), "participant", "--nprocs", "3"])
    assert config.nprocs == 3


def test_unwritable_output_names_the_uid_and_the_fix(tmp_path, monkeypatch):
    from bids_app.cli.parser import parse_args
    from bids_app.errors import OutputError, exit_code_for

    (tmp_path / "bids").mkdir()
    (tmp_path / "out").mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p).endswith("out") else real_access(p, mode))
    monkeypatch.setenv("EPVS_BIDS_CONTAINER", "docker")
    with pytest.raises(OutputError) as err:
        parse_args([str(tmp_path / "bids"), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "w")])
    text = str(err.value)
    assert exit_code_for(err.value) == 73
    assert str(tmp_path / "out") in text and f"uid {os.getuid()}" in text
    assert '--user "$(id -u):$(id -g)"' in text and "uid 1000" in text
    monkeypatch.delenv("EPVS_BIDS_CONTAINER")
    with pytest.raises(OutputError) as err:
        parse_args([str(tmp_path / "bids"), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "w")])
    assert "--user" not in str(err.value) and f"uid {os.getuid()}" in str(err.value)


# ------------------------------------------------------------ container and template provenance
def test_container_provenance_from_the_image_environment():
    from bids_app.environment import container_provenance

    assert container_provenance({}) is None
    env = {"EPVS_BIDS_CONTAINER": "docker", "EPVS_BIDS_CONTAINER_TAG": "0.1.0-cpu"}
    assert container_provenance(env) == {"Type": "docker", "Tag": "0.1.0-cpu"}
    env["APPTAINER_NAME"] = "epvs-bids.sif"
    assert container_provenance(env)["Runtime"] == "apptainer"
    assert container_provenance(env)["Image"] == "epvs-bids.sif"


def test_template_image_origin_says_when_the_template_was_synthesised(monkeypatch):
    from bids_app.outputs import template_image_origin

    monkeypatch.setenv("TEMPLATEFLOW_HOME", "/opt/templateflow")
    text = template_image_origin({"sequence": "T2w", "sources": {"T1w": "embedded"}})
    assert text.startswith("synthesised T2w template") and "/opt/templateflow" in text
    tf = "/opt/templateflow/tpl-MNI152NLin2009aSym/tpl-MNI152NLin2009aSym_res-02_T2w.nii.gz"
    assert tf in template_image_origin({"sequence": "T2w", "sources": {"tf-T2w": tf}})
    assert "embedded" in template_image_origin({"sequence": "T1w", "sources": {}})
    assert template_image_origin({}) is None


def test_report_names_the_container_and_the_template():
    """Rendered as the report is (StrictUndefined): with and without Apptainer, and from an older provenance."""
    import jinja2

    template = (ROOT / "bids_app" / "data" / "report.html.j2").read_text()
    start = template.index('{% set container = summary.get("container") %}')
    snippet = template[start:template.index("</p>", start) + 4]
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    render = env.from_string(snippet).render
    html = render(summary={"template_image": "synthesised T2w template (...)",
                           "container": {"Type": "docker", "Tag": "0.1.0-cpu", "Runtime": "apptainer",
                                         "Image": "e.sif"}})
    assert "Template image: synthesised T2w template" in html
    assert "Container: docker image <code>epvs-bids:0.1.0-cpu</code>, run by apptainer" in html
    html = render(summary={"template_image": "x", "container": {"Type": "docker", "Tag": "0.1.0-cpu"}})
    assert "Container: docker image <code>epvs-bids:0.1.0-cpu</code>." in html and "run by" not in html
    html = render(summary={"template_image": None, "container": None})
    assert "Not run in the epvs-bids container" in html
    assert "Template image: not recorded" in render(summary={})  # provenance written before these fields
