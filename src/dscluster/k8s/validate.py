"""`dscluster k8s validate FILE... [--crds DIR]`: strict offline validation of manifests.

- Built-in kinds (Service, PersistentVolumeClaim, Secret, ...): the strict JSON schemas shipped with
  `kubernetes-validate` (unknown fields are errors), plus checks the API server does and those
  schemas do not (object names, label values, resource quantities).
- Custom resources: the `openAPIV3Schema` of the served CRD version matching `apiVersion`, turned
  into JSON Schema and made strict the way an API server with strict field validation behaves:
  every object schema that does not preserve unknown fields gets `additionalProperties: false`.
- The rules the CRD schemas carry beyond JSON Schema (crd_rules.py): CEL rules
  (`x-kubernetes-validations`, each failure reported with the rule's own message) and unique
  keys of list-maps and sets.
- Operator rules the CRD schemas do not carry (MPI Operator, Trainer, JobSet, LWS webhooks).

Output: one line per problem, `FILE: document N (Kind/name): field.path: message`, then a summary.
Exit 0 when every document is valid, 2 when any problem is found (bad input).
"""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator, TextIO

import jsonschema
import yaml

from dscluster.errors import EXIT_OK, EXIT_USAGE, UsageError
from dscluster.k8s.crd_rules import schema_rule_problems
from dscluster.k8s.options import DNS1035_LABEL, DNS1123_LABEL, DNS1123_SUBDOMAIN, QUANTITY

KUBERNETES_VERSION = "1.37"

# Environment variables the Trainer sets itself on the trainer containers; its webhook rejects a
# TrainJob that sets them (torch plugin: PET_*; MPI plugin with OpenMPI: the hostfile and slots).
RESERVED_TRAINJOB_ENV = frozenset({
    "PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT",
    "OMPI_MCA_orte_default_hostfile", "OMPI_MCA_orte_keep_fqdn_hostnames",
    "OMPI_MCA_orte_set_default_slots", "OMPI_MCA_plm_rsh_args",
})
RESERVED_TRAINJOB_ENV_PREFIX = "PET_"

LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
# kinds whose names the API server checks as DNS-1035 labels (they become DNS names)
DNS1035_NAMED = {"Service"}

Problem = tuple[str, str]  # (field path, message)


# ------------------------------------------------------------------------------------------
# Loading


# libyaml's loader when PyYAML has it: CRDs are large (tens of thousands of lines)
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _load_yaml_documents(path: str) -> list[Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        return list(yaml.load_all(text, Loader=_Loader))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UsageError(f"{path}: not valid YAML{where}: {problem}") from None


def _expand_lists(docs: Iterable[Any]) -> Iterator[Any]:
    """`kubectl get ... -o yaml` of several objects writes one `kind: List` with `items`."""
    for doc in docs:
        if isinstance(doc, dict) and doc.get("kind") == "List" and isinstance(doc.get("items"), list):
            yield from doc["items"]
        else:
            yield doc


_CRD_CACHE: dict[tuple, "CRDRegistry"] = {}


class CRDRegistry:
    """Served CRD versions, keyed by (group, version, kind); several CRDs for one key (for example
    two releases of an operator) must all accept a document."""

    def __init__(self) -> None:
        self.schemas: dict[tuple[str, str, str], list[tuple[str, dict]]] = {}
        self.kinds: dict[tuple[str, str], list[str]] = {}

    @classmethod
    def from_dir(cls, crds_dir: str | None) -> "CRDRegistry":
        reg = cls()
        if crds_dir is None:
            return reg
        d = Path(crds_dir)
        if not d.is_dir():
            raise UsageError(f"--crds {crds_dir}: not a directory")
        files = sorted(p for p in d.iterdir() if p.suffix in (".yaml", ".yml", ".json") and p.is_file())
        key = (str(d.resolve()), tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files))
        if key in _CRD_CACHE:
            return _CRD_CACHE[key]
        for f in files:
            for doc in _expand_lists(_load_yaml_documents(str(f))):
                if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition":
                    reg.add(doc, f.name)
        if not reg.schemas:
            raise UsageError(f"--crds {crds_dir}: no CustomResourceDefinition found in *.yaml files there")
        _CRD_CACHE[key] = reg
        return reg

    def add(self, crd: dict, source: str) -> None:
        spec = crd.get("spec") or {}
        group = spec.get("group", "")
        kind = (spec.get("names") or {}).get("kind", "")
        for v in spec.get("versions") or []:
            if not v.get("served", True):
                continue
            schema = ((v.get("schema") or {}).get("openAPIV3Schema"))
            if schema is None:
                continue
            self.schemas.setdefault((group, v["name"], kind), []).append((source, schema))
            self.kinds.setdefault((group, kind), []).append(v["name"])

    def lookup(self, group: str, version: str, kind: str) -> list[tuple[str, dict]] | None:
        return self.schemas.get((group, version, kind))


# ------------------------------------------------------------------------------------------
# CRD openAPIV3Schema -> strict JSON Schema

_OBJECT_META = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "generateName": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        "finalizers": {"type": "array", "items": {"type": "string"}},
        "ownerReferences": {"type": "array", "items": {"type": "object"}},
        "uid": {"type": "string"}, "resourceVersion": {"type": "string"},
        "generation": {"type": "integer"}, "creationTimestamp": {"type": ["string", "null"]},
        "deletionTimestamp": {"type": ["string", "null"]},
        "deletionGracePeriodSeconds": {"type": "integer"},
        "managedFields": {"type": "array"}, "selfLink": {"type": "string"},
    },
    "additionalProperties": False,
}

_DROP = {"description", "example", "externalDocs", "x-kubernetes-validations", "x-kubernetes-list-type",
         "x-kubernetes-list-map-keys", "x-kubernetes-map-type", "x-kubernetes-int-or-string",
         "x-kubernetes-preserve-unknown-fields", "x-kubernetes-embedded-resource", "nullable", "default"}


def strict_schema(node: Any) -> Any:
    """Turn one openAPIV3Schema node into strict JSON Schema (recursively)."""
    if not isinstance(node, dict):
        return node
    out = {k: v for k, v in node.items() if k not in _DROP}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"] if isinstance(out["type"], str) else list(out["type"]) + ["null"]
    if "properties" in out:
        out["properties"] = {k: strict_schema(v) for k, v in out["properties"].items()}
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = strict_schema(out["additionalProperties"])
    if "items" in out:
        out["items"] = strict_schema(out["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out and not (key == "anyOf" and node.get("x-kubernetes-int-or-string")):
            out[key] = [strict_schema(s) for s in out[key]]
    if "not" in out:
        out["not"] = strict_schema(out["not"])
    preserve = node.get("x-kubernetes-preserve-unknown-fields") or node.get("x-kubernetes-embedded-resource")
    is_object = node.get("type") == "object" or "properties" in node
    if is_object and "additionalProperties" not in out and not preserve:
        # An API server prunes (and with strict field validation rejects) fields the schema does
        # not list; an object schema with no properties at all accepts no fields.
        out["additionalProperties"] = False
    return out


_VALIDATORS: dict[tuple, Any] = {}


def _crd_validator(openapi: dict, api_version: str, kind: str):
    key = (id(openapi), api_version, kind)
    hit = _VALIDATORS.get(key)
    if hit is None or hit[0] is not openapi:
        hit = (openapi, jsonschema.Draft202012Validator(resource_schema(openapi, api_version, kind)))
        _VALIDATORS[key] = hit
    return hit[1]


def resource_schema(openapi: dict, api_version: str, kind: str) -> dict:
    schema = strict_schema(copy.deepcopy(openapi))
    props = schema.setdefault("properties", {})
    props["apiVersion"] = {"const": api_version}
    props["kind"] = {"const": kind}
    props["metadata"] = _OBJECT_META
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata"})
    schema["additionalProperties"] = False
    return schema


# ------------------------------------------------------------------------------------------
# Checks


def _path(parts: Iterable[Any]) -> str:
    s = ""
    for p in parts:
        if isinstance(p, int):
            s += f"[{p}]"
        else:
            s += ("." if s else "") + str(p)
    return s or "(document)"


def _not_quantity(value: Any) -> str:
    return f"{value!r} is not a quantity (e.g. 1, 500m, 16Gi)"


def _message(err: jsonschema.ValidationError) -> str:
    if err.validator == "additionalProperties" and err.validator_value is False:
        extra = sorted(set(err.instance) - set(err.schema.get("properties", {})))
        return f"unknown field{'s' if len(extra) > 1 else ''} {', '.join(map(repr, extra))}"
    if err.validator in ("oneOf", "anyOf"):
        return f"{err.instance!r} is not of an allowed type or form"
    if err.validator == "pattern" and err.validator_value == QUANTITY.pattern:
        return _not_quantity(err.instance)
    if err.validator == "pattern" and isinstance(err.instance, str):
        return f"{err.instance!r} does not match {err.validator_value!r}"
    return err.message


def _schema_problems(validator: jsonschema.protocols.Validator, doc: dict) -> list[Problem]:
    problems = []
    for err in sorted(validator.iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path]):
        path = list(err.absolute_path)
        if err.validator == "additionalProperties" and err.validator_value is False:
            extra = sorted(set(err.instance) - set(err.schema.get("properties", {})))
            for name in extra:
                problems.append((_path(path + [name]), "unknown field"))
            continue
        problems.append((_path(path), _message(err)))
    return problems


def _metadata_problems(doc: dict, *, dns1035: bool) -> list[Problem]:
    meta = doc.get("metadata")
    if not isinstance(meta, dict):
        return [("metadata", "required object is missing")]
    problems: list[Problem] = []
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        if not meta.get("generateName"):
            problems.append(("metadata.name", "required"))
    elif dns1035:
        if not DNS1035_LABEL.match(name) or len(name) > 63:
            problems.append(("metadata.name", f"{name!r} is not a DNS-1035 label (lowercase letters, digits "
                                              "and '-', starting with a letter, at most 63 characters)"))
    elif not DNS1123_SUBDOMAIN.match(name) or len(name) > 253:
        problems.append(("metadata.name", f"{name!r} is not a DNS-1123 subdomain (lowercase letters, digits, "
                                          "'-' and '.')"))
    ns = meta.get("namespace")
    if ns is not None and (not isinstance(ns, str) or not DNS1123_LABEL.match(ns) or len(ns) > 63):
        problems.append(("metadata.namespace", f"{ns!r} is not a DNS-1123 label"))
    problems += _labels_problems(meta.get("labels"), "metadata.labels")
    return problems


def _labels_problems(labels: Any, where: str) -> list[Problem]:
    if not isinstance(labels, dict):
        return []
    problems = []
    for k, v in labels.items():
        key = str(k)
        prefix, _, name = key.rpartition("/")
        if (prefix and (not DNS1123_SUBDOMAIN.match(prefix) or len(prefix) > 253)) or \
                not LABEL_NAME.match(name) or len(name) > 63:
            problems.append((f"{where}.{key}", "invalid label key"))
        if not isinstance(v, str):
            problems.append((f"{where}.{key}", f"label value {v!r} must be a string (quote it)"))
        elif not LABEL_VALUE.match(v) or len(v) > 63:
            problems.append((f"{where}.{key}", f"invalid label value {v!r}"))
    return problems


def _walk(node: Any, path: list) -> Iterator[tuple[list, Any]]:
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, path + [k])
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, path + [i])


def _generic_problems(doc: dict) -> list[Problem]:
    """Rules for every kind: resource quantities, pod-template labels, selectors, env names."""
    problems: list[Problem] = []
    for path, node in _walk(doc, []):
        if not path or not isinstance(node, dict):
            continue
        key = path[-1]
        if key in ("requests", "limits") and len(path) >= 2 and path[-2] == "resources":
            for rname, q in node.items():
                if isinstance(q, bool) or not isinstance(q, (int, float, str)) or not QUANTITY.match(str(q)):
                    problems.append((_path(path + [rname]), _not_quantity(q)))
        elif key == "labels" and len(path) >= 2 and path[-2] == "metadata" and len(path) > 2:
            problems += _labels_problems(node, _path(path))
        elif key in ("selector", "matchLabels") and all(isinstance(v, (str, int, float, bool)) for v in node.values()) \
                and (key == "matchLabels" or doc.get("kind") == "Service"):
            problems += _labels_problems(node, _path(path))
    return problems


def _env_lists(doc: Any) -> Iterator[tuple[list, list]]:
    for path, node in _walk(doc, []):
        if path and path[-1] == "env" and isinstance(node, list):
            yield path, node


def _operator_problems(doc: dict) -> list[Problem]:
    kind = doc.get("kind")
    spec = doc.get("spec") if isinstance(doc.get("spec"), dict) else {}
    name = (doc.get("metadata") or {}).get("name") or ""
    problems: list[Problem] = []

    def name_fits(suffix: str, what: str) -> None:
        if isinstance(name, str) and len(name + suffix) > 63:
            problems.append(("metadata.name", f"{name!r} is too long: {what} {name + suffix!r} exceeds 63 characters"))

    if kind in ("MPIJob", "TrainJob", "LeaderWorkerSet", "TrainingRuntime", "JobSet"):
        if isinstance(name, str) and name and not DNS1035_LABEL.match(name):
            problems.append(("metadata.name", f"{name!r} is not a DNS-1035 label (lowercase letters, digits "
                                              "and '-', starting with a letter)"))
    if kind == "MPIJob":
        specs = spec.get("mpiReplicaSpecs")
        if isinstance(specs, dict):
            for key in specs:
                if key not in ("Launcher", "Worker"):
                    problems.append((f"spec.mpiReplicaSpecs.{key}",
                                     "unknown replica type; only 'Launcher' and 'Worker' are allowed"))
            launcher = specs.get("Launcher")
            if not isinstance(launcher, dict):
                problems.append(("spec.mpiReplicaSpecs.Launcher", "required: exactly one Launcher replica"))
            elif launcher.get("replicas", 1) != 1:
                problems.append(("spec.mpiReplicaSpecs.Launcher.replicas",
                                 f"must be 1, got {launcher.get('replicas')!r}"))
            for key, replica in specs.items():
                policy = replica.get("restartPolicy") if isinstance(replica, dict) else None
                if key in ("Launcher", "Worker") and policy not in (None, "OnFailure", "Never"):
                    problems.append((f"spec.mpiReplicaSpecs.{key}.restartPolicy",
                                     f"{policy!r} is not supported by the MPI Operator: OnFailure or Never"))
            worker = specs.get("Worker")
            workers = worker.get("replicas", 1) if isinstance(worker, dict) else 0
            name_fits("-launcher", "launcher Job")
            if isinstance(workers, int) and workers > 0:
                name_fits(f"-worker-{workers - 1}", "worker pod")
        elif specs is not None or "spec" in doc:
            problems.append(("spec.mpiReplicaSpecs", "required"))
        run_policy = spec.get("runPolicy")
        backoff = run_policy.get("backoffLimit") if isinstance(run_policy, dict) else None
        if isinstance(backoff, int) and backoff < 0:
            problems.append(("spec.runPolicy.backoffLimit", f"must be at least 0 (got {backoff})"))
    elif kind == "TrainJob":
        for path, env in _env_lists(spec.get("trainer") or {}):
            for i, var in enumerate(env):
                vname = var.get("name") if isinstance(var, dict) else None
                if isinstance(vname, str) and (vname in RESERVED_TRAINJOB_ENV
                                               or vname.startswith(RESERVED_TRAINJOB_ENV_PREFIX)):
                    problems.append((_path(["spec", "trainer"] + path + [i, "name"]),
                                     f"{vname} is reserved: the Trainer sets it itself"))
        ref = spec.get("runtimeRef") or {}
        if isinstance(ref, dict) and ref.get("kind", "ClusterTrainingRuntime") not in (
                "TrainingRuntime", "ClusterTrainingRuntime"):
            problems.append(("spec.runtimeRef.kind", "must be TrainingRuntime or ClusterTrainingRuntime"))
        name_fits("-launcher-0-0-xxxxx", "pod")
    elif kind in ("TrainingRuntime", "ClusterTrainingRuntime"):
        # (one ML policy only: the CRD's own CEL rule says it.) JobSet's webhook: maxRestarts >= 0.
        failure = ((spec.get("template") or {}).get("spec") or {}).get("failurePolicy")
        restarts = failure.get("maxRestarts") if isinstance(failure, dict) else None
        if isinstance(restarts, int) and restarts < 0:
            problems.append(("spec.template.spec.failurePolicy.maxRestarts", f"must be at least 0 (got {restarts})"))
    elif kind == "LeaderWorkerSet":
        size = ((spec.get("leaderWorkerTemplate") or {}).get("size", 1))
        if isinstance(size, int):
            if size < 1:  # the LWS webhook's rule; the CRD has no minimum
                problems.append(("spec.leaderWorkerTemplate.size", f"must be at least 1 (got {size})"))
            name_fits(f"-0-{max(size - 1, 0)}", "pod")
    return problems


# ------------------------------------------------------------------------------------------
# Built-in kinds via kubernetes-validate's strict schemas


_BUILTIN: dict[tuple[str, str], Any] = {}


def _builtin_validator(doc: dict):
    """A strict validator for a built-in kind (kubernetes-validate's schemas), or None."""
    from kubernetes_validate import utils as kv
    from referencing import Registry, Resource

    key = (str(doc.get("apiVersion")), str(doc.get("kind")))
    if key in _BUILTIN:
        return _BUILTIN[key]
    schema_dir = f"v{_kv_version()}-local-strict"
    api_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", key[0])
    try:
        schema = kv.schema_contents(f"kubernetes-json-schema/{schema_dir}/{key[1].lower()}-"
                                    f"{api_version}.json", KUBERNETES_VERSION)
    except (FileNotFoundError, kv.VersionNotSupportedError):
        _BUILTIN[key] = None
        return None
    defs = kv.schema_contents(f"kubernetes-json-schema/{schema_dir}/_definitions.json", KUBERNETES_VERSION)
    registry = Resource.from_contents(defs) @ (Resource.from_contents(schema) @ Registry())
    _BUILTIN[key] = jsonschema.Draft202012Validator(schema, registry=registry)
    return _BUILTIN[key]


_KV_VERSION: str | None = None


def _kv_version() -> str:
    global _KV_VERSION
    if _KV_VERSION is None:
        from kubernetes_validate import utils as kv

        _KV_VERSION = [v for v in kv.all_versions()
                       if kv.major_minor(v) == KUBERNETES_VERSION][-1]
    return _KV_VERSION


def _kv_knows_group(api_version: str) -> bool:
    """True when kubernetes-validate has any schema for this API group/version (a built-in API)."""
    from kubernetes_validate import utils as kv

    prefix = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    ref = kv.importlib_resources.files("kubernetes_validate").joinpath(
        f"kubernetes-json-schema/v{_kv_version()}-local-strict")
    return any(p.name.endswith(f"-{prefix}.json") for p in ref.iterdir())


# ------------------------------------------------------------------------------------------
# Documents


def validate_document(doc: Any, crds: CRDRegistry) -> list[Problem]:
    """All problems of one parsed YAML document."""
    if not isinstance(doc, dict):
        return [("(document)", f"expected a mapping (a Kubernetes object), got {type(doc).__name__}")]
    api_version, kind = doc.get("apiVersion"), doc.get("kind")
    if not isinstance(api_version, str) or not api_version:
        return [("apiVersion", "required")]
    if not isinstance(kind, str) or not kind:
        return [("kind", "required")]
    group, _, version = api_version.rpartition("/")
    problems: list[Problem] = []
    if "." not in group and (group == "" or _kv_knows_group(api_version)):
        validator = _builtin_validator(doc)
        if validator is None:
            return [("apiVersion", f"no built-in kind {kind} in {api_version} (Kubernetes {KUBERNETES_VERSION})")]
        problems += _schema_problems(validator, doc)
        problems += _metadata_problems(doc, dns1035=kind in DNS1035_NAMED)
    elif group.endswith(".k8s.io") and _kv_knows_group(api_version) and not crds.kinds.get((group, kind)):
        validator = _builtin_validator(doc)
        if validator is None:
            return [("apiVersion", f"no built-in kind {kind} in {api_version} (Kubernetes {KUBERNETES_VERSION})")]
        problems += _schema_problems(validator, doc)
        problems += _metadata_problems(doc, dns1035=False)
    else:
        entries = crds.lookup(group, version, kind)
        if entries is None:
            served = crds.kinds.get((group, kind))
            if served:
                return [("apiVersion", f"{api_version} is not a served version of {kind}; the CRD serves "
                                       f"{', '.join(f'{group}/{v}' for v in sorted(set(served)))}")]
            if not crds.schemas:
                return [("apiVersion", f"{kind} ({api_version}) is a custom resource: pass --crds DIR with its "
                                       "CustomResourceDefinition (kubectl get crd NAME -o yaml)")]
            return [("apiVersion", f"no CustomResourceDefinition for {kind} in {api_version} among --crds")]
        # Several CRDs for one kind (releases of one operator): every one must accept the document.
        # A problem all of them report is one line; otherwise the line names the CRD file(s).
        found: dict[Problem, list[str]] = {}
        for source, openapi in entries:
            for p in _schema_problems(_crd_validator(openapi, api_version, kind), doc) + \
                    schema_rule_problems(openapi, doc, _path):
                found.setdefault(p, []).append(source)
        for (field, msg), sources in found.items():
            if len(sources) < len(entries):
                msg = f"{msg} (CRD {', '.join(sources)})"
            problems.append((field, msg))
        problems += _metadata_problems(doc, dns1035=False)
    problems += _generic_problems(doc)
    problems += _operator_problems(doc)
    # one line per distinct problem, in document order of first appearance
    return list(dict.fromkeys(problems))


def validate_file(path: str, crds: CRDRegistry) -> tuple[int, list[str]]:
    """(documents checked, problem lines) for one file; raises UsageError if unreadable/bad YAML."""
    lines = []
    docs = _load_yaml_documents(path)
    n = 0
    for idx, doc in enumerate(docs, start=1):
        if doc is None:
            continue
        n += 1
        if isinstance(doc, dict):
            meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
            label = f"{doc.get('kind', '?')}/{meta.get('name', '?')}"
        else:
            label = "?"
        for field, msg in validate_document(doc, crds):
            lines.append(f"{path}: document {idx} ({label}): {field}: {msg}")
    return n, lines


def run_validate(files: list[str], crds_dir: str | None = None, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    crds = CRDRegistry.from_dir(crds_dir)
    total_docs = 0
    problems: list[str] = []
    for f in files:
        n, lines = validate_file(f, crds)
        total_docs += n
        problems += lines
    for line in problems:
        out.write(line + "\n")
    if problems:
        out.write(f"{len(problems)} problem{'s' if len(problems) != 1 else ''} in {total_docs} "
                  f"document{'s' if total_docs != 1 else ''} of {len(files)} file{'s' if len(files) != 1 else ''}\n")
        return EXIT_USAGE
    if total_docs == 0:
        raise UsageError(f"no Kubernetes objects in {', '.join(files)}")
    out.write(f"{total_docs} document{'s' if total_docs != 1 else ''} valid in {len(files)} "
              f"file{'s' if len(files) != 1 else ''}\n")
    return EXIT_OK
