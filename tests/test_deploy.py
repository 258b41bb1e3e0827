"""Deployment files validate against the schemas their tools use.

- ray_config.yaml: ray's own ray/autoscaler/ray-schema.json, then what `ray up` runs
  before touching the cloud (prepare_config + validate_config).
- manifests/*.yaml: the KubeRay CRDs' openAPIV3Schema in ../shared/data/kuberay, read
  strictly (an unknown field is an error, as `kubectl apply --validate=strict` does), and
  the RayService serveConfigV2 against Ray Serve's ServeDeploySchema.
Each has negative cases: a broken copy must be rejected.
"""
import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

ray = pytest.importorskip("ray")
from ray.autoscaler._private.util import prepare_config, validate_config  # noqa: E402
from ray.serve.schema import ServeDeploySchema  # noqa: E402


REPO = Path(__file__).resolve().parents[1]
KUBERAY = REPO.parent / "shared" / "data" / "kuberay"
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 1 MB each


# -- ray up --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_schema():
    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


@pytest.fixture
def ray_config():
    return yaml.safe_load((REPO / "ray_config.yaml").read_text())


def test_ray_config_matches_ray_schema_and_ray_up_checks(ray_schema, ray_config):
    jsonschema.validate(ray_config, ray_schema)
    validate_config(prepare_config(copy.deepcopy(ray_config)))


def test_ray_config_node_types(ray_config):
    types = ray_config["available_node_types"]
    assert ray_config["head_node_type"] in types
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    kv = [t for t in types.values() if t["resources"].get("kv_store", 0) >= 1]
    assert gpu and kv and not set(map(id, gpu)) & set(map(id, kv))
    setup = "\n".join(ray_config["setup_commands"])
    assert f'ray[serve]=={ray.__version__}' in setup and "torch" in setup
    assert "pip install -e ~/lsa-serve" in setup and ray_config["file_mounts"]["~/lsa-serve"] == "."
    assert any("ray start --head" in c for c in ray_config["head_start_ray_commands"])
    assert any("--address=$RAY_HEAD_IP" in c for c in ray_config["worker_start_ray_commands"])


def _del(path):
    def mutate(cfg):
        *parents, last = path
        for key in parents:
            cfg = cfg[key]
        del cfg[last]
    return mutate


def _set(path, value):
    def mutate(cfg):
        *parents, last = path
        for key in parents:
            cfg = cfg[key]
        cfg[last] = value
    return mutate


@pytest.mark.parametrize("mutate", [
    _del(["provider", "type"]),
    _del(["cluster_name"]),
    _set(["available_node_types", "gpu_worker", "resources", "GPU"], "one"),
    _set(["available_node_types", "kv_memory", "resources", "kv_store"], -1),
    _del(["available_node_types", "gpu_worker", "node_config"]),
    _set(["setup_commands"], "pip install ."),
    _set(["max_workers"], 1.5),
    _set(["workers"], 3),  # unknown top-level field
], ids=["no-provider-type", "no-cluster-name", "gpu-str", "negative-resource",
        "no-node-config", "commands-not-list", "float-max-workers", "unknown-field"])
def test_ray_schema_rejects_broken_copy(ray_schema, ray_config, mutate):
    mutate(ray_config)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(ray_config, ray_schema)


def test_ray_up_rejects_unknown_head_type(ray_config):
    ray_config["head_node_type"] = "nope"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config(ray_config))


# -- KubeRay -------------------------------------------------------------------------------

def strict(schema):
    """The CRD schema with unknown fields forbidden wherever the CRD lists the fields of
    an object (and does not ask to keep unknown ones)."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def crd_validator():
    if not KUBERAY.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {KUBERAY}: clone the shared data folder as "
                    "../shared beside the repository to run the manifest checks")
    validators = {}
    for name in ("ray.io_rayservices.yaml", "ray.io_rayjobs.yaml"):
        crd = yaml.load((KUBERAY / name).read_text(), Loader=YAML_LOADER)
        for version in crd["spec"]["versions"]:
            key = (f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])
            schema = strict(version["schema"]["openAPIV3Schema"])
            validators[key] = jsonschema.Draft7Validator(schema)

    def validate(manifest):
        key = (manifest["apiVersion"], manifest["kind"])
        assert key in validators, f"no CRD for {key}"
        validators[key].validate(manifest)
    return validate


def load(name):
    return yaml.safe_load((REPO / "manifests" / name).read_text())


@pytest.mark.parametrize("name", ["rayservice.yaml", "rayjob-batch.yaml"])
def test_manifest_matches_crd(crd_validator, name):
    crd_validator(load(name))


def test_rayservice_layout():
    spec = load("rayservice.yaml")["spec"]
    cluster = spec["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    gpu = groups["gpu-decode"]["template"]["spec"]["containers"][0]["resources"]
    assert gpu["requests"]["nvidia.com/gpu"] == gpu["limits"]["nvidia.com/gpu"] == "1"
    # the custom resource through ray start (every ray.io/v1 operator), in KubeRay's quoting
    assert json.loads(json.loads(groups["kv-memory"]["rayStartParams"]["resources"])) == {"kv_store": 1}
    assert not {"serviceUnhealthySecondThreshold", "deploymentUnhealthySecondThreshold"} & set(spec)  # ignored
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in groups.values()]
    images = {c["image"] for p in pods for c in p["spec"]["containers"]}
    assert len(images) == 1
    for pod in pods:
        for c in pod["spec"]["containers"]:
            assert {"readinessProbe", "livenessProbe", "resources", "image"} <= set(c)
    app_args = yaml.safe_load(spec["serveConfigV2"])["applications"][0]["args"]
    for group in groups.values():  # /dev/shm holds the node's arena and Ray's object store
        pod = group["template"]["spec"]
        shm = next(v for v in pod["volumes"] if v["name"] == "shm")["emptyDir"]
        container = pod["containers"][0]
        needed = app_args["kv_store_bytes"] + int(group["rayStartParams"]["object-store-memory"])
        assert _bytes(shm["sizeLimit"]) >= needed and shm["medium"] == "Memory"
        assert _bytes(container["resources"]["limits"]["memory"]) > _bytes(shm["sizeLimit"])
        assert {"containerPort": 8080, "name": "metrics"} in container["ports"]
        assert group["rayStartParams"]["metrics-export-port"] == "8080"
    worker_ready = " ".join(groups["gpu-decode"]["template"]["spec"]["containers"][0]
                            ["readinessProbe"]["exec"]["command"])
    assert "8000/-/healthz" in worker_ready  # the Serve proxy's own health route


def _bytes(quantity: str) -> int:
    """A Kubernetes quantity in Gi/Mi (what these manifests use) as bytes."""
    units = {"Gi": 1 << 30, "Mi": 1 << 20}
    return int(quantity[:-2]) * units[quantity[-2:]] if quantity[-2:] in units else int(quantity)


@pytest.mark.parametrize("text", [lambda: load("rayservice.yaml")["spec"]["serveConfigV2"],
                                  lambda: (REPO / "serve_config.yaml").read_text()],
                         ids=["rayservice-serveConfigV2", "serve_config.yaml"])
def test_serve_configs_match_serve_schema_and_app_args(text):
    from cluster.serve_app import AppArgs, app as build_app

    parsed = ServeDeploySchema.model_validate(yaml.safe_load(text()))
    (app,) = parsed.applications
    assert app.import_path == "cluster:app"
    args = AppArgs.model_validate(app.args)  # every argument is known and valid, as Serve checks it
    config = args.config
    assert config.engine.policy.name == "lsa" and 0 < config.engine.policy.budget <= 1 and config.num_workers >= 1
    worker = build_app(args)._bound_deployment.init_args[0]._bound_deployment  # the DecodeWorker deployment
    autoscaling = worker._deployment_config.autoscaling_config
    if args.decode_autoscaling:  # Serve's autoscaling_config replaces num_workers
        assert (autoscaling.min_replicas, autoscaling.max_replicas) == (args.decode_autoscaling["min_replicas"],
                                                                        args.decode_autoscaling["max_replicas"])
    else:
        assert autoscaling is None and worker.num_replicas == config.num_workers


def test_app_args_reject_unknown_and_badly_typed_arguments():
    from cluster.serve_app import AppArgs

    with pytest.raises(Exception, match="num_worker"):
        AppArgs.model_validate({"num_worker": 2})
    with pytest.raises(Exception, match="max_body_bytes"):
        AppArgs.model_validate({"max_body_bytes": "lots"}).config


def test_rayjob_runs_lsa_batch_against_the_service():
    rayservice, rayjob = load("rayservice.yaml"), load("rayjob-batch.yaml")
    entry = rayjob["spec"]["entrypoint"].split()
    assert entry[:3] == ["lsa", "batch", "/data/jobs.jsonl"]
    url = entry[entry.index("--url") + 1]
    assert url == f"http://{rayservice['metadata']['name']}-serve-svc:8000"
    assert entry[entry.index("--out") + 1] == "/data/results.jsonl"
    from cli import parse_args  # the entrypoint is a valid command line of this repository's lsa

    args = parse_args(entry[1:])
    assert (args.func.__name__, args.jobs, args.concurrency, args.retries) == ("run_batch_command",
                                                                                "/data/jobs.jsonl", 8, 5)


@pytest.mark.parametrize("name, mutate", [
    ("rayservice.yaml", _set(["spec", "rayClusterConfig", "workerGroupSpecs", 0, "minReplicas"], "one")),
    ("rayservice.yaml", _del(["spec", "rayClusterConfig", "workerGroupSpecs", 1, "groupName"])),
    ("rayservice.yaml", _set(["spec", "serveConfigV2"], {"applications": []})),
    ("rayservice.yaml", _set(["spec", "rayClusterConfig", "headGroupSpec", "rayStartParams", "num-cpus"], 0)),
    ("rayservice.yaml", _set(["spec", "rayClusterConfig", "headGroupSpec", "rayStartParam"], {})),
    ("rayjob-batch.yaml", _set(["spec", "entrypoint"], ["lsa", "batch"])),
    ("rayjob-batch.yaml", _set(["spec", "shutdownAfterJobFinishes"], "yes")),
    ("rayjob-batch.yaml", _del(["spec", "rayClusterSpec", "headGroupSpec", "template", "spec",
                                "containers", 0, "name"])),
], ids=["minReplicas-str", "no-groupName", "serveConfig-not-str", "startParam-int",
        "typo-field", "entrypoint-list", "bool-str", "container-no-name"])
def test_crd_rejects_broken_manifest(crd_validator, name, mutate):
    manifest = load(name)
    mutate(manifest)
    with pytest.raises(jsonschema.ValidationError):
        crd_validator(manifest)


@pytest.mark.parametrize("mutate", [
    lambda c: c["applications"][0].update(args="model=x"),
    lambda c: c["applications"][0].update(import_path=None),
    lambda c: c["applications"][0].update(deployments=[{"name": "w", "num_replicas": -2}]),
    lambda c: c.update(http_options={"port": "eighty"}),
    lambda c: c.update(aplications=c.pop("applications")),
], ids=["args-str", "no-import-path", "negative-replicas", "port-str", "typo-field"])
def test_serve_schema_rejects_broken_config(mutate):
    config = yaml.safe_load(load("rayservice.yaml")["spec"]["serveConfigV2"])
    mutate(config)
    with pytest.raises(ValueError):  # pydantic.ValidationError is a ValueError
        ServeDeploySchema.model_validate(config)
