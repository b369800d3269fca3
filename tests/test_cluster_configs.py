"""Offline validation of the cluster configurations in ``cluster/``: no cloud account, no Kubernetes, no Ray.

What is checked:

(a) ``cluster/aws.yaml`` and ``cluster/gcp.yaml`` pass Ray's own cluster-launcher validation, the code path of
    ``ray up``: ``validate_config(prepare_config(cfg))``. ``prepare_config`` merges the provider's ``defaults.yaml``
    shipped in the Ray wheel, and ``validate_config`` applies ``ray/autoscaler/ray-schema.json`` (no extra keys
    anywhere) plus the node-type checks. Project conventions are checked as well: CPU-0 head, ``TRAIN_DRIVER``
    offered only by on-demand CPU types, spot GPU types scaling from ``min_workers: 0``, idle timeout, the project
    mounted and ``pip install -e``'d, token auth on every node, and GCP ``scheduling`` as an object.
(b) ``cluster/kuberay/raycluster.yaml`` and ``rayjob-sweep.yaml`` validate against the vendored KubeRay v1.7.0 CRD
    schemas (``cluster/kuberay/crds/``) in strict mode: ``additionalProperties: false`` is added to every object
    that has ``properties`` and no ``x-kubernetes-preserve-unknown-fields``, as ``kubeconform -strict`` does.
    Structural checks follow: apiVersion/kind, autoscaling on with autoscaler v2, head with ``num-cpus: "0"``,
    ``minReplicas <= replicas <= maxReplicas``, requests == limits (cpu and memory) for every container, a GPU
    group requesting ``nvidia.com/gpu`` from 0 replicas, a ``TRAIN_DRIVER`` group, and token auth. Two of the
    operator's own admission checks are repeated here: the name must be a DNS-1035 label, and Ray resources must not
    be set both in ``rayStartParams`` and ``resources``. For the RayJob there are also ``shutdownAfterJobFinishes``,
    ``backoffLimit >= 1``, and a shell-safe ``bliss-ray sweep`` entrypoint whose sweep file exists (skipped while
    ``experiments/sweeps/`` is still empty).
(c) One Ray version everywhere: every image tag (launcher ``docker`` images, every container of every pod
    template, the Dockerfile's ``FROM``) and every ``rayVersion`` satisfies the ``ray[...]==X.Y.*`` pin that is
    parsed from ``pyproject.toml``, and so does the installed Ray.
(d) Deliberately broken copies, written to ``tmp_path`` by mutating the loaded documents, are rejected: a
    ``min_worker:`` typo in a launcher YAML, ``maxReplica:`` in the RayCluster, a wrong ``rayVersion`` or image tag,
    and more.
(e) The node cache: every node sets where it keeps its copies of store locations (``BLISS_CACHE_DIR``) and caps
    them (``BLISS_CACHE_MAX_GB``) at most half of its disk: the launcher node type's volume, or the KubeRay pod's
    ``emptyDir`` mounted there (the kubelet evicts a pod past its ``sizeLimit``).

Run it with ``.venv/bin/python -m pytest tests/test_cluster_configs.py -q``. It takes a few seconds and starts no Ray.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from ray.autoscaler._private.util import prepare_config, validate_config  # private: Ray is pinned exactly

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHER_YAMLS = [CLUSTER / "aws.yaml", CLUSTER / "gcp.yaml"]
RAYCLUSTER_YAML = CLUSTER / "kuberay" / "raycluster.yaml"
RAYJOB_YAML = CLUSTER / "kuberay" / "rayjob-sweep.yaml"
KUBERAY_YAMLS = [RAYCLUSTER_YAML, RAYJOB_YAML]
CRD_DIR = CLUSTER / "kuberay" / "crds"
DOCKERFILE = CLUSTER / "image" / "Dockerfile"
DRIVER_RESOURCE = "TRAIN_DRIVER"

# Image tags start with the Ray version: rayproject/ray:2.60.0-py311-gpu, ghcr.io/org/bliss-ray:2.60.0-py311-gpu.
_TAG_VERSION = re.compile(r":(\d+\.\d+\.\d+)(?:-[\w.-]+)?$")
_SHELL_META = re.compile(r"[;&|<>`$()\\\n]")


def load_yaml(path: Path) -> dict[str, Any]:
    with open(path) as f:
        return yaml.safe_load(f)


def dump_yaml(doc: dict[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------------------------
# The Ray pin
# ---------------------------------------------------------------------------------------------------------------
PYPROJECT = REPO / "pyproject.toml"


@functools.cache
def ray_pin(pyproject: Path = PYPROJECT) -> SpecifierSet:
    """The specifier of the ``ray[...]`` dependency in pyproject.toml. It must be a single ``==`` pin."""
    with open(pyproject, "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    reqs = [Requirement(d) for d in deps if Requirement(d).name == "ray"]
    assert len(reqs) == 1, f"expected exactly one ray requirement in {pyproject.name}, got {reqs}"
    spec = reqs[0].specifier
    assert len(spec) == 1 and next(iter(spec)).operator == "==", f"ray must be pinned with ==, got '{spec}'"
    return spec


def image_ray_version(image: str) -> str | None:
    m = _TAG_VERSION.search(image)
    return m.group(1) if m else None


def version_errors(where: str, version: str | None, pin: SpecifierSet) -> list[str]:
    if version is None:
        return [f"{where}: no Ray version found (tag must start with it, e.g. :2.60.0-py311-gpu)"]
    if not pin.contains(version):
        return [f"{where}: Ray {version} does not match the pyproject.toml pin ray{pin}"]
    return []


def dockerfile_base_image(path: Path) -> str:
    """The first FROM image with ``ARG NAME=default`` values (declared before it) substituted."""
    args: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if m := re.match(r"ARG\s+(\w+)=(\S+)$", line):
            args[m.group(1)] = m.group(2).strip("\"'")
        elif m := re.match(r"FROM\s+(?:--platform=\S+\s+)?(\S+)", line, re.IGNORECASE):
            return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda v: args[v.group(1) or v.group(2)], m.group(1))
    raise AssertionError(f"{path}: no FROM line")


def launcher_images(cfg: dict[str, Any]) -> list[tuple[str, str]]:
    docker = cfg.get("docker") or {}
    out = [(f"docker.{k}", docker[k]) for k in ("image", "head_image", "worker_image") if docker.get(k)]
    for name, nt in cfg.get("available_node_types", {}).items():
        if (nt.get("docker") or {}).get("worker_image"):
            out.append((f"available_node_types.{name}.docker.worker_image", nt["docker"]["worker_image"]))
    return out


def kuberay_cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc.get("spec") or {}
    return (spec.get("rayClusterSpec") or {}) if doc.get("kind") == "RayJob" else spec


def kuberay_groups(cluster_spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    groups = [("headGroupSpec", cluster_spec.get("headGroupSpec") or {})]
    groups += [
        (f"workerGroupSpecs[{g.get('groupName', i)}]", g)
        for i, g in enumerate(cluster_spec.get("workerGroupSpecs", []))
    ]
    return groups


def kuberay_containers(cluster_spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for where, group in kuberay_groups(cluster_spec):
        pod = (group.get("template") or {}).get("spec") or {}
        for kind in ("initContainers", "containers"):
            out += [(f"{where}.{kind}[{c.get('name')}]", c) for c in pod.get(kind) or []]
    return out


def kuberay_images(doc: dict[str, Any]) -> list[tuple[str, str]]:
    spec = kuberay_cluster_spec(doc)
    out = [(where, c["image"]) for where, c in kuberay_containers(spec) if c.get("image")]
    if (spec.get("autoscalerOptions") or {}).get("image"):
        out.append(("autoscalerOptions.image", spec["autoscalerOptions"]["image"]))
    return out


def ray_version_errors(
    launcher: list[Path], kuberay: list[Path], dockerfiles: list[Path], pyproject: Path = PYPROJECT
) -> list[str]:
    """(c): every image tag and rayVersion must satisfy the pyproject pin."""
    pin = ray_pin(pyproject)
    errors = []
    for path in launcher:
        for where, image in launcher_images(load_yaml(path)):
            errors += version_errors(f"{path.name}:{where} ({image})", image_ray_version(image), pin)
    for path in kuberay:
        doc = load_yaml(path)
        errors += version_errors(f"{path.name}:rayVersion", kuberay_cluster_spec(doc).get("rayVersion"), pin)
        for where, image in kuberay_images(doc):
            errors += version_errors(f"{path.name}:{where} ({image})", image_ray_version(image), pin)
    for path in dockerfiles:
        image = dockerfile_base_image(path)
        errors += version_errors(f"{path.name}: FROM {image}", image_ray_version(image), pin)
    return errors


# ---------------------------------------------------------------------------------------------------------------
# (a) Launcher YAMLs
# ---------------------------------------------------------------------------------------------------------------
def validate_launcher(path: Path) -> dict[str, Any]:
    """What ``ray up`` does before touching the cloud. Raises jsonschema.ValidationError / ValueError."""
    prepared = prepare_config(copy.deepcopy(load_yaml(path)))
    validate_config(prepared)
    return prepared


def _is_spot(provider: str, node_config: dict[str, Any]) -> bool:
    if provider == "aws":
        return (node_config.get("InstanceMarketOptions") or {}).get("MarketType", "").lower() == "spot"
    scheduling = node_config.get("scheduling") or {}
    if not isinstance(scheduling, dict):
        return False
    return scheduling.get("provisioningModel") == "SPOT" or scheduling.get("preemptible") is True


def _has_gpu(provider: str, node_type: dict[str, Any]) -> bool:
    if node_type.get("resources", {}).get("GPU", 0) > 0:
        return True
    nc = node_type["node_config"]
    if provider == "aws":
        return bool(re.match(r"(g\d|p\d)", nc.get("InstanceType", "")))
    return bool(nc.get("guestAccelerators"))


def launcher_convention_errors(cfg: dict[str, Any]) -> list[str]:
    """Project conventions on a prepared launcher config (see the module docstring, item a)."""
    errors = []
    provider = cfg["provider"]["type"]
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    if head.get("resources", {}).get("CPU") != 0:
        errors.append("head node type must have resources CPU 0 so no task or actor lands on it")
    if not cfg.get("idle_timeout_minutes"):
        errors.append("idle_timeout_minutes must be set (> 0) so idle workers are terminated")
    if not (cfg.get("docker") or {}).get("image"):
        errors.append("docker.image must be set (the Ray image pinned to the pyproject version)")
    workers = {n: t for n, t in types.items() if n != cfg["head_node_type"]}
    drivers = [n for n, t in workers.items() if t.get("resources", {}).get(DRIVER_RESOURCE, 0) > 0]
    gpus = [n for n, t in workers.items() if _has_gpu(provider, t)]
    if not drivers:
        errors.append(f"no worker node type offers the {DRIVER_RESOURCE} resource for Tune trial drivers")
    if not gpus:
        errors.append("no GPU worker node type")
    if DRIVER_RESOURCE in head.get("resources", {}):
        errors.append(f"the head must not offer {DRIVER_RESOURCE}")
    for name in drivers:
        if _is_spot(provider, workers[name]["node_config"]) or name in gpus:
            errors.append(f"{name}: {DRIVER_RESOURCE} nodes must be on-demand CPU nodes (drivers must survive spot)")
    for name in gpus:
        t = workers[name]
        if not _is_spot(provider, t["node_config"]):
            errors.append(f"{name}: GPU workers are expected to be spot")
        if t.get("min_workers", 0) != 0 or t.get("max_workers", 0) < 1:
            errors.append(f"{name}: GPU workers must autoscale from min_workers 0 to max_workers >= 1")
    if provider == "gcp":
        for name, t in types.items():
            if "scheduling" in t["node_config"] and not isinstance(t["node_config"]["scheduling"], dict):
                errors.append(f"{name}: GCE scheduling must be an object, not a list (ray-project/ray#46248)")
    if cfg.get("file_mounts", {}).get("~/bliss_ray") != ".":
        errors.append("file_mounts must ship the repository ('~/bliss_ray': '.')")
    if not any("pip install" in c and "-e ~/bliss_ray" in c for c in cfg.get("setup_commands", [])):
        errors.append("setup_commands must `pip install -e ~/bliss_ray`")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        if not any("RAY_AUTH_MODE=token" in c for c in cfg.get(key, [])):
            errors.append(f"{key} must start Ray with RAY_AUTH_MODE=token")
    return errors


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_launcher_yaml_passes_ray_validation(path: Path) -> None:
    prepared = validate_launcher(path)
    assert launcher_convention_errors(prepared) == []


# ---------------------------------------------------------------------------------------------------------------
# (b) KubeRay manifests
# ---------------------------------------------------------------------------------------------------------------
def strict(schema: Any) -> Any:
    """kubeconform -strict: no unknown fields where the schema lists the known ones."""
    if isinstance(schema, dict):
        if (
            schema.get("type") == "object"
            and "properties" in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema.setdefault("additionalProperties", False)
        for v in schema.values():
            strict(v)
    elif isinstance(schema, list):
        for v in schema:
            strict(v)
    return schema


@functools.cache
def crd_validators() -> dict[tuple[str, str], jsonschema.Draft7Validator]:
    """(apiVersion, kind) -> strict validator, for every served version of every vendored CRD."""
    validators = {}
    for path in sorted(CRD_DIR.glob("*.json")):
        crd = json.loads(path.read_text())
        assert crd["kind"] == "CustomResourceDefinition", path
        for version in crd["spec"]["versions"]:
            if version.get("served"):
                schema = strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
                jsonschema.Draft7Validator.check_schema(schema)
                key = (f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])
                validators[key] = jsonschema.Draft7Validator(schema)
    return validators


def kuberay_schema_errors(doc: dict[str, Any]) -> list[str]:
    validator = crd_validators().get((doc.get("apiVersion"), doc.get("kind")))
    if validator is None:
        return [f"no vendored CRD for apiVersion={doc.get('apiVersion')!r} kind={doc.get('kind')!r}"]
    return [
        f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    ]


def _quantity(resources: dict[str, Any], kind: str, name: str) -> str | None:
    value = (resources.get(kind) or {}).get(name)
    return None if value is None else str(value)


def kuberay_structure_errors(doc: dict[str, Any]) -> list[str]:
    """Structural checks beyond the CRD schema (see the module docstring, item b)."""
    errors = []
    if doc.get("apiVersion") != "ray.io/v1" or doc.get("kind") not in ("RayCluster", "RayJob"):
        return [
            f"expected apiVersion ray.io/v1 and kind RayCluster/RayJob, got {doc.get('apiVersion')} {doc.get('kind')}"
        ]
    # The operator's own admission checks (kuberay v1.7.0 ray-operator/controllers/ray/utils/validation.go).
    name = (doc.get("metadata") or {}).get("name", "")
    max_len = 53 if doc["kind"] == "RayCluster" else 47
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) or len(name) > max_len:
        errors.append(f"metadata.name {name!r} must be a DNS-1035 label of at most {max_len} characters")
    spec = kuberay_cluster_spec(doc)
    for where, group in kuberay_groups(spec):
        start = group.get("rayStartParams") or {}
        if group.get("resources") and any(start.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")):
            errors.append(f"{where}: set Ray resources in rayStartParams or in resources, not both")
    if spec.get("enableInTreeAutoscaling") is not True:
        errors.append("enableInTreeAutoscaling must be true")
    if (spec.get("autoscalerOptions") or {}).get("version") != "v2":
        errors.append("autoscalerOptions.version must be v2")
    if (spec.get("authOptions") or {}).get("mode") != "token":
        errors.append("authOptions.mode must be token")
    head = spec.get("headGroupSpec") or {}
    if str((head.get("rayStartParams") or {}).get("num-cpus")) != "0":
        errors.append('headGroupSpec.rayStartParams.num-cpus must be "0" (nothing scheduled on the head)')
    for where, group in kuberay_groups(spec)[1:]:
        lo, hi = group.get("minReplicas"), group.get("maxReplicas")
        if not isinstance(lo, int) or not isinstance(hi, int) or lo > hi:
            errors.append(f"{where}: need integer minReplicas <= maxReplicas, got {lo}, {hi}")
        elif "replicas" in group and not lo <= group["replicas"] <= hi:
            errors.append(f"{where}: replicas {group['replicas']} outside [{lo}, {hi}]")
    containers = kuberay_containers(spec)
    if not any(where.startswith("headGroupSpec.containers") for where, _ in containers):
        errors.append("headGroupSpec has no container")
    for where, c in containers:
        res = c.get("resources") or {}
        if not res.get("requests") or not res.get("limits"):
            errors.append(f"{where}: resources.requests and resources.limits are both required")
            continue
        for name in ("cpu", "memory"):
            if _quantity(res, "requests", name) is None or _quantity(res, "limits", name) is None:
                errors.append(f"{where}: {name} request and limit are required")
        if res["requests"] != res["limits"]:
            errors.append(f"{where}: requests must equal limits (Guaranteed QoS; Ray sizes itself from limits)")
    gpu_groups = []
    driver_groups = []
    for where, group in kuberay_groups(spec)[1:]:
        pod_containers = ((group.get("template") or {}).get("spec") or {}).get("containers") or []
        ray_res = (pod_containers[0].get("resources") or {}) if pod_containers else {}
        if _quantity(ray_res, "limits", "nvidia.com/gpu") or _quantity(ray_res, "requests", "nvidia.com/gpu"):
            gpu_groups.append(where)
            if not (
                _quantity(ray_res, "limits", "nvidia.com/gpu") and _quantity(ray_res, "requests", "nvidia.com/gpu")
            ):
                errors.append(f"{where}: nvidia.com/gpu must be in both requests and limits")
            if group.get("minReplicas") != 0:
                errors.append(f"{where}: GPU groups must scale from minReplicas 0")
        if DRIVER_RESOURCE in (group.get("resources") or {}):
            driver_groups.append(where)
    if not gpu_groups:
        errors.append("no worker group requests nvidia.com/gpu")
    if not driver_groups:
        errors.append(f"no worker group offers the {DRIVER_RESOURCE} resource")
    if set(gpu_groups) & set(driver_groups):
        errors.append(f"{DRIVER_RESOURCE} must be offered by CPU (on-demand) groups, not GPU groups")
    if DRIVER_RESOURCE in (head.get("resources") or {}):
        errors.append(f"the head must not offer {DRIVER_RESOURCE}")
    if doc["kind"] == "RayJob":
        job = doc["spec"]
        if job.get("shutdownAfterJobFinishes") is not True:
            errors.append("RayJob: shutdownAfterJobFinishes must be true (ephemeral cluster)")
        if not isinstance(job.get("backoffLimit"), int) or job["backoffLimit"] < 1:
            errors.append("RayJob: backoffLimit must be >= 1 (the sweep resumes itself from the bucket)")
        entrypoint = job.get("entrypoint", "")
        if not entrypoint.startswith("bliss-ray sweep experiments/sweeps/"):
            errors.append(f"RayJob: entrypoint must run `bliss-ray sweep experiments/sweeps/...`, got {entrypoint!r}")
        if not re.search(r"--out (s3|gs)://", entrypoint):  # run roots and (by default) Tune's storage
            errors.append("RayJob: entrypoint needs --out s3://... or gs://... (the cluster is deleted afterwards)")
        if re.search(r"--storage (?!s3://|gs://)", entrypoint):
            errors.append("RayJob: --storage, when given, must be s3://... or gs://...")
        if _SHELL_META.search(entrypoint):
            errors.append("RayJob: entrypoint must not contain shell operators (KubeRay pastes it unquoted)")
    return errors


@pytest.mark.parametrize("path", KUBERAY_YAMLS, ids=lambda p: p.name)
def test_kuberay_manifest_passes_strict_crd_schema(path: Path) -> None:
    assert kuberay_schema_errors(load_yaml(path)) == []


@pytest.mark.parametrize("path", KUBERAY_YAMLS, ids=lambda p: p.name)
def test_kuberay_manifest_structure(path: Path) -> None:
    assert kuberay_structure_errors(load_yaml(path)) == []


def test_vendored_crds_are_the_served_v1_schemas() -> None:
    assert set(crd_validators()) == {("ray.io/v1", "RayCluster"), ("ray.io/v1", "RayJob")}
    total = sum(p.stat().st_size for p in CRD_DIR.iterdir())
    assert total < 3 * 2**20, f"vendored CRDs are {total} bytes; keep them trimmed"
    assert "Apache" in (CRD_DIR / "README.md").read_text()


def test_rayjob_sweep_file_exists() -> None:
    sweep = load_yaml(RAYJOB_YAML)["spec"]["entrypoint"].split()[2]
    if not any((REPO / "experiments" / "sweeps").glob("*.y*ml")):
        pytest.skip("experiments/sweeps/ has no sweep files yet")
    assert (REPO / sweep).is_file(), f"the RayJob runs {sweep}, which does not exist"


# ---------------------------------------------------------------------------------------------------------------
# (c) One Ray version everywhere
# ---------------------------------------------------------------------------------------------------------------
def test_ray_version_consistent_everywhere() -> None:
    assert ray_version_errors(LAUNCHER_YAMLS, KUBERAY_YAMLS, [DOCKERFILE]) == []
    # Sanity: every file really contributed something to the check.
    assert all(launcher_images(load_yaml(p)) for p in LAUNCHER_YAMLS)
    assert all(kuberay_images(load_yaml(p)) for p in KUBERAY_YAMLS)


def test_installed_ray_matches_pin() -> None:
    import ray

    assert ray_pin().contains(ray.__version__), f"installed Ray {ray.__version__} vs pin ray{ray_pin()}"


def test_pin_is_read_from_pyproject(tmp_path: Path) -> None:
    """The expected version comes from pyproject.toml: bumping the pin alone makes every config fail."""
    text = PYPROJECT.read_text()
    bumped = tmp_path / "pyproject.toml"
    bumped.write_text(re.sub(r'"ray\[([^\]]*)\]==[^"]+"', r'"ray[\1]==1.99.*"', text, count=1))
    errors = ray_version_errors(LAUNCHER_YAMLS, KUBERAY_YAMLS, [DOCKERFILE], pyproject=bumped)
    n_images = sum(len(launcher_images(load_yaml(p))) for p in LAUNCHER_YAMLS)
    n_images += sum(len(kuberay_images(load_yaml(p))) + 1 for p in KUBERAY_YAMLS)  # + rayVersion
    assert len(errors) == n_images + 1 and all("1.99.*" in e for e in errors), errors
    loose = tmp_path / "loose" / "pyproject.toml"
    loose.parent.mkdir()
    loose.write_text(re.sub(r'"ray\[([^\]]*)\]==[^"]+"', r'"ray[\1]>=2.50"', text, count=1))
    with pytest.raises(AssertionError, match="pinned with =="):
        ray_pin(loose)


# ---------------------------------------------------------------------------------------------------------------
# (d) Broken copies are rejected
# ---------------------------------------------------------------------------------------------------------------
def _first_gpu_type(cfg: dict[str, Any]) -> str:
    provider = cfg["provider"]["type"]
    return next(
        n for n, t in cfg["available_node_types"].items() if n != cfg["head_node_type"] and _has_gpu(provider, t)
    )


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_launcher_typo_is_rejected(path: Path, tmp_path: Path) -> None:
    cfg = load_yaml(path)
    node_type = cfg["available_node_types"][_first_gpu_type(cfg)]
    node_type["min_worker"] = node_type.pop("min_workers")
    with pytest.raises(jsonschema.ValidationError, match="Additional properties are not allowed"):
        validate_launcher(dump_yaml(cfg, tmp_path / path.name))


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_launcher_min_workers_over_global_max_is_rejected(path: Path, tmp_path: Path) -> None:
    cfg = load_yaml(path)
    cfg["available_node_types"][_first_gpu_type(cfg)]["min_workers"] = cfg["max_workers"] + 1
    with pytest.raises(ValueError, match="max_workers"):
        validate_launcher(dump_yaml(cfg, tmp_path / path.name))


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda c: c["available_node_types"][c["head_node_type"]]["resources"].pop("CPU"), "CPU 0"),
        (lambda c: c.__setitem__("idle_timeout_minutes", 0), "idle_timeout_minutes"),
        (lambda c: c["available_node_types"][_first_gpu_type(c)].__setitem__("min_workers", 1), "min_workers 0"),
        (lambda c: c.__setitem__("head_start_ray_commands", ["ray start --head"]), "RAY_AUTH_MODE=token"),
        (lambda c: c.__setitem__("setup_commands", []), "pip install -e"),
    ],
    ids=["head-has-cpus", "no-idle-timeout", "gpu-min-workers", "no-token-auth", "no-install"],
)
@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_launcher_convention_violations_are_reported(path: Path, mutate, expected: str, tmp_path: Path) -> None:
    cfg = load_yaml(path)
    mutate(cfg)
    prepared = validate_launcher(dump_yaml(cfg, tmp_path / path.name))  # still valid for Ray itself
    assert any(expected in e for e in launcher_convention_errors(prepared))


def test_launcher_spot_driver_nodes_are_reported(tmp_path: Path) -> None:
    cfg = load_yaml(CLUSTER / "aws.yaml")
    driver = next(n for n, t in cfg["available_node_types"].items() if DRIVER_RESOURCE in t.get("resources", {}))
    cfg["available_node_types"][driver]["node_config"]["InstanceMarketOptions"] = {"MarketType": "spot"}
    prepared = validate_launcher(dump_yaml(cfg, tmp_path / "aws.yaml"))
    assert any("on-demand" in e for e in launcher_convention_errors(prepared))


def test_gcp_scheduling_list_is_reported(tmp_path: Path) -> None:
    cfg = load_yaml(CLUSTER / "gcp.yaml")
    cfg["available_node_types"][_first_gpu_type(cfg)]["node_config"]["scheduling"] = [
        {"preemptible": True},
        {"onHostMaintenance": "TERMINATE"},
    ]
    prepared = validate_launcher(dump_yaml(cfg, tmp_path / "gcp.yaml"))
    assert any("#46248" in e for e in launcher_convention_errors(prepared))


def _gpu_group(doc: dict[str, Any]) -> dict[str, Any]:
    groups = kuberay_cluster_spec(doc)["workerGroupSpecs"]
    return next(g for g in groups if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"])


def test_raycluster_maxreplica_typo_is_rejected(tmp_path: Path) -> None:
    doc = load_yaml(RAYCLUSTER_YAML)
    group = _gpu_group(doc)
    group["maxReplica"] = group.pop("maxReplicas")
    errors = kuberay_schema_errors(load_yaml(dump_yaml(doc, tmp_path / "raycluster.yaml")))
    assert any("'maxReplicas' is a required property" in e for e in errors), errors
    assert any("'maxReplica' was unexpected" in e for e in errors), errors


@pytest.mark.parametrize(
    ("path", "mutate", "expected"),
    [
        (
            RAYCLUSTER_YAML,
            lambda d: d["spec"].__setitem__("enableInTreeAutoscaling", "yes"),
            "is not of type 'boolean'",
        ),
        (RAYCLUSTER_YAML, lambda d: d["spec"]["autoscalerOptions"].__setitem__("version", "v3"), "is not one of"),
        (RAYCLUSTER_YAML, lambda d: d["spec"].__setitem__("rayVersoin", "2.60.0"), "'rayVersoin' was unexpected"),
        (
            RAYCLUSTER_YAML,
            lambda d: _gpu_group(d)["template"]["spec"]["containers"][0].__setitem__("resource", {}),
            "'resource' was unexpected",
        ),
        (RAYCLUSTER_YAML, lambda d: d["spec"]["authOptions"].__setitem__("mode", "tokens"), "is not one of"),
        (RAYJOB_YAML, lambda d: d["spec"].__setitem__("shutdownAfterJobFinish", True), "was unexpected"),
        (RAYJOB_YAML, lambda d: d["spec"]["rayClusterSpec"].pop("headGroupSpec"), "'headGroupSpec' is a required"),
    ],
    ids=["bool-type", "autoscaler-enum", "rayVersion-typo", "container-typo", "auth-enum", "rayjob-typo", "no-head"],
)
def test_kuberay_schema_violations_are_rejected(path: Path, mutate, expected: str, tmp_path: Path) -> None:
    doc = load_yaml(path)
    mutate(doc)
    errors = kuberay_schema_errors(load_yaml(dump_yaml(doc, tmp_path / path.name)))
    assert any(expected in e for e in errors), errors


def _set_gpu_min_max(doc: dict[str, Any], lo: int, hi: int) -> None:
    _gpu_group(doc).update(minReplicas=lo, maxReplicas=hi, replicas=lo)


def _drop_limits(doc: dict[str, Any]) -> None:
    del kuberay_cluster_spec(doc)["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]


def _drop_gpu(doc: dict[str, Any]) -> None:
    """No group asks for a GPU any more (the cluster has two GPU groups: L4 and A100)."""
    for group in kuberay_cluster_spec(doc)["workerGroupSpecs"]:
        for kind in ("requests", "limits"):
            group["template"]["spec"]["containers"][0]["resources"][kind].pop("nvidia.com/gpu", None)


@pytest.mark.parametrize(
    ("path", "mutate", "expected"),
    [
        (RAYCLUSTER_YAML, lambda d: _set_gpu_min_max(d, 5, 2), "minReplicas <= maxReplicas"),
        (RAYCLUSTER_YAML, lambda d: d["spec"]["autoscalerOptions"].__setitem__("version", "v1"), "must be v2"),
        (RAYCLUSTER_YAML, lambda d: d["spec"].__setitem__("enableInTreeAutoscaling", False), "must be true"),
        (RAYCLUSTER_YAML, _drop_limits, "requests and resources.limits"),
        (RAYCLUSTER_YAML, _drop_gpu, "nvidia.com/gpu"),
        (RAYCLUSTER_YAML, lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].clear(), "num-cpus"),
        (RAYCLUSTER_YAML, lambda d: d["spec"].pop("authOptions"), "token"),
        (RAYJOB_YAML, lambda d: d["spec"].__setitem__("backoffLimit", 0), "backoffLimit"),
        (RAYJOB_YAML, lambda d: d["spec"].__setitem__("shutdownAfterJobFinishes", False), "shutdownAfterJobFinishes"),
        (
            RAYJOB_YAML,
            lambda d: d["spec"].__setitem__("entrypoint", "cd /x && " + d["spec"]["entrypoint"]),
            "entrypoint",
        ),
        (
            RAYJOB_YAML,
            lambda d: d["spec"].__setitem__("entrypoint", d["spec"]["entrypoint"].replace("--out s3://", "--out /h/")),
            "--out s3://",
        ),
        (RAYJOB_YAML, lambda d: _set_gpu_min_max(d, 3, 1), "minReplicas <= maxReplicas"),
        (RAYJOB_YAML, lambda d: d["metadata"].__setitem__("name", "Bliss_Sweep"), "DNS-1035"),
        (RAYCLUSTER_YAML, lambda d: d["spec"]["headGroupSpec"].__setitem__("resources", {"CPU": "0"}), "not both"),
    ],
    ids=[
        "min-gt-max",
        "autoscaler-v1",
        "autoscaling-off",
        "no-limits",
        "no-gpu",
        "head-cpus",
        "no-auth",
        "no-retries",
        "no-shutdown",
        "shell-entrypoint",
        "local-out",
        "rayjob-min-gt-max",
        "bad-name",
        "resources-twice",
    ],
)
def test_kuberay_structure_violations_are_rejected(path: Path, mutate, expected: str, tmp_path: Path) -> None:
    doc = load_yaml(path)
    mutate(doc)
    doc = load_yaml(dump_yaml(doc, tmp_path / path.name))
    assert any(expected in e for e in kuberay_structure_errors(doc))


def test_wrong_ray_version_is_rejected(tmp_path: Path) -> None:
    cluster = load_yaml(RAYCLUSTER_YAML)
    cluster["spec"]["rayVersion"] = "2.49.0"
    job = load_yaml(RAYJOB_YAML)
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["image"] = (
        "rayproject/ray:2.59.1-py311-gpu"
    )
    errors = ray_version_errors(
        [], [dump_yaml(cluster, tmp_path / "raycluster.yaml"), dump_yaml(job, tmp_path / "rayjob.yaml")], []
    )
    assert any("raycluster.yaml:rayVersion" in e and "2.49.0" in e for e in errors), errors
    assert any("rayjob.yaml:workerGroupSpecs" in e and "2.59.1" in e for e in errors), errors
    assert len(errors) == 2, errors


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_wrong_launcher_image_is_rejected(path: Path, tmp_path: Path) -> None:
    cfg = load_yaml(path)
    cfg["docker"]["image"] = "rayproject/ray-ml:2.49.0-py311-gpu"
    broken = dump_yaml(cfg, tmp_path / path.name)
    validate_launcher(broken)  # Ray's validator cannot know the pin...
    assert any("2.49.0" in e for e in ray_version_errors([broken], [], []))  # ...this check does
    cfg["docker"]["image"] = "rayproject/ray:latest-gpu"
    assert any("no Ray version" in e for e in ray_version_errors([dump_yaml(cfg, broken)], [], []))


def test_wrong_dockerfile_base_is_rejected(tmp_path: Path) -> None:
    text = DOCKERFILE.read_text()
    assert dockerfile_base_image(DOCKERFILE).startswith("rayproject/ray:")
    broken = tmp_path / "Dockerfile"
    broken.write_text(re.sub(r"ARG RAY_VERSION=\S+", "ARG RAY_VERSION=2.61.0", text))
    assert any("2.61.0" in e for e in ray_version_errors([], [], [broken]))
    broken.write_text("FROM rayproject/ray:2.58.0-py311-gpu\n")
    assert any("2.58.0" in e for e in ray_version_errors([], [], [broken]))


def test_sweep_manifest_gpu_ceiling_holds_its_concurrent_trials() -> None:
    """The RayJob's GPU worker group can grow to what the sweep runs at once: max_concurrent_trials × the GPUs one
    trial's Train stage takes (its base preset's workers, one GPU each). Fewer would leave a trial pending."""
    from bliss_ray.config import load_experiment

    doc = load_yaml(RAYJOB_YAML)
    sweep = load_yaml(REPO / doc["spec"]["entrypoint"].split()[2])
    base = load_experiment(REPO / sweep["base"], sweep.get("overrides", {}))
    per_trial = max(base.resources.train_workers, base.resources.bilevel_workers)
    group = _gpu_group(doc)
    per_pod = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert group["maxReplicas"] * per_pod >= sweep["max_concurrent_trials"] * per_trial


# ---- GPU-typed placement: what each cluster serves, and every shipped study placed on it -------------------------

CLUSTERS = [*LAUNCHER_YAMLS, RAYCLUSTER_YAML, RAYJOB_YAML]
STUDIES = [
    *sorted((REPO / "experiments" / "paper").glob("*.yaml")),
    *[REPO / "experiments" / "sweeps" / f"{n}.yaml" for n in ("table2_proxy_sigmoid", "table3_score_init")],
    REPO / "experiments" / "sweeps" / "gamma_lambda.yaml",
]


def cluster_gpu_types(path: Path) -> set[str]:
    """The ``resources.gpu_type`` values a cluster config's node types serve: their ``accelerator_type:<X>``
    resources (what the autoscaler knows before any node is up)."""
    from bliss_ray.costs.memory import DEVICES

    ours = {d.ray_type: name for name, d in DEVICES.items() if d.ray_type}
    doc = load_yaml(path)
    if "available_node_types" in doc:
        declared = [t.get("resources") or {} for t in doc["available_node_types"].values()]
    else:
        declared = [g.get("resources") or {} for g in kuberay_cluster_spec(doc)["workerGroupSpecs"]]
    keys = {k.split(":", 1)[1] for d in declared for k in d if k.startswith("accelerator_type:")}
    assert keys <= set(ours), f"{path.name}: unknown accelerator types {keys - set(ours)}"
    return {ours[k] for k in keys}


def _arms(path: Path, overrides: dict | None = None) -> dict:
    from bliss_ray.config import load_experiment
    from bliss_ray.studies.sweep_spec import load_sweep

    if "space" in load_yaml(path):
        return load_sweep(path, overrides).arms()
    return {path.stem: load_experiment(path, overrides or {})}


def test_every_cluster_declares_the_gpu_types_it_serves() -> None:
    assert cluster_gpu_types(CLUSTER / "aws.yaml") == {"A10G-24GB", "A100-40GB"}
    assert cluster_gpu_types(CLUSTER / "gcp.yaml") == {"L4-24GB"}
    for path in (RAYCLUSTER_YAML, RAYJOB_YAML):
        assert cluster_gpu_types(path) == {"L4-24GB", "A100-40GB"}, path.name


@pytest.mark.parametrize("study", STUDIES, ids=lambda p: p.stem)
def test_every_shipped_study_fits_every_cluster_that_serves_its_gpu_types(study: Path) -> None:
    """Each arm's stages (on ``resources.gpu_type`` / ``gpu_types``) are served by at least one shipped cluster, and
    on those the memory plan fits: the check `bliss-ray run`, `sweep` and `compare` make before they start."""
    from bliss_ray.costs.planner import check_fits, stage_devices

    for arm, exp in _arms(study).items():
        devices = set(stage_devices(exp).values())
        serving = [c.name for c in CLUSTERS if devices <= cluster_gpu_types(c)]
        assert serving, f"{study.name}, {arm}: no shipped cluster serves {sorted(devices)}"
        check_fits(exp, arm=arm)


def test_the_rayjobs_sweep_is_served_by_its_own_cluster() -> None:
    """The RayJob's entrypoint (its sweep and --set) places every arm on GPU types its own cluster declares."""
    from bliss_ray.config import parse_overrides
    from bliss_ray.costs.planner import check_fits, stage_devices

    words = load_yaml(RAYJOB_YAML)["spec"]["entrypoint"].split()
    sets = parse_overrides([words[i + 1] for i, w in enumerate(words) if w == "--set"])
    for arm, exp in _arms(REPO / words[2], sets).items():
        assert set(stage_devices(exp).values()) <= cluster_gpu_types(RAYJOB_YAML), arm
        check_fits(exp, arm=arm)


# ---------------------------------------------------------------------------------------------------------------
# (e) The node cache
# ---------------------------------------------------------------------------------------------------------------
_QUANTITY_BYTES = {"Gi": 2**30, "Ti": 2**40, "G": 10**9, "T": 10**12}


def _docker_env(options: list[str], name: str) -> str | None:
    """The value docker run options (``-e NAME=value``) give ``name``."""
    found = [o.split("=", 1)[1] for o in options if o.startswith(f"-e {name}=")]
    return found[-1] if found else None


def _cap_errors(where: str, cap_gb: str | None, disk_bytes: int) -> list[str]:
    if cap_gb is None:
        return [f"{where}: BLISS_CACHE_MAX_GB is not set"]
    if float(cap_gb) * 10**9 > disk_bytes / 2:
        return [f"{where}: BLISS_CACHE_MAX_GB={cap_gb} is over half of its {disk_bytes / 2**30:.0f} GiB"]
    return []


def node_cache_errors(doc: dict[str, Any]) -> list[str]:
    """(e) for a launcher config or a KubeRay manifest."""
    errors = []
    if "available_node_types" in doc:
        docker = doc.get("docker") or {}
        if not _docker_env(docker.get("run_options") or [], "BLISS_CACHE_DIR"):
            errors.append("docker.run_options must set BLISS_CACHE_DIR on every node")
        for name, t in doc["available_node_types"].items():
            head = name == doc["head_node_type"]
            options = docker.get("head_run_options") if head else (t.get("docker") or {}).get("worker_run_options")
            nc = t["node_config"]
            disk_gib = nc["BlockDeviceMappings"][0]["Ebs"]["VolumeSize"] if "BlockDeviceMappings" in nc else None
            disk_gib = disk_gib or nc["disks"][0]["initializeParams"]["diskSizeGb"]  # GCE's GB are GiB
            errors += _cap_errors(name, _docker_env(options or [], "BLISS_CACHE_MAX_GB"), disk_gib * 2**30)
        return errors
    for where, group in kuberay_groups(kuberay_cluster_spec(doc)):
        pod = group["template"]["spec"]
        container = pod["containers"][0]
        env = {e["name"]: e.get("value") for e in container.get("env") or []}
        mounted = {m["mountPath"]: m["name"] for m in container.get("volumeMounts") or []}
        volume = {v["name"]: v for v in pod.get("volumes") or []}.get(mounted.get(env.get("BLISS_CACHE_DIR")), {})
        size = str((volume.get("emptyDir") or {}).get("sizeLimit", ""))
        if not (m := re.fullmatch(r"(\d+)(Gi|Ti|G|T)", size)):
            errors.append(f"{where}: BLISS_CACHE_DIR must be an emptyDir volume with a sizeLimit in G/Gi/T/Ti")
            continue
        errors += _cap_errors(where, env.get("BLISS_CACHE_MAX_GB"), int(m[1]) * _QUANTITY_BYTES[m[2]])
    return errors


@pytest.mark.parametrize("path", [*LAUNCHER_YAMLS, *KUBERAY_YAMLS], ids=lambda p: p.name)
def test_every_node_sets_its_cache_dir_and_caps_it_within_its_disk(path: Path) -> None:
    assert node_cache_errors(load_yaml(path)) == []


def test_a_node_cache_without_a_cap_or_over_its_disk_is_reported() -> None:
    aws = load_yaml(CLUSTER / "aws.yaml")
    aws["available_node_types"][_first_gpu_type(aws)]["docker"]["worker_run_options"] = ["-e BLISS_CACHE_MAX_GB=900"]
    aws["docker"]["head_run_options"] = []
    assert [e.split(":")[0] for e in node_cache_errors(aws)] == [aws["head_node_type"], _first_gpu_type(aws)]
    job = load_yaml(RAYJOB_YAML)
    _gpu_group(job)["template"]["spec"]["volumes"] = []
    assert any("emptyDir" in e for e in node_cache_errors(job))
