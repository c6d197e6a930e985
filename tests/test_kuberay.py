"""deploy/kuberay-rayjob.yaml validates offline: its RayJob fields against KubeRay's ray.io/v1 API, its
pod templates against Kubernetes' own schema (kubernetes-validate), and its entrypoint is a sweep
that nanovlm accepts.

The RayJob schema below is written from KubeRay's API types (ray-operator/apis/ray/v1:
rayjob_types.go RayJobSpec, raycluster_types.go RayClusterSpec, HeadGroupSpec, WorkerGroupSpec; the
json tags and required fields of KubeRay v1.4). It lists every field those types have, and no
other, so a misspelt or misplaced key fails here as the API server would refuse it."""

import re
import shlex
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "deploy" / "kuberay-rayjob.yaml"
KUBERNETES_VERSION = "1.30"
IMAGE_PROJECT_DIR = "/home/ray/nanovlm-ray"

_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_POD_TEMPLATE = {"type": "object"}  # checked against Kubernetes' PodTemplateSpec below
_INT = {"type": "integer"}

WORKER_GROUP = {
    "type": "object", "additionalProperties": False,
    "required": ["groupName", "rayStartParams", "template"],
    "properties": {"suspend": {"type": "boolean"}, "groupName": {"type": "string"}, "replicas": _INT,
                   "minReplicas": _INT, "maxReplicas": _INT, "idleTimeoutSeconds": _INT,
                   "rayStartParams": _STRING_MAP, "template": _POD_TEMPLATE,
                   "scaleStrategy": {"type": "object"}, "numOfHosts": _INT},
}
HEAD_GROUP = {
    "type": "object", "additionalProperties": False, "required": ["rayStartParams", "template"],
    "properties": {"template": _POD_TEMPLATE, "headService": {"type": "object"}, "enableIngress": {"type": "boolean"},
                   "rayStartParams": _STRING_MAP, "serviceType": {"type": "string"}},
}
RAY_CLUSTER_SPEC = {
    "type": "object", "additionalProperties": False, "required": ["headGroupSpec"],
    "properties": {"suspend": {"type": "boolean"}, "managedBy": {"type": "string"},
                   "autoscalerOptions": {"type": "object"}, "headServiceAnnotations": _STRING_MAP,
                   "enableInTreeAutoscaling": {"type": "boolean"}, "gcsFaultToleranceOptions": {"type": "object"},
                   "headGroupSpec": HEAD_GROUP, "rayVersion": {"type": "string"},
                   "workerGroupSpecs": {"type": "array", "items": WORKER_GROUP}},
}
RAY_JOB = {
    "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayJob"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object", "additionalProperties": False,
            "properties": {
                "activeDeadlineSeconds": {"type": "integer", "minimum": 1}, "backoffLimit": _INT,
                "rayClusterSpec": RAY_CLUSTER_SPEC, "submitterPodTemplate": _POD_TEMPLATE,
                "metadata": _STRING_MAP, "clusterSelector": _STRING_MAP,
                "submitterConfig": {"type": "object", "properties": {"backoffLimit": _INT},
                                    "additionalProperties": False},
                "managedBy": {"enum": ["ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"]},
                "deletionPolicy": {"enum": ["DeleteCluster", "DeleteWorkers", "DeleteSelf", "DeleteNone"]},
                "entrypoint": {"type": "string"}, "runtimeEnvYAML": {"type": "string"}, "jobId": {"type": "string"},
                "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode"]},
                "entrypointResources": {"type": "string"}, "entrypointNumCpus": {"type": "number"},
                "entrypointNumGpus": {"type": "number"}, "ttlSecondsAfterFinished": _INT,
                "shutdownAfterJobFinishes": {"type": "boolean"}, "suspend": {"type": "boolean"},
            },
        },
    },
}


@pytest.fixture()
def job():
    return yaml.safe_load(MANIFEST.read_text())


def _pod_templates(job):
    cluster = job["spec"]["rayClusterSpec"]
    yield "head", cluster["headGroupSpec"]["template"]
    for group in cluster["workerGroupSpecs"]:
        yield group["groupName"], group["template"]


def check(job):
    jsonschema.validate(job, RAY_JOB)
    for name, template in _pod_templates(job):
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template}
        kubernetes_validate.validate(pod_template, KUBERNETES_VERSION, strict=True)


def test_the_rayjob_matches_kuberays_api_and_its_pods_kubernetes_schema(job):
    check(job)


def test_the_schema_check_catches_a_misspelt_rayjob_field(job):
    job["spec"]["shutdownAfterJobFinish"] = job["spec"].pop("shutdownAfterJobFinishes")
    with pytest.raises(jsonschema.ValidationError, match="shutdownAfterJobFinish"):
        check(job)


def test_the_schema_check_catches_a_misspelt_container_field(job):
    container = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    container["resource"] = container.pop("resources")
    with pytest.raises(kubernetes_validate.ValidationError):
        check(job)


def test_gpu_worker_groups_scale_from_zero_and_request_whole_gpus(job):
    groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpus = []
    for group in groups:
        assert 0 == group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        (container,) = group["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        assert limits == container["resources"]["requests"]
        gpus.append(int(limits["nvidia.com/gpu"]))
    assert gpus[0] == 1 and max(gpus) >= 4
    assert job["spec"]["rayClusterSpec"]["enableInTreeAutoscaling"] is True
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]["NANOVLM_AUTOSCALING"] == "1"


def test_the_image_is_built_on_the_tested_ray_version(job):
    ray_version = re.search(r"^ray==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M).group(1)
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == ray_version
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray_version}-py311-gpu" in dockerfile
    assert f"WORKDIR {IMAGE_PROJECT_DIR}" in dockerfile
    containers = [c for _, t in _pod_templates(job) for c in t["spec"]["containers"]]
    assert len({c["image"] for c in containers}) == 1  # every node runs the same code
    assert {c["workingDir"] for c in containers} == {IMAGE_PROJECT_DIR}


def test_the_entrypoint_is_a_gpu_sweep_on_object_storage_that_nanovlm_accepts(job):
    from nanovlm.cli import build_parser
    from nanovlm.sweep.space import check_some_trial_is_valid, load_space

    words = shlex.split(job["spec"]["entrypoint"])
    assert words[:2] == ["nanovlm", "sweep"]
    args = build_parser().parse_args(words[1:])
    assert args.storage_path.startswith("s3://")
    assert args.space.startswith(IMAGE_PROJECT_DIR + "/")  # where deploy/Dockerfile puts the project
    spec = load_space(ROOT / args.space[len(IMAGE_PROJECT_DIR) + 1:], args.overrides)
    check_some_trial_is_valid(spec)
    _, train = spec.base_configs()
    assert train.use_gpu and train.num_workers == 2

