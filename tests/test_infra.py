"""Static checks of infra/: what can be validated without a Kubernetes cluster, AWS or Docker.

* the cluster-launcher YAML against the JSON schema Ray 2.60 ships (ray/autoscaler/ray-schema.json);
* the KubeRay RayJob against the fields the RayJob CRD requires and types (a hand-written subset
  of the CRD); set KUBERAY_RAYJOB_CRD=/path/to/ray.io_rayjobs.yaml to validate against the
  real CRD's openAPIV3Schema as well;
* the runtime envs load as Ray RuntimeEnv objects and exclude what must never be uploaded;
* the Dockerfile: a pinned official base, installs the project, downloads no weights.

No Docker engine is available on the development machine, so the image is not built by the tests
(infra/README.md has the build command).
"""

from __future__ import annotations

import os
import re
import subprocess
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
RAY_VERSION = "2.60.0"


def _yaml(name: str):
    return yaml.safe_load((INFRA / name).read_text())


def _project_deps() -> list[str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]


def _pinned(name: str) -> str:
    for dep in _project_deps():
        m = re.match(rf"^{re.escape(name)}(\[[^\]]*\])?==(.+)$", dep)
        if m:
            return m.group(2)
    raise AssertionError(f"{name} is not pinned with == in pyproject.toml")


# ---------------------------------------------------------------- cluster launcher (ray up)

def test_cluster_launcher_yaml_matches_ray_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = _yaml("cluster-gpu.yaml")
    validate_config(cfg)  # jsonschema against ray/autoscaler/ray-schema.json
    validate_config(prepare_config(cfg))  # and after Ray fills in the provider defaults
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpu_types = [t for t, spec in types.items() if spec["node_config"]["InstanceType"].startswith(("g", "p"))]
    assert gpu_types, "no GPU instance type among the worker node types"
    # Every node runs the project image built from infra/Dockerfile and token auth is on.
    assert cfg["docker"]["image"].endswith(f"ray{RAY_VERSION}-py311-gpu")
    assert "-e RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]
    token_env = [o for o in cfg["docker"]["run_options"] if o.startswith("-e RAY_AUTH_TOKEN_PATH=")]
    assert token_env and any(token_env[0].split("=", 1)[1].startswith(dst) for dst in cfg["file_mounts"])


def test_cluster_launcher_schema_rejects_a_typo():
    """The schema check above is a real one: a misspelt key fails it."""
    from ray.autoscaler._private.util import validate_config

    cfg = _yaml("cluster-gpu.yaml")
    cfg["available_node_types"]["gpu"]["min_worker"] = 1
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        validate_config(cfg)


# ---------------------------------------------------------------- KubeRay RayJob

_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_CONTAINER = {
    "type": "object", "required": ["name", "image"],
    "properties": {"name": {"type": "string"}, "image": {"type": "string"},
                   "resources": {"type": "object", "properties": {
                       "limits": {"type": "object", "additionalProperties": {"type": ["string", "integer"]}},
                       "requests": {"type": "object", "additionalProperties": {"type": ["string", "integer"]}},
                   }}},
}
_TEMPLATE = {"type": "object", "required": ["spec"], "properties": {"spec": {
    "type": "object", "required": ["containers"],
    "properties": {"containers": {"type": "array", "minItems": 1, "items": _CONTAINER}}}}}
# The parts of KubeRay's RayJob CRD (ray.io/v1, checked against v1.7.0) this manifest relies on:
# required fields, and rayStartParams values being strings (a common, silent-until-apply mistake).
RAYJOB_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayJob"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["entrypoint", "rayClusterSpec"],
            "properties": {
                "entrypoint": {"type": "string"},
                "runtimeEnvYAML": {"type": "string"},
                "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
                "shutdownAfterJobFinishes": {"type": "boolean"},
                "rayClusterSpec": {
                    "type": "object",
                    "required": ["headGroupSpec", "workerGroupSpecs"],
                    "properties": {
                        "rayVersion": {"type": "string"},
                        "authOptions": {"type": "object",
                                        "properties": {"mode": {"enum": ["disabled", "token"]}}},
                        "headGroupSpec": {"type": "object", "required": ["template"],
                                          "properties": {"rayStartParams": _STR_MAP,
                                                         "template": _TEMPLATE}},
                        "workerGroupSpecs": {"type": "array", "minItems": 1, "items": {
                            "type": "object",
                            "required": ["groupName", "minReplicas", "maxReplicas", "template"],
                            "properties": {"groupName": {"type": "string"},
                                           "replicas": {"type": "integer"},
                                           "minReplicas": {"type": "integer"},
                                           "maxReplicas": {"type": "integer"},
                                           "rayStartParams": _STR_MAP,
                                           "template": _TEMPLATE}}},
                    },
                },
            },
        },
    },
}


def test_rayjob_has_the_fields_the_crd_requires():
    job = _yaml("kuberay-rayjob.yaml")
    jsonschema.validate(job, RAYJOB_SCHEMA)
    spec = job["spec"]
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == RAY_VERSION
    assert cluster["authOptions"]["mode"] == "token", "keep Ray's token auth on"
    # The entrypoint is the same command as everywhere else, on the CelebA config.
    assert spec["entrypoint"].split()[:5] == ["python", "-m", "jobs.run", "--config",
                                              "jobs/configs/celeba.toml"]
    celeba = tomllib.loads((REPO / "jobs/configs/celeba.toml").read_text())
    assert celeba["data"]["root"].startswith("s3://") and celeba["output"]["root"].startswith("s3://")
    # The runtime env is valid for Ray and the working dir is where the image keeps the repo.
    from ray.runtime_env import RuntimeEnv

    renv = yaml.safe_load(spec["runtimeEnvYAML"])
    RuntimeEnv(**{**renv, "working_dir": str(REPO)})  # the image's path does not exist here
    dockerfile = (INFRA / "Dockerfile").read_text()
    assert re.search(rf"^WORKDIR {re.escape(renv['working_dir'])}$", dockerfile, re.M)
    # A GPU worker group that asks Kubernetes for GPUs, and AWS credentials from a Secret in every pod.
    gpu_groups = [g for g in cluster["workerGroupSpecs"]
                  if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu_groups, "no worker group requests nvidia.com/gpu"
    for g in gpu_groups:
        res = g["template"]["spec"]["containers"][0]["resources"]
        assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"]
        assert g["rayStartParams"].get("num-gpus") == str(res["limits"]["nvidia.com/gpu"])
        assert g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        for c in pod["spec"]["containers"]:
            secrets = [e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e]
            assert secrets == ["faceaudit-aws"], f"container {c['name']} lacks the AWS secret"
            assert c["image"].endswith(f"ray{RAY_VERSION}-py311-gpu")


def test_rayjob_schema_rejects_non_string_ray_start_params():
    job = _yaml("kuberay-rayjob.yaml")
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["rayStartParams"]["num-gpus"] = 1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(job, RAYJOB_SCHEMA)


@pytest.mark.skipif(not os.environ.get("KUBERAY_RAYJOB_CRD"),
                    reason="set KUBERAY_RAYJOB_CRD to KubeRay's ray.io_rayjobs.yaml to validate against it")
def test_rayjob_validates_against_the_real_crd():
    crd = yaml.safe_load(Path(os.environ["KUBERAY_RAYJOB_CRD"]).read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = version["schema"]["openAPIV3Schema"]

    def strict(node):
        # Kubernetes prunes unknown fields silently; make them errors so typos show up here.
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node \
                    and not node.get("x-kubernetes-preserve-unknown-fields"):
                node["additionalProperties"] = False
            for v in node.values():
                strict(v)
        elif isinstance(node, list):
            for v in node:
                strict(v)

    strict(schema)
    job = _yaml("kuberay-rayjob.yaml")
    # int-or-string quantities: the CRD marks them x-kubernetes-int-or-string with anyOf.
    jsonschema.validate(job, schema)


# ---------------------------------------------------------------- runtime envs

def test_runtime_envs_load_and_exclude_local_state():
    from ray.runtime_env import RuntimeEnv

    for name in ("runtime_env.yaml", "runtime_env_pip.yaml"):
        env = _yaml(name)
        RuntimeEnv(**env)
        assert env["working_dir"] == "."
        for must in (".venv/", "data/", "runs/", ".git/"):
            assert must in env["excludes"], f"{name} uploads {must}"
        assert env["env_vars"]["PYTHONUNBUFFERED"] == "1"
    assert "pip" not in _yaml("runtime_env.yaml"), "the image-based env installs nothing"


def test_pip_runtime_env_mirrors_pyproject():
    """runtime_env_pip.yaml lists exactly the project's dependencies, minus Ray itself."""
    listed = _yaml("runtime_env_pip.yaml")["pip"]["packages"]
    wanted = [d for d in _project_deps() if not re.match(r"^ray(\[|=|>|<|$)", d)]
    norm = lambda s: s.replace(" ", "").lower()  # noqa: E731
    assert sorted(map(norm, listed)) == sorted(map(norm, wanted))
    assert not any(p.startswith("ray") for p in listed), "never reinstall Ray on a running cluster"


# ---------------------------------------------------------------- Dockerfile

def _instructions(text: str) -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile_builds_on_the_pinned_official_ray_image():
    steps = _instructions((INFRA / "Dockerfile").read_text())
    args = {rest.split("=", 1)[0]: rest.split("=", 1)[1].strip('"') for op, rest in steps
            if op == "ARG" and "=" in rest}
    froms = [rest for op, rest in steps if op == "FROM"]
    assert len(froms) == 1
    base = froms[0].replace("${RAY_TAG}", args["RAY_TAG"])
    assert base == f"rayproject/ray:{RAY_VERSION}-py311-gpu"
    assert _pinned("ray") == RAY_VERSION, "pyproject's Ray must match the image's Ray"
    runs = " && ".join(rest for op, rest in steps if op == "RUN")
    # The project is installed (so torch comes pinned from pyproject), and the check after
    # install fails the build if the image's Ray is not the pinned one.
    assert re.search(r"pip install [^&]*\s\.(\s|$)", runs)
    assert f"ray.__version__ == '{RAY_VERSION}'" in runs
    for pin in re.findall(r"torch(?:vision)?==([\w.+-]+)", runs):
        assert pin in (_pinned("torch"), _pinned("torchvision")), "torch pinned apart from pyproject"
    sources = {src for op, rest in steps if op == "COPY"
               for src in rest.split()[:-1] if not src.startswith("--")}
    assert {"pyproject.toml", "pipeline", "jobs"} <= sources


def test_dockerfile_downloads_no_weights():
    text = (INFRA / "Dockerfile").read_text()
    steps = _instructions(text)
    body = " ".join(rest for op, rest in steps if op in ("RUN", "ADD"))
    for bad in ("wget", "curl", "torch.hub", "load_state_dict_from_url", "weights=", "huggingface",
                "hf_hub_download", "snapshot_download", "IMAGENET1K"):
        assert bad not in body, f"the image build fetches something: {bad!r}"
    assert not any(op == "ADD" and "://" in rest for op, rest in steps)


def test_dockerignore_keeps_local_state_out_of_the_context():
    ignored = (INFRA / "Dockerfile.dockerignore").read_text().split()
    for must in (".venv", "data", "runs", ".git"):
        assert must in ignored


# ---------------------------------------------------------------- local scripts (static part)

@pytest.mark.parametrize("script", ["local_head.sh", "local_worker.sh"])
def test_scripts_are_valid_bash_and_executable(script):
    path = INFRA / script
    assert os.access(path, os.X_OK), f"{script} is not executable"
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text() + (INFRA / "_ray_common.sh").read_text()
    # `ray stop` would kill every Ray process of the user on this machine; never in these scripts.
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert not re.search(r"\bray\"? stop\b|\"\$RAY\" stop", code)


def test_torch_cuda_variant_is_one_build_argument_matching_the_pip_env():
    """The Dockerfile picks torch's CUDA build from TORCH_VARIANT (default documented with its
    minimum driver); the pip runtime env names the same variant; both are known variants."""
    from pipeline.resources import MIN_DRIVER

    steps = _instructions((INFRA / "Dockerfile").read_text())
    args = {rest.split("=", 1)[0]: rest.split("=", 1)[1].strip('"') for op, rest in steps
            if op == "ARG" and "=" in rest}
    variant = args["TORCH_VARIANT"]
    runs = " && ".join(rest for op, rest in steps if op == "RUN")
    assert "download.pytorch.org/whl/${TORCH_VARIANT}" in runs
    assert "torch.version.cuda" in runs, "the build checks the installed variant"
    opts = _yaml("runtime_env_pip.yaml")["pip"]["pip_install_options"]
    assert opts[opts.index("--extra-index-url") + 1].rsplit("/", 1)[1] == variant
    assert variant == "cpu" or variant[2:4] in MIN_DRIVER  # cu130 -> CUDA 13
    readme = (REPO / "README.md").read_text()
    for v, driver in (("cu130", MIN_DRIVER["13"]), ("cu128", MIN_DRIVER["12"])):
        assert re.search(rf"{v}.*{re.escape(driver)}", readme), f"README: driver for {v}"


def test_dockerfile_workdir_is_made_by_the_image_user():
    """WORKDIR creating the directory makes it root-owned on the legacy builder; `ray` then
    cannot write there. A RUN mkdir (as `ray`) must come first."""
    steps = _instructions((INFRA / "Dockerfile").read_text())
    workdir = next(i for i, (op, _) in enumerate(steps) if op == "WORKDIR")
    path = steps[workdir][1]
    assert any(op == "RUN" and f"mkdir -p {path}" in rest for op, rest in steps[:workdir])
    assert not any(op == "USER" and rest == "root" for op, rest in steps)
