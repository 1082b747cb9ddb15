#!/usr/bin/env python3
"""Check that deploy/kubernetes agrees with the binary's source (read-only) and with itself.

usage: manifest_agreement.py [REPO_ROOT]   (default: the current directory)

  - every env var the manifests set is a setting of the binary (`env = "NAME"` in src/config.rs);
  - the probe paths and the scrape path are routes of src/http.rs (`.route("/path"`);
  - the container port named `metrics` is the port of METRICS_ADDR, and the probes use it;
  - terminationGracePeriodSeconds > SHUTDOWN_GRACE_SECS + ABORT_WAIT + TASKS_WAIT
    (the shutdown's extra waits, `const NAME: Duration = Duration::from_secs(N)` anywhere in src/;
    3 + 2 s if not found);
  - runAsUser is the uid of the Dockerfile's `useradd ... --uid N`;
  - the ScaledObject targets the Deployment, names the TriggerAuthentication, min <= max
    (the CRD's CEL rule, which validate_crd.py does not evaluate), and polls the ConfigMap's queue;
  - the names the Deployment refers to (ServiceAccount, ConfigMap) exist, every object carries
    app.kubernetes.io/name: loginflow, and the selectors match the pod labels;
  - kustomization.yaml lists exactly the manifests of the directory.
Prints one line per check; exits 1 if any fails.
"""
import os
import re
import sys

import yaml

DIR = "deploy/kubernetes"
LABEL = ("app.kubernetes.io/name", "loginflow")
DEFAULT_EXTRA_WAIT = {"ABORT_WAIT": 3, "TASKS_WAIT": 2}

results = []


def check(ok, what, detail=""):
    results.append(bool(ok))
    print(f"{'ok  ' if ok else 'FAIL'} {what}" + (f": {detail}" if detail else ""))


def read(path):
    with open(path) as f:
        return f.read()


def load(name):
    return [d for d in yaml.safe_load_all(read(os.path.join(DIR, name))) if d]


def one(docs, kind):
    found = [d for d in docs if d.get("kind") == kind]
    if len(found) != 1:
        sys.exit(f"FAIL expected one {kind} in the manifests, found {len(found)}")
    return found[0]


def main():
    if len(sys.argv) > 1:
        os.chdir(sys.argv[1])
    config_rs = read("src/config.rs")
    http_rs = read("src/http.rs")
    # The shutdown constants live in src/pipeline/mod.rs today; search all of src/ so a move keeps working.
    all_rs = "\n".join(read(os.path.join(d, f)) for d, _, fs in os.walk("src") for f in sorted(fs) if f.endswith(".rs"))
    dockerfile = read("Dockerfile")

    kustomization = load("kustomization.yaml")[0]
    listed = kustomization.get("resources") or []
    present = sorted(f for f in os.listdir(DIR) if f.endswith((".yaml", ".yml")) and f != "kustomization.yaml")
    check(sorted(listed) == present, "kustomization.yaml lists every manifest",
          f"listed {sorted(listed)}, present {present}" if sorted(listed) != present else "")
    docs = [d for f in present for d in load(f)]

    deployment = one(docs, "Deployment")
    configmap = next((d for d in docs if d.get("kind") == "ConfigMap"
                      and d["metadata"]["name"] == deployment["metadata"]["name"]), None)
    scaled = one(docs, "ScaledObject")
    trigger_auth = one(docs, "TriggerAuthentication")
    service_account = one(docs, "ServiceAccount")
    pod = deployment["spec"]["template"]["spec"]
    containers = pod["containers"]
    container = containers[0]
    env = {e["name"]: e for e in container.get("env") or []}

    # Env var names against the binary's settings.
    known = set(re.findall(r'env\s*=\s*"([A-Z0-9_]+)"', config_rs))
    check(known, "src/config.rs declares settings", f"{len(known)} env names")
    refs = [r["configMapRef"]["name"] for r in container.get("envFrom") or [] if "configMapRef" in r]
    check(configmap is not None and refs == [configmap["metadata"]["name"]],
          "the container loads the ConfigMap with envFrom", f"configMapRef {refs}")
    set_names = set(env) | set((configmap or {}).get("data") or {})
    unknown = sorted(set_names - known)
    check(not unknown, "every env var set is a setting in src/config.rs",
          f"unknown: {unknown}" if unknown else ", ".join(sorted(set_names)))
    for name in ("DATABASE_URL", "MASK_KEY"):
        ref = (env.get(name, {}).get("valueFrom") or {}).get("secretKeyRef") or {}
        check(ref.get("name") == "loginflow" and ref.get("key") == name,
              f"{name} comes from Secret loginflow by reference", str(ref))

    # Routes.
    routes = set(re.findall(r'\.route\(\s*"(/[^"]*)"', http_rs))
    probes = {k: container.get(k, {}).get("httpGet", {}) for k in ("livenessProbe", "readinessProbe")}
    scrape_cm = next((d for d in docs if d.get("kind") == "ConfigMap" and d is not configmap), None)
    scrape = yaml.safe_load(next(iter(scrape_cm["data"].values())))["scrape_configs"][0] if scrape_cm else {}
    wanted = {"livenessProbe": "/healthz", "readinessProbe": "/readyz"}
    for probe, path in wanted.items():
        got = probes[probe].get("path")
        check(got == path and got in routes, f"{probe} path {got} is a route of src/http.rs",
              f"routes: {sorted(routes)}")
    metrics_path = scrape.get("metrics_path", "/metrics")
    check(metrics_path == "/metrics" and metrics_path in routes,
          f"scrape path {metrics_path} is a route of src/http.rs")

    # Port.
    ports = {p.get("name"): p.get("containerPort") for p in container.get("ports") or []}
    addr = env.get("METRICS_ADDR", {}).get("value", "")
    m = re.fullmatch(r"(.+):([0-9]+)", addr)
    check(m and m.group(1) in ("0.0.0.0", "[::]", "::") , "METRICS_ADDR listens on all interfaces", addr)
    check(m and ports.get("metrics") == int(m.group(2)),
          "container port `metrics` is METRICS_ADDR's port", f"{ports.get('metrics')} vs {addr}")
    check(all(p.get("port") in ("metrics", ports.get("metrics")) for p in probes.values()),
          "probes use the metrics port", str([p.get("port") for p in probes.values()]))
    keep = {tuple(r.get("source_labels") or []): r.get("regex") for r in scrape.get("relabel_configs") or []
            if r.get("action") == "keep"}
    check(keep.get(("__meta_kubernetes_pod_container_port_name",)) == "metrics"
          and keep.get(("__meta_kubernetes_pod_label_app_kubernetes_io_name",)) == LABEL[1],
          "the scrape config keeps the pods' label and the `metrics` port", str(keep))

    # Shutdown.
    grace = int(env.get("SHUTDOWN_GRACE_SECS", {}).get("value", "30"))
    extra = {}
    for const, default in DEFAULT_EXTRA_WAIT.items():
        m = re.search(rf"const {const}:\s*[\w:]*Duration\s*=\s*[\w:]*Duration::from_secs\(([0-9]+)\)", all_rs)
        extra[const] = int(m.group(1)) if m else default
        if not m:
            print(f"note {const} not found in src/; assuming {default} s")
    tgps = pod.get("terminationGracePeriodSeconds", 30)
    need = grace + sum(extra.values())
    check(tgps > need, "terminationGracePeriodSeconds > SHUTDOWN_GRACE_SECS + ABORT_WAIT + TASKS_WAIT",
          f"{tgps} > {grace} + {extra['ABORT_WAIT']} + {extra['TASKS_WAIT']} = {need}")

    # User.
    m = re.search(r"useradd[^\n]*--uid[= ]([0-9]+)", dockerfile)
    uid = (container.get("securityContext") or {}).get("runAsUser", (pod.get("securityContext") or {}).get("runAsUser"))
    check(m and uid == int(m.group(1)), "runAsUser is the Dockerfile's uid",
          f"{uid} vs {m.group(1) if m else 'no useradd --uid in Dockerfile'}")

    # Cross references.
    spec = scaled["spec"]
    target = spec["scaleTargetRef"]
    check(target["name"] == deployment["metadata"]["name"] and target.get("kind", "Deployment") == "Deployment",
          "ScaledObject targets the Deployment", f"{target.get('kind', 'Deployment')}/{target['name']}")
    check(spec.get("minReplicaCount", 0) <= spec.get("maxReplicaCount", 100),
          "minReplicaCount <= maxReplicaCount", f"{spec.get('minReplicaCount')} <= {spec.get('maxReplicaCount')}")
    check("replicas" not in deployment["spec"], "the Deployment leaves replicas to KEDA")
    for i, trig in enumerate(spec["triggers"]):
        ref = trig.get("authenticationRef", {}).get("name")
        check(ref == trigger_auth["metadata"]["name"], f"trigger {i} uses the TriggerAuthentication", str(ref))
        md = trig.get("metadata") or {}
        data = (configmap or {}).get("data") or {}
        check(md.get("queueURL") == data.get("QUEUE_URL") and md.get("awsRegion") == data.get("AWS_REGION"),
              f"trigger {i} polls the ConfigMap's QUEUE_URL in its AWS_REGION",
              f"{md.get('queueURL')} {md.get('awsRegion')}")
    check(pod.get("serviceAccountName") == service_account["metadata"]["name"],
          "the pods run as the ServiceAccount", str(pod.get("serviceAccountName")))
    if (trigger_auth["spec"].get("podIdentity") or {}).get("identityOwner") == "workload":
        check("eks.amazonaws.com/role-arn" in (service_account["metadata"].get("annotations") or {}),
              "the ServiceAccount carries the role KEDA assumes (identityOwner: workload)")

    # Labels and selectors.
    pod_labels = deployment["spec"]["template"]["metadata"].get("labels") or {}
    unlabelled = [f"{d['kind']}/{d['metadata']['name']}" for d in docs
                  if (d["metadata"].get("labels") or {}).get(LABEL[0]) != LABEL[1]]
    check(not unlabelled and pod_labels.get(LABEL[0]) == LABEL[1], f"every object and the pods carry {LABEL[0]}: {LABEL[1]}",
          f"missing on {unlabelled}" if unlabelled else "")
    for d in docs:
        sel = (d.get("spec") or {}).get("selector", {}).get("matchLabels") if d["kind"] in ("Deployment", "PodDisruptionBudget") else None
        if sel is not None:
            check(sel and all(pod_labels.get(k) == v for k, v in sel.items()),
                  f"{d['kind']} selector matches the pod labels", str(sel))

    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
