"""Validates the objects `kubectl kustomize` printed (standard input) strictly: built-in kinds
by kubernetes-validate's schemas for each Kubernetes version given, custom resources by the
schemas in SCHEMA_DIR (named GROUP_VERSION_KIND.json, lower case). Prints the objects as one JSON
list for the caller to inspect; exits 1 naming every object that is not valid.

  validate_kubernetes.py SCHEMA_DIR VERSION... < objects.yaml"""

import json
import os
import sys

import jsonschema
import kubernetes_validate
import yaml


def custom_schema(schema_dir, obj):
    group, _, version = obj["apiVersion"].rpartition("/")
    if not group:
        return None
    name = f"{group}_{version}_{obj['kind']}.json".lower()
    path = os.path.join(schema_dir, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def main():
    schema_dir, versions = sys.argv[1], sys.argv[2:]
    if not versions:
        sys.exit("usage: validate_kubernetes.py SCHEMA_DIR VERSION... < objects.yaml")
    objects = [o for o in yaml.safe_load_all(sys.stdin) if o is not None]
    if not objects:
        sys.exit("no objects on standard input")
    errors = []
    for obj in objects:
        what = f"{obj.get('kind')} {obj.get('metadata', {}).get('name')}"
        schema = custom_schema(schema_dir, obj)
        if schema is not None:
            validator = jsonschema.Draft202012Validator(schema)
            for e in validator.iter_errors(obj):
                errors.append(f"{what}: {'.'.join(map(str, e.absolute_path))}: {e.message}")
            continue
        for version in versions:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.SchemaNotFoundError as e:
                errors.append(f"{what}: no schema for {obj.get('apiVersion')} {obj.get('kind')} "
                              f"in Kubernetes {version} nor in {schema_dir}: {e}")
            except kubernetes_validate.ValidationError as e:
                errors.append(f"{what} (Kubernetes {version}): {'.'.join(map(str, e.path))}: {e.message}")
    if errors:
        sys.exit("\n".join(errors))
    json.dump(objects, sys.stdout)


if __name__ == "__main__":
    main()
