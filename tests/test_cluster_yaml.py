"""cluster.yaml validates offline against the cluster-launcher schema that ships with ray."""

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

import ray.autoscaler

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"
SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


@pytest.fixture()
def config():
    return yaml.safe_load(CLUSTER_YAML.read_text())


def check(config):
    jsonschema.validate(config, SCHEMA)
    validate_config(prepare_config(copy.deepcopy(config)))


def test_cluster_yaml_matches_the_ray_schema(config):
    check(config)


def test_cluster_has_a_cpu_head_and_autoscaled_gpu_workers(config):
    nodes = config["available_node_types"]
    assert config["head_node_type"] in nodes
    gpu_types = [n for n in nodes.values() if n.get("resources", {}).get("GPU", 0) >= 1]
    assert gpu_types, "no node type offers a GPU"
    assert all(t["min_workers"] < t["max_workers"] <= config["max_workers"] for t in gpu_types)


def test_setup_installs_this_package_from_the_synced_checkout(config):
    mounted = [remote for remote, local in config["file_mounts"].items() if local == "."]
    assert mounted, "the project directory is not synced to the nodes"
    assert any("pip install" in cmd and mounted[0] in cmd for cmd in config["setup_commands"])


def test_schema_check_catches_a_misspelt_key(config):
    config["max_worker"] = config.pop("max_workers")
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        check(config)


def test_schema_check_catches_an_unknown_head_type(config):
    config["head_node_type"] = "no_such_type"
    with pytest.raises(ValueError, match="head_node_type"):
        check(config)


def test_mlflow_listens_on_the_heads_loopback_and_workers_reach_it_through_ssh(config):
    commands = " ".join(config["head_start_ray_commands"])
    assert "mlflow server --host 127.0.0.1 " in commands and "0.0.0.0" not in commands
    workers = " ".join(config["worker_start_ray_commands"])
    assert "-L 127.0.0.1:5000:127.0.0.1:5000" in workers
    assert "MLFLOW_TRACKING_URI=http://127.0.0.1:5000 ray start" in workers
    assert 'restrict,port-forwarding,permitopen=\\"127.0.0.1:5000\\"' in " ".join(config["head_setup_commands"])


# GPUs and vCPUs of the instance types, from AWS's EC2 instance-type pages (accelerated computing: G5, P4).
EC2_GPUS_VCPUS = {"g5.xlarge": (1, 4), "g5.12xlarge": (4, 48), "p4d.24xlarge": (8, 96)}


def test_multi_gpu_node_types_declare_the_gpus_and_cpus_their_instances_have(config):
    gpu_types = {name: t for name, t in config["available_node_types"].items()
                 if t.get("resources", {}).get("GPU", 0) >= 1}
    assert max(t["resources"]["GPU"] for t in gpu_types.values()) >= 4, "no multi-GPU node type"
    for name, node_type in gpu_types.items():
        gpus, vcpus = EC2_GPUS_VCPUS[node_type["node_config"]["InstanceType"]]
        assert node_type["resources"]["GPU"] == gpus, name
        assert node_type["resources"]["CPU"] == vcpus, name
