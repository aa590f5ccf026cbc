"""Checks the rendered Kubernetes manifests and the example custom resources, offline.

Run by `cargo xtask check-manifests` (and so by `cargo xtask test`) with the pinned tools of
xtask/src/manifests.rs:

  check.py --kubernetes 1.33.0 --mesh-agent BIN --examples DIR RENDERED.yaml...

1. Every object of every rendering passes kubernetes-validate's strict schemas for that
   Kubernetes version (an unknown field or a wrong type is an error), except the custom
   resources, which its schemas do not know.
2. What a pod template refers to (ConfigMaps, Secrets, the ServiceAccount) is in the same
   rendering and namespace (kustomize renames generated objects; a stale reference would
   only fail on a cluster), but for the objects an installer makes by hand (MADE_AT_INSTALL).
3. The agent configuration in every rendering's mesh-agent-config ConfigMap passes
   `mesh-agent config check --source kubernetes` (the agent block only), and agrees with the
   DaemonSet beside it: the agent runs `--source=kubernetes` with an API token and the host's
   PID namespace, and every file or directory the configuration names is under one of the
   container's mounts.
4. Every example custom resource validates against its CustomResourceDefinition's
   openAPIV3Schema, every kind has an example, and each example, turned into the file
   config's form, passes `mesh-agent config check`. Each applies to the walkthrough's demo
   (deploy/kubernetes/demo): its namespace is rendered, its selector picks pods of a
   workload there, its TrafficPolicy names a Service there.
5. Every CRD has the agent's fields, no more, no fewer, at every level: an unknown field put
   at that level of a resource that sets every field makes `mesh-agent config check` list
   the fields it accepts there (serde's "expected one of"), which must be the schema's.
6. The node clean-up (deploy/kubernetes/uninstall) removes the pins the installs make: its
   `mesh-agent uninstall --name` is every rendering's agent.bpfName, with the same image, and
   it mounts the host's bpffs and runtime state where the agent has them.

And the checks must refuse deliberately broken copies of the real objects (an unknown
field, a wrong type, a CRD with a field too many or too few), so a check that silently
accepts everything fails.
Errors name the file and the object; the exit status is 1 if there is any.
"""

import argparse
import copy
import os
import re
import subprocess
import sys
import tempfile

import jsonschema
import kubernetes_validate
import yaml

GROUP = "mesh.example.dev"
AGENT_CONFIG = "mesh-agent-config"
AGENT_DAEMONSET = "mesh-agent"
UNINSTALL_DAEMONSET = "mesh-uninstall"
KUBERNETES_SOURCE = "--source=kubernetes"
# Where the agent keeps what `mesh-agent uninstall` removes (mesh-agent/src/ebpf/mod.rs
# pin_root, tunnel/mesh.rs dev_ca_dir).
NODE_STATE = ["/sys/fs/bpf", "/run/mesh-agent"]
# A field no config has, and how the agent refuses it: `... unknown field `X`, expected one
# of a, b, c` (or `expected `a`` when a block has one field).
PROBE_FIELD = "zzzNotAField"
# Objects the base refers to but never holds: the CA's key, which an overlay's generator or
# `kubectl create secret` makes at install (README, "Kubernetes").
MADE_AT_INSTALL = {("Secret", "mesh-system", "mesh-ca")}
EXPECTED = re.compile(r"unknown field `" + PROBE_FIELD + r"`, expected (?:one of )?(.*)$")


def load_all(path):
    with open(path) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def describe(obj):
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace")
    return f"{obj.get('kind')}/{ns + '/' if ns else ''}{meta.get('name')}"


def is_custom(obj):
    return str(obj.get("apiVersion", "")).startswith(GROUP + "/")


def builtin_errors(obj, version):
    """kubernetes-validate, strict: unknown fields and wrong types are errors."""
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        where = "/".join(str(p) for p in e.path)
        return [f"{where or '(top)'}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [f"no schema: {e}"]
    return []


def closed(schema):
    """The CRD schema with unknown fields refused. An API server prunes unknown fields of a
    structural schema silently (the object is stored without them), so a misspelled field
    would be lost, not refused; for this check every object with `properties` is closed
    (additionalProperties: false), which is what pruning means for the author."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if not isinstance(node, dict):
            return
        props = node.get("properties")
        if isinstance(props, dict):
            for child in props.values():
                walk(child)
            if "additionalProperties" not in node and not node.get(
                "x-kubernetes-preserve-unknown-fields"
            ):
                node["additionalProperties"] = False
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                walk(node[key])

    walk(schema)
    # metadata is checked by the API server, not by the CRD's schema.
    schema["properties"]["metadata"] = {"type": "object"}
    return schema


def crd_validators(objects):
    """(apiVersion, kind) -> (validator, crd name) from the rendered CRDs."""
    out = {}
    for obj in objects:
        if obj.get("kind") != "CustomResourceDefinition":
            continue
        spec = obj["spec"]
        for version in spec["versions"]:
            schema = closed(version["schema"]["openAPIV3Schema"])
            jsonschema.Draft4Validator.check_schema(schema)
            key = (f"{spec['group']}/{version['name']}", spec["names"]["kind"])
            out[key] = (jsonschema.Draft4Validator(schema), obj["metadata"]["name"])
    return out


def custom_errors(obj, validators):
    key = (obj.get("apiVersion"), obj.get("kind"))
    if key not in validators:
        return [f"no CustomResourceDefinition serves {key[0]} {key[1]}"]
    validator, _ = validators[key]
    errors = []
    for e in sorted(validator.iter_errors(obj), key=lambda e: list(e.path)):
        where = ".".join(str(p) for p in e.path)
        errors.append(f"{where or '(top)'}: {e.message}")
    meta = obj.get("metadata") or {}
    if not meta.get("name") or not meta.get("namespace"):
        errors.append("metadata: name and namespace are required (the kinds are namespaced)")
    return errors


def pod_spec(obj):
    spec = obj.get("spec") or {}
    template = spec.get("template") or {}
    return template.get("spec")


def reference_errors(obj, objects):
    """ConfigMaps, Secrets and the ServiceAccount a pod template uses exist beside it."""
    pod = pod_spec(obj)
    if pod is None:
        return []
    ns = (obj.get("metadata") or {}).get("namespace")
    have = {
        (o.get("kind"), (o.get("metadata") or {}).get("namespace"), o["metadata"]["name"])
        for o in objects
    }
    wanted = []
    for volume in pod.get("volumes") or []:
        if "configMap" in volume and not volume["configMap"].get("optional"):
            wanted.append(("ConfigMap", volume["configMap"]["name"]))
        if "secret" in volume and not volume["secret"].get("optional"):
            wanted.append(("Secret", volume["secret"]["secretName"]))
    if pod.get("serviceAccountName"):
        wanted.append(("ServiceAccount", pod["serviceAccountName"]))
    return [
        f"refers to {kind} {ns}/{name}, which is not in the rendering"
        for kind, name in wanted
        if (kind, ns, name) not in have and (kind, ns, name) not in MADE_AT_INSTALL
    ]


def config_check(mesh_agent, text, source="file"):
    """`mesh-agent config check` on a configuration text: None if valid, else its message."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="mesh-") as f:
        f.write(text)
        f.flush()
        run = subprocess.run(
            [mesh_agent, "config", "check", "--source", source, f.name],
            capture_output=True,
            text=True,
        )
    return None if run.returncode == 0 else run.stderr.strip()


def agent_check(mesh_agent, text, label, source="file"):
    """`mesh-agent config check` on a configuration text; returns its error, if any."""
    error = config_check(mesh_agent, text, source)
    return [] if error is None else [f"{label}: mesh-agent config check: {error}"]


def find(objects, kind, name):
    return next(
        (o for o in objects if o.get("kind") == kind and o["metadata"].get("name") == name),
        None,
    )


def container(obj, name):
    pod = pod_spec(obj) or {}
    return next((c for c in pod.get("containers") or [] if c.get("name") == name), None)


def command_line(c):
    """A container's command and args as one string (a shell script included)."""
    return " ".join(str(a) for a in (c.get("command") or []) + (c.get("args") or []))


def config_paths(agent):
    """(field, path) of every file or directory the agent block names."""
    out = []
    for field in ("cgroup", "caCertFile", "caKeyFile"):
        if agent.get(field):
            out.append((field, agent[field]))
    for i, path in enumerate(agent.get("trustRootFiles") or []):
        out.append((f"trustRootFiles[{i}]", path))
    for field in ("tokenFile", "nodeCertFile", "nodeKeyFile"):
        if (agent.get("ca") or {}).get(field):
            out.append((f"ca.{field}", agent["ca"][field]))
    return out


def host_mounts(obj, containers):
    """mountPath -> the host path behind it (None if not a hostPath) in `containers`."""
    host = {
        v["name"]: v["hostPath"]["path"]
        for v in pod_spec(obj).get("volumes") or []
        if "hostPath" in v
    }
    return {
        m["mountPath"]: host.get(m["name"])
        for c in containers
        for m in c.get("volumeMounts") or []
    }


def under(path, mounts):
    return any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts)


def install_errors(objects):
    """The agent's DaemonSet and its ConfigMap agree (point 3 of the module doc)."""
    ds = find(objects, "DaemonSet", AGENT_DAEMONSET)
    cm = find(objects, "ConfigMap", AGENT_CONFIG)
    if ds is None and cm is None:
        return []
    if ds is None or cm is None:
        return [f"DaemonSet {AGENT_DAEMONSET} and ConfigMap {AGENT_CONFIG} come together"]
    agent = container(ds, "mesh-agent")
    if agent is None:
        return [f"DaemonSet {AGENT_DAEMONSET} has no container mesh-agent"]
    pod = pod_spec(ds)
    config = yaml.safe_load(cm["data"]["mesh.yaml"]) or {}
    errors = []
    if KUBERNETES_SOURCE not in (agent.get("args") or []):
        errors.append(f"the agent does not run {KUBERNETES_SOURCE}")
    others = sorted(set(config) - {"agent"})
    if others:
        errors.append(
            f"mesh.yaml holds {others}: with {KUBERNETES_SOURCE} the agent block only"
        )
    if pod.get("automountServiceAccountToken") is not True:
        errors.append("no API token (automountServiceAccountToken: true) for the source")
    if pod.get("hostPID") is not True:
        errors.append("no hostPID: pods' network namespaces are /proc/<pid>/ns/net")
    mounts = [m["mountPath"] for m in agent.get("volumeMounts") or []]
    for field, path in config_paths(config.get("agent") or {}):
        if not under(path, mounts):
            errors.append(f"mesh.yaml agent.{field} {path} is under none of the agent's mounts")
    return [f"DaemonSet/{AGENT_DAEMONSET}: {e}" for e in errors]


def demo_errors(obj, rendered):
    """An example custom resource applies to the rendered demo (point 4 of the module doc)."""
    ns = obj["metadata"]["namespace"]
    objects = [o for objs in rendered.values() for o in objs]
    if find(objects, "Namespace", ns) is None:
        return [f"namespace {ns} is in no rendering"]
    in_ns = [o for o in objects if (o.get("metadata") or {}).get("namespace") == ns]
    spec = obj.get("spec") or {}
    errors = []
    selector = spec.get("selector")
    if selector is not None:
        templates = [
            ((o["spec"].get("template") or {}).get("metadata") or {}).get("labels") or {}
            for o in in_ns
            if pod_spec(o) is not None
        ]
        if not any(selector.items() <= labels.items() for labels in templates):
            errors.append(f"selector {selector} picks no pod of {ns}")
    service = spec.get("service")
    if service is not None and find(in_ns, "Service", service) is None:
        errors.append(f"Service {ns}/{service} is in no rendering")
    return errors


def uninstall_errors(rendered):
    """The clean-up matches every install (point 6 of the module doc)."""
    found = [
        (path, ds)
        for path, objects in rendered.items()
        for ds in [find(objects, "DaemonSet", UNINSTALL_DAEMONSET)]
        if ds is not None
    ]
    if len(found) != 1:
        return [f"{len(found)} renderings hold DaemonSet {UNINSTALL_DAEMONSET}, not one"]
    where, ds = found[0]
    pod = pod_spec(ds)
    steps = pod.get("initContainers") or []
    script = " ".join(command_line(c) for c in steps)
    names = re.findall(r"mesh-agent uninstall --name[= ](\S+)", script)
    errors = []
    if len(names) != 1:
        errors.append(f"runs `mesh-agent uninstall --name NAME` {len(names)} times, not once")
    mounts = host_mounts(ds, steps)
    for state in NODE_STATE:
        if mounts.get(state) != state:
            errors.append(f"does not mount the host's {state} at {state}")
    images = {c.get("image") for c in steps}
    for path, objects in rendered.items():
        ds_agent = find(objects, "DaemonSet", AGENT_DAEMONSET)
        cm = find(objects, "ConfigMap", AGENT_CONFIG)
        if ds_agent is None or cm is None:
            continue
        bpf_name = ((yaml.safe_load(cm["data"]["mesh.yaml"]) or {}).get("agent") or {}).get(
            "bpfName", "mesh"
        )
        if names and names[0] != bpf_name:
            errors.append(f"removes pins {names[0]!r}; {path} pins {bpf_name!r}")
        image = (container(ds_agent, "mesh-agent") or {}).get("image")
        if images != {image}:
            errors.append(f"runs {sorted(images)}; {path} runs {image}")
        agent_mounts = host_mounts(ds_agent, [container(ds_agent, "mesh-agent") or {}])
        for state in NODE_STATE:
            if agent_mounts.get(state) != state:
                errors.append(f"{path}: the agent does not keep {state} on the host's {state}")
    return [f"{where}: DaemonSet/{UNINSTALL_DAEMONSET}: {e}" for e in errors]


def sample(schema):
    """A value of the schema's type with every field set (values only need the right type:
    the unknown field is refused while parsing, before any value is validated)."""
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type")
    if kind == "object":
        if "properties" in schema:
            return {k: sample(v) for k, v in schema["properties"].items()}
        return {"app": "x"}
    if kind == "array":
        return [sample(schema["items"])]
    if kind == "integer":
        return max(schema.get("minimum", 1), 1)
    if kind == "boolean":
        return True
    return "x"


def levels(schema, path=()):
    """(path, schema) of every object with fields, the spec first; an array's item is 0."""
    if "properties" not in schema:
        return
    yield path, schema
    for key, child in schema["properties"].items():
        if child.get("type") == "array":
            yield from levels(child["items"], path + (key, 0))
        else:
            yield from levels(child, path + (key,))


def field_errors(crd, mesh_agent):
    """The CRD's fields against the agent's, level by level (point 5 of the module doc)."""
    spec = crd["spec"]
    errors = []
    for version in spec["versions"]:
        spec_schema = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
        kind = spec["names"]["kind"]

        def check(spec_value):
            obj = {
                "apiVersion": f"{spec['group']}/{version['name']}",
                "kind": kind,
                "metadata": {"name": "x", "namespace": "demo"},
                "spec": spec_value,
            }
            return config_check(mesh_agent, yaml.safe_dump(as_file_config(obj))) or ""

        # A field of the CRD the agent does not know is named by the agent, once.
        message = check(sample(spec_schema))
        if "unknown field" in message:
            errors.append(f"a field the agent's config does not have: {message}")
            continue
        for path, schema in levels(spec_schema):
            value = sample(spec_schema)
            node = value
            for step in path:
                node = node[step]
            node[PROBE_FIELD] = 1
            where = "spec" + "".join(f"[{p}]" if p == 0 else f".{p}" for p in path)
            message = check(value)
            found = EXPECTED.search(message or "")
            if not found:
                errors.append(f"{where}: the agent did not list its fields there: {message}")
                continue
            agent = {f.strip().strip("`") for f in found.group(1).split(",")}
            ours = set(schema["properties"])
            if not path:
                # The object's metadata holds these; the spec names the service.
                agent -= {"name", "namespace"}
                ours -= {"service"} if kind == "TrafficPolicy" else set()
            if agent != ours:
                errors.append(
                    f"{where}: only in the CRD: {sorted(ours - agent)}, only in the agent's "
                    f"config: {sorted(agent - ours)}"
                )
    return [f"CustomResourceDefinition/{crd['metadata']['name']}: {e}" for e in errors]


def as_file_config(obj):
    """An example custom resource in the file config's form (metadata gives name and
    namespace, the spec the rest)."""
    meta, spec = obj["metadata"], dict(obj.get("spec") or {})
    named = {"name": meta["name"], "namespace": meta["namespace"]}
    kind = obj["kind"]
    if kind == "TrafficPolicy":
        service = spec.pop("service")
        return {
            "services": [{
                "name": service,
                "namespace": meta["namespace"],
                "vips": ["10.96.0.10"],
                "ports": [{"port": 80, "targetPort": 8080}],
                "endpoints": {"selector": {"app": service}},
                "trafficPolicy": spec,
            }]
        }
    block = {
        "AuthorizationPolicy": "authorization",
        "RateLimit": "rateLimits",
        "EgressLimit": "egressLimits",
    }[kind]
    return {"policies": {block: [{**named, **spec}]}}


def self_test(version, daemonset, validators, example, crd, mesh_agent, rendered):
    """The validators refuse broken copies of real objects; returns what they let through."""
    missed = []

    install = next(
        objs for objs in rendered.values() if find(objs, "DaemonSet", AGENT_DAEMONSET)
    )
    ds = find(install, "DaemonSet", AGENT_DAEMONSET)
    cm = find(install, "ConfigMap", AGENT_CONFIG)
    listed = copy.deepcopy(cm)
    listed["data"]["mesh.yaml"] += "workloads: []\n"
    file_source = copy.deepcopy(ds)
    agent = container(file_source, "mesh-agent")
    agent["args"] = [a for a in agent["args"] if a != KUBERNETES_SOURCE]
    unmounted = copy.deepcopy(ds)
    agent = container(unmounted, "mesh-agent")
    agent["volumeMounts"] = [m for m in agent["volumeMounts"] if m["name"] != "trust-bundle"]
    for what, objects in [
        ("a mesh.yaml listing workloads", [ds, listed]),
        (f"an agent without {KUBERNETES_SOURCE}", [file_source, cm]),
        ("a trust bundle not mounted", [unmounted, cm]),
    ]:
        if not install_errors(objects):
            missed.append(f"the install check accepted {what}")
    workload = cm["data"]["mesh.yaml"] + "workloads: [{name: w, ips: [10.0.0.1]}]\n"
    if config_check(mesh_agent, workload, "kubernetes") is None:
        missed.append("config check --source kubernetes accepted a mesh.yaml with a workload")

    renamed = copy.deepcopy(rendered)
    for objects in renamed.values():
        cleanup = find(objects, "DaemonSet", UNINSTALL_DAEMONSET)
        if cleanup is not None:
            for step in pod_spec(cleanup)["initContainers"]:
                step["command"] = [
                    str(a).replace("uninstall --name mesh", "uninstall --name other")
                    for a in step.get("command") or []
                ]
    if not uninstall_errors(renamed):
        missed.append("the uninstall check accepted pins of another name")

    elsewhere = copy.deepcopy(example)
    elsewhere["spec"]["selector"] = {"app": "no-such-app"}
    if not demo_errors(elsewhere, rendered):
        missed.append("the demo check accepted a selector that picks no pod")

    extra = copy.deepcopy(crd)
    spec = extra["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    spec["properties"]["connections"]["properties"]["perMinute"] = {"type": "integer"}
    if not field_errors(extra, mesh_agent):
        missed.append("the field check accepted a CRD with a field the agent does not have")
    fewer = copy.deepcopy(crd)
    spec = fewer["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    del spec["properties"]["onLimit"]
    if not field_errors(fewer, mesh_agent):
        missed.append("the field check accepted a CRD without a field the agent has")

    unknown = copy.deepcopy(daemonset)
    unknown["spec"]["template"]["spec"]["containers"][0]["securityContext"]["privilegd"] = True
    wrong_type = copy.deepcopy(daemonset)
    wrong_type["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "30"
    for what, obj in [("an unknown field", unknown), ("a wrong type", wrong_type)]:
        if not builtin_errors(obj, version):
            missed.append(f"kubernetes-validate accepted a DaemonSet with {what}")

    misspelled = copy.deepcopy(example)
    misspelled["spec"]["selectr"] = misspelled["spec"].pop("selector")
    nested = copy.deepcopy(example)
    nested["spec"]["connections"]["perSeconds"] = nested["spec"]["connections"].pop("perSecond")
    as_string = copy.deepcopy(example)
    as_string["spec"]["connections"]["perSecond"] = "100"
    for what, obj in [
        ("a misspelled field", misspelled),
        ("a misspelled nested field", nested),
        ("a string for an integer", as_string),
    ]:
        if not custom_errors(obj, validators):
            missed.append(f"the CRD schema accepted a {obj['kind']} with {what}")
    return missed


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--kubernetes", required=True)
    parser.add_argument("--mesh-agent", required=True)
    parser.add_argument("--examples", required=True)
    parser.add_argument("rendered", nargs="+")
    args = parser.parse_args()

    errors = []
    rendered = {path: load_all(path) for path in args.rendered}
    validators = {}
    crds = {}
    for path, objects in rendered.items():
        validators.update(crd_validators(objects))
        for obj in objects:
            if obj.get("kind") == "CustomResourceDefinition":
                crds[obj["metadata"]["name"]] = obj
            label = f"{path}: {describe(obj)}"
            if is_custom(obj):
                problems = custom_errors(obj, validators)
            else:
                problems = builtin_errors(obj, args.kubernetes)
            problems += reference_errors(obj, objects)
            errors += [f"{label}: {p}" for p in problems]
            if obj.get("kind") == "ConfigMap" and obj["metadata"]["name"] == AGENT_CONFIG:
                text = obj["data"]["mesh.yaml"]
                errors += agent_check(args.mesh_agent, text, label, "kubernetes")
        errors += [f"{path}: {e}" for e in install_errors(objects)]
    if not validators:
        errors.append("no CustomResourceDefinition in any rendering")
    errors += uninstall_errors(rendered)
    for crd in crds.values():
        errors += field_errors(crd, args.mesh_agent)

    examples = sorted(
        os.path.join(args.examples, name)
        for name in os.listdir(args.examples)
        if name.endswith(".yaml")
    )
    seen = set()
    for path in examples:
        for obj in load_all(path):
            label = f"{path}: {describe(obj)}"
            if not is_custom(obj):
                errors.append(f"{label}: not a custom resource of {GROUP}")
                continue
            seen.add((obj.get("apiVersion"), obj.get("kind")))
            problems = custom_errors(obj, validators)
            if not problems:
                problems = demo_errors(obj, rendered)
            errors += [f"{label}: {p}" for p in problems]
            if not problems:
                text = yaml.safe_dump(as_file_config(obj))
                errors += agent_check(args.mesh_agent, text, f"{label} as file config")
    for key, (_, crd) in sorted(validators.items()):
        if key not in seen:
            errors.append(f"{args.examples}: no example of {key[1]} (CRD {crd})")

    daemonsets = [o for objs in rendered.values() for o in objs if o.get("kind") == "DaemonSet"]
    rate_limits = [
        o for path in examples for o in load_all(path) if o.get("kind") == "RateLimit"
    ]
    rate_limit_crd = crds.get(f"ratelimits.{GROUP}")
    if daemonsets and rate_limits and rate_limit_crd:
        missed = self_test(
            args.kubernetes,
            daemonsets[0],
            validators,
            rate_limits[0],
            rate_limit_crd,
            args.mesh_agent,
            rendered,
        )
        errors += [f"self-test: {m}" for m in missed]
    else:
        errors.append("self-test: needs a DaemonSet, a RateLimit example and its CRD")

    for e in errors:
        print(e, file=sys.stderr)
    objects = sum(len(o) for o in rendered.values())
    print(
        f"manifests: {len(rendered)} renderings, {objects} objects, {len(examples)} example "
        f"files, Kubernetes {args.kubernetes}: {'FAILED' if errors else 'ok'}"
    )
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
