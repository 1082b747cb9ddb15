#!/usr/bin/env python3
"""Validate custom resources (KEDA's ScaledObject, TriggerAuthentication) against vendored CRDs.

usage: validate_crd.py --crd CRD.yaml [--crd ...] MANIFEST.yaml [...]

Each manifest document is checked against the openAPIV3Schema of the CRD serving its
apiVersion and kind, the way the API server would accept it:
  - JSON Schema Draft 7 over the OpenAPI subset; `x-kubernetes-*` keys dropped;
  - unknown fields rejected: an object schema with `properties` gets additionalProperties: false
    unless it says x-kubernetes-preserve-unknown-fields (the server would prune or refuse them);
  - x-kubernetes-int-or-string accepts an integer or a string; `nullable` accepts null.
CEL rules (x-kubernetes-validations) are not evaluated; they are counted in the output.

A trigger's `metadata` is a free string map in the CRD, so a misspelled key (scaleOnInflight)
would pass the schema and be silently ignored by KEDA. For the trigger types below, keys and
value types are checked against the scaler's own parameter tags.
Prints one line per file; exits 1 on any failure.
"""
import argparse
import copy
import re
import sys

import jsonschema
import yaml

# Parameters the aws-sqs-queue scaler reads, from kedacore/keda at commit
# 8b4f083ca8c8c2baf8477e322bd4d16ac4dfa09a (the commit of the vendored CRDs):
# `keda:"name=..."` tags in pkg/scalers/aws_sqs_queue_scaler.go (a `resolvedEnv` order also
# admits NAMEFromEnv), and the triggerMetadata keys read in pkg/scalers/aws/aws_common.go.
TRIGGER_METADATA = {
    "aws-sqs-queue": {
        "queueLength": "int",
        "activationQueueLength": "int",
        "queueURL": "str",
        "queueURLFromEnv": "str",
        "awsRegion": "str",
        "awsEndpoint": "str",
        "scaleOnInFlight": "bool",
        "scaleOnDelayed": "bool",
        "identityOwner": "str",
        "awsAccessKeyID": "str",
        "awsAccessKeyIDFromEnv": "str",
        "awsSecretAccessKeyFromEnv": "str",
    },
}
GO_BOOLS = {"1", "t", "T", "TRUE", "true", "True", "0", "f", "F", "FALSE", "false", "False"}  # strconv.ParseBool


def to_json_schema(node, counters):
    """The OpenAPI v3 structural schema as a strict Draft 7 schema."""
    if isinstance(node, list):
        return [to_json_schema(n, counters) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-"):
            if key == "x-kubernetes-validations":
                counters["cel"] += len(value)
            continue
        if key in ("nullable", "description", "format"):
            continue
        if key in ("properties", "patternProperties", "definitions"):
            out[key] = {k: to_json_schema(v, counters) for k, v in value.items()}
        else:
            out[key] = to_json_schema(value, counters)
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["type"] = ["integer", "string"]
    if node.get("nullable") and "type" in out:
        out["type"] = (out["type"] if isinstance(out["type"], list) else [out["type"]]) + ["null"]
    if "properties" in out and "additionalProperties" not in out \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def load_crds(paths):
    """{(group/version, kind): (schema, cel_rule_count)} of every served version."""
    crds = {}
    for path in paths:
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if not doc or doc.get("kind") != "CustomResourceDefinition":
                    continue
                spec = doc["spec"]
                for version in spec["versions"]:
                    if not version.get("served", True):
                        continue
                    counters = {"cel": 0}
                    schema = to_json_schema(version["schema"]["openAPIV3Schema"], counters)
                    key = (f"{spec['group']}/{version['name']}", spec["names"]["kind"])
                    crds[key] = (schema, counters["cel"])
    return crds


def check_trigger_metadata(doc):
    errors = []
    for i, trigger in enumerate((doc.get("spec") or {}).get("triggers") or []):
        allowed = TRIGGER_METADATA.get(trigger.get("type"))
        if allowed is None:
            continue
        for key, value in (trigger.get("metadata") or {}).items():
            where = f"spec.triggers[{i}].metadata.{key}"
            kind = allowed.get(key)
            if kind is None:
                errors.append(f"{where}: not a parameter of the {trigger['type']} scaler "
                              f"(known: {', '.join(sorted(allowed))})")
            elif kind == "int" and not re.fullmatch(r"-?[0-9]+", str(value)):
                errors.append(f"{where}: {value!r} is not an integer")
            elif kind == "bool" and str(value) not in GO_BOOLS:
                errors.append(f"{where}: {value!r} is not a boolean")
    return errors


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crd", action="append", required=True, help="CRD file (repeatable)")
    parser.add_argument("manifests", nargs="+")
    args = parser.parse_args()
    crds = load_crds(args.crd)
    failed = False
    for path in args.manifests:
        errors, names, cel = [], [], 0
        try:
            with open(path) as f:
                docs = [d for d in yaml.safe_load_all(f) if d]
        except (OSError, yaml.YAMLError) as err:
            docs, errors = [], [f"cannot read: {err}"]
        for doc in docs:
            key = (doc.get("apiVersion"), doc.get("kind"))
            name = f"{str(doc.get('kind')).lower()}/{(doc.get('metadata') or {}).get('name')}"
            names.append(name)
            if key not in crds:
                errors.append(f"{name}: no CRD given for {key[0]} {key[1]}")
                continue
            schema, cel = crds[key]
            validator = jsonschema.Draft7Validator(schema)
            for err in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path)):
                where = ".".join(str(p) for p in err.absolute_path) or "(root)"
                errors.append(f"{name}: {where}: {err.message}")
            errors += [f"{name}: {e}" for e in check_trigger_metadata(doc)]
        if errors:
            failed = True
            print(f"FAIL {path}")
            for e in errors:
                print(f"     {e}")
        else:
            print(f"ok   {path}: {', '.join(names)} valid against its CRD schema"
                  + (f" ({cel} CEL rule(s) not evaluated)" if cel else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
