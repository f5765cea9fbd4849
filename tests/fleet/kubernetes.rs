//! `deploy/kubernetes` as an operator uses it: key hashes made by `kiln tenant add-key` into the
//! folder the Secret is generated from, each overlay built with `kubectl kustomize`, every object
//! validated strictly (kubernetes-validate's schemas for built-in kinds, the KEDA ScaledObject
//! schema kept in `deploy/kubernetes/schemas`), and what the objects say checked against a real
//! kiln serving their ConfigMap: the probes answer, the ports are the config's, the mounts are
//! where the config looks, the drain fits in the grace period, the autoscaling queries name
//! metrics kiln exports. There is no Kubernetes cluster here; the Swarm tests run the same config.

use std::path::Path;
use std::process::{Command, Stdio};

use kiln_tests::{Server, TempDir, artifact, kiln};
use serde_json::Value;

/// The Kubernetes versions the objects must be valid for: the oldest still maintained by a large
/// cloud when this was written, and the newest kubernetes-validate knows.
const VERSIONS: &[&str] = &["1.30.0", "1.37.0"];

/// `kubectl kustomize DIR`, or why it cannot run here.
fn kustomize(dir: &Path) -> Result<String, String> {
    let output = Command::new("kubectl").arg("kustomize").arg(dir).output().map_err(|e| format!("cannot run kubectl: {e}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

/// The objects in `yaml`, validated by `tests/python/validate_kubernetes.py`.
fn validated(yaml: &str, schemas: &Path) -> Vec<Value> {
    let mut child = Command::new(kiln_tests::python())
        .arg(kiln_tests::root().join("tests/python/validate_kubernetes.py"))
        .arg(schemas)
        .args(VERSIONS)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("validator");
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), yaml.as_bytes()).expect("write");
    let output = child.wait_with_output().expect("validator");
    assert!(output.status.success(), "not valid:\n{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).expect("objects")
}

fn one<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = objects.iter().filter(|o| o["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "one {kind}: {found:?}");
    found[0]
}

/// The port of a `HOST:PORT` line `field = "..."` in `toml`.
fn port_of(toml: &str, field: &str) -> u64 {
    let line = toml.lines().find(|l| l.starts_with(&format!("{field} ="))).unwrap_or_else(|| panic!("no {field} in the config"));
    line.trim_end_matches('"').rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("{line}"))
}

fn string_field<'a>(toml: &'a str, field: &str) -> &'a str {
    let line = toml.lines().find(|l| l.starts_with(&format!("{field} ="))).unwrap_or_else(|| panic!("no {field} in the config"));
    line.split('"').nth(1).unwrap_or_else(|| panic!("{line}"))
}

/// The body of a config file: what follows its leading comment.
fn body(toml: &str) -> String {
    toml.lines().skip_while(|l| l.starts_with('#')).collect::<Vec<_>>().join("\n")
}

fn container_port(container: &Value, name: &str) -> u64 {
    container["ports"].as_array().expect("ports").iter().find(|p| p["name"] == name).unwrap_or_else(|| panic!("no port {name}"))["containerPort"]
        .as_u64()
        .expect("port")
}

#[tokio::test]
async fn the_kustomize_overlays_are_valid_and_agree_with_the_config_they_serve() {
    let test = "fleet::kubernetes::the_kustomize_overlays_are_valid_and_agree_with_the_config_they_serve";
    match Command::new("kubectl").args(["version", "--client"]).output() {
        Ok(out) if out.status.success() && String::from_utf8_lossy(&out.stdout).contains("Kustomize") => {}
        other => {
            let why = other.map_or_else(|e| e.to_string(), |o| String::from_utf8_lossy(&o.stderr).into_owned());
            kiln_tests::skip(test, &format!("needs kubectl 1.24 or later (with its kustomize) on PATH: {}", why.trim()));
            return;
        }
    }
    // The folder as an operator has it: the repository's, plus key hashes kiln made.
    let dir = TempDir::new("kiln-kustomize").expect("dir");
    let copied = Command::new("cp").arg("-r").arg(kiln_tests::root().join("deploy/kubernetes")).arg(&dir.path).status().expect("cp");
    assert!(copied.success());
    let k8s = dir.path.join("kubernetes");
    let _ = std::fs::remove_dir_all(k8s.join("base/keys"));
    // Without the key hashes, the build stops and says which file it wanted.
    let missing = kustomize(&k8s.join("overlays/cpu")).expect_err("no keys, no build");
    assert!(missing.contains("keys/tenant-keys/demo.keys"), "{missing}");
    let local = dir.path.join("local.toml");
    std::fs::write(&local, format!("[server]\nstate_dir = \"{0}/state\"\nkeys_dir = \"{0}/kubernetes/base/keys\"\n\n[[tenant]]\nname = \"demo\"\n", dir.path.display()))
        .expect("config");
    kiln(&["tenant", "add-key", "demo", "--config", &local.display().to_string()]).expect("add-key");
    let hashes = std::fs::read(k8s.join("base/keys/tenant-keys/demo.keys")).expect("hashes");

    let config = std::fs::read_to_string(k8s.join("base/kiln.toml")).expect("kiln.toml");
    let swarm = std::fs::read_to_string(kiln_tests::root().join("deploy/docker/cluster.toml")).expect("cluster.toml");
    assert_eq!(body(&config), body(&swarm), "base/kiln.toml is deploy/docker/cluster.toml, which the Swarm tests run");
    assert!(config.contains("\ncluster = true"), "the replicas run in cluster mode");

    let schemas = kiln_tests::root().join("deploy/kubernetes/schemas");
    let cpu = validated(&kustomize(&k8s.join("overlays/cpu")).expect("cpu overlay"), &schemas);
    let gpu = validated(&kustomize(&k8s.join("overlays/gpu")).expect("gpu overlay"), &schemas);
    for kind in ["ConfigMap", "Secret", "Service", "Deployment", "PodDisruptionBudget", "ScaledObject"] {
        one(&cpu, kind);
        one(&gpu, kind);
    }
    // The other components, in an overlay as an operator would write it, are valid too: the
    // plain HPA in place of KEDA, the network policy, and TLS.
    let own_overlay = k8s.join("overlays/own");
    std::fs::create_dir_all(&own_overlay).expect("dir");
    std::fs::write(
        own_overlay.join("kustomization.yaml"),
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [../../base]\ncomponents: [../../components/hpa, ../../components/network-policy, ../../components/tls]\n",
    )
    .expect("overlay");
    let own = validated(&kustomize(&own_overlay).expect("own overlay"), &schemas);
    assert_eq!(one(&own, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]["name"], "kiln");
    let policy = one(&own, "NetworkPolicy");
    // With TLS: kiln is given the Secret's files, and the probes speak HTTPS.
    let tls_container = &one(&own, "Deployment")["spec"]["template"]["spec"]["containers"][0];
    let env_of = |name: &str| tls_container["env"].as_array().and_then(|e| e.iter().find(|v| v["name"] == name)).map(|v| v["value"].clone());
    assert_eq!(env_of("KILN_SERVER__TLS_CERT"), Some(serde_json::json!("/run/secrets/kiln-tls/tls.crt")));
    assert_eq!(env_of("KILN_SERVER__TLS_KEY"), Some(serde_json::json!("/run/secrets/kiln-tls/tls.key")));
    // The scrape and the autoscalers' queries stay on plain HTTP to the metrics port.
    assert_eq!(env_of("KILN_SERVER__METRICS_TLS"), Some(serde_json::json!("false")));
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        assert_eq!(tls_container[probe]["httpGet"]["scheme"], "HTTPS", "{probe}");
    }

    let deployment = one(&cpu, "Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    // What the ConfigMap holds is the file, byte for byte; the Secret is kiln's hashes.
    assert_eq!(one(&cpu, "ConfigMap")["data"]["kiln.toml"].as_str(), Some(config.as_str()));
    use base64::Engine as _;
    let secret = one(&cpu, "Secret");
    // Kustomize folds long base64 over lines, as Kubernetes' decoder accepts.
    let encoded: String = secret["data"]["demo.keys"].as_str().expect("data").split_whitespace().collect();
    let data = base64::engine::general_purpose::STANDARD.decode(encoded).expect("base64");
    assert_eq!(data, hashes);

    // The mounts are where the config and the image look.
    let env = |name: &str| container["env"].as_array().expect("env").iter().find(|e| e["name"] == name).map(|e| e["value"].clone());
    let config_path = env("KILN_CONFIG").and_then(|v| v.as_str().map(str::to_owned)).expect("KILN_CONFIG");
    let mount = |volume: &str| -> String {
        container["volumeMounts"].as_array().expect("mounts").iter().find(|m| m["name"] == volume).unwrap_or_else(|| panic!("no mount {volume}"))["mountPath"]
            .as_str()
            .expect("path")
            .to_owned()
    };
    assert_eq!(Path::new(&config_path).parent(), Some(Path::new(&mount("config"))));
    assert_eq!(mount("keys"), string_field(&config, "keys_dir"));
    assert_eq!(mount("state"), string_field(&config, "state_dir"));
    // Every tenant's hashes land where kiln reads them.
    let sources = pod["volumes"].as_array().expect("volumes").iter().find(|v| v["name"] == "keys").expect("keys volume")["projected"]["sources"].clone();
    let items: Vec<String> = sources.as_array().expect("sources").iter().flat_map(|s| s["secret"]["items"].as_array().cloned().unwrap_or_default()).map(|i| i["path"].as_str().unwrap_or_default().to_owned()).collect();
    let mut tenants = Vec::new();
    let mut lines = config.lines();
    while let Some(line) = lines.next() {
        if line.trim() == "[[tenant]]" {
            let name = lines.find(|l| l.starts_with("name = ")).expect("a tenant's name");
            tenants.push(name.split('"').nth(1).expect("quoted").to_owned());
        }
    }
    assert!(!tenants.is_empty());
    for tenant in &tenants {
        assert!(items.contains(&format!("tenant-keys/{tenant}.keys")), "tenant {tenant}'s hashes are not mounted: {items:?}");
    }
    assert!(items.contains(&"admin.keys".to_owned()), "{items:?}");

    // Not root, read-only, no way up; the image's user.
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["runAsUser"], 10001);
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(container["securityContext"]["allowPrivilegeEscalation"], false);
    assert!(container["resources"]["requests"]["cpu"].is_string() && container["resources"]["limits"]["memory"].is_string());

    // The grace period outlasts the drain kiln runs on SIGTERM (kiln config show: effective values).
    let shown = kiln(&["config", "show", "--config", &k8s.join("base/kiln.toml").display().to_string()]).expect("config show");
    let drain_ms: u64 = shown
        .lines()
        .find(|l| l.trim_start().starts_with("drain_timeout_ms"))
        .and_then(|l| l.split('=').nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no drain_timeout_ms in:\n{shown}"));
    let grace = pod["terminationGracePeriodSeconds"].as_u64().expect("grace");
    assert!(grace * 1000 > drain_ms, "terminationGracePeriodSeconds {grace} s is not above the {drain_ms} ms drain");
    assert_eq!(deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"], 0, "a CPU rollout keeps every replica until its successor is ready");

    // The GPU overlay: the CUDA image, one GPU per replica.
    let gpu_container = &one(&gpu, "Deployment")["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(gpu_container["image"], "kiln:cuda");
    assert_eq!(gpu_container["resources"]["limits"]["nvidia.com/gpu"], "1");
    assert_eq!(container["image"], "kiln:cpu");

    // The policy names the container's ports, and selects its pods; the admin port is not open.
    let rules = policy["spec"]["ingress"].as_array().expect("ingress");
    let allowed: Vec<String> =
        rules.iter().flat_map(|rule| rule["ports"].as_array().cloned().unwrap_or_default()).map(|p| p["port"].as_str().unwrap_or_default().to_owned()).collect();
    assert_eq!(allowed, ["http", "metrics"]);
    for port in &allowed {
        container_port(container, port);
    }
    assert_eq!(policy["spec"]["podSelector"], deployment["spec"]["selector"]);
    assert!(deployment["spec"].get("replicas").is_none(), "the autoscaler owns the replica count");

    // The ports the objects name are the config's.
    assert_eq!(container_port(container, "http"), port_of(&config, "listen"));
    assert_eq!(container_port(container, "admin"), port_of(&config, "admin_listen"));
    assert_eq!(container_port(container, "metrics"), port_of(&config, "metrics_listen"));
    let annotations = &deployment["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/port"].as_str().and_then(|p| p.parse::<u64>().ok()), Some(port_of(&config, "metrics_listen")));
    let service = one(&cpu, "Service");
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "http");
    assert_eq!(service["spec"]["selector"], deployment["spec"]["selector"]["matchLabels"]);
    assert_eq!(one(&cpu, "PodDisruptionBudget")["spec"]["selector"], deployment["spec"]["selector"]);

    // A real kiln on this ConfigMap's config (paths made local, as the image has them): every
    // probe answers on the port it names, and /metrics without a key has what the queries read.
    let metrics_port = kiln_tests::free_port().expect("port");
    let state = TempDir::new("kiln-k8s-state").expect("state");
    let served = config
        .replace("/usr/share/kiln/examples/models/", &format!("{}/", artifact("build/models").display()))
        .replace("/usr/share/kiln/examples/handlers/", &format!("{}/", artifact("target/wasm32-wasip2/guest").display()))
        .replace("/run/secrets/kiln-keys", &state.path.join("keys").display().to_string())
        .replace("/var/lib/kiln", &state.path.join("state").display().to_string());
    let server = Server::start_with_env(&served, &["demo"], &[("KILN_SERVER__METRICS_LISTEN", &format!("127.0.0.1:{metrics_port}"))]).expect("server");
    let client = reqwest::Client::new();
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["port"], "http", "{probe}");
        let path = get["path"].as_str().expect("path");
        assert!(path.starts_with("/v2/health/"), "{probe}: {path}");
        let response = client.get(server.url(path)).send().await.expect("probe");
        assert_eq!(response.status(), 200, "{probe} {path}");
    }
    let png = kiln_tests::a_digit();
    let answered = server.client("demo").post(server.url("/v1/handlers/digits/")).body(png).send().await.expect("digits");
    assert_eq!(answered.status(), 200);
    let metrics = client.get(format!("http://127.0.0.1:{metrics_port}/metrics")).send().await.expect("metrics").text().await.expect("text");
    for trigger in one(&cpu, "ScaledObject")["spec"]["triggers"].as_array().expect("triggers") {
        let query = trigger["metadata"]["query"].as_str().expect("query");
        let names: Vec<&str> = query.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|w| w.starts_with("kiln_")).collect();
        assert!(!names.is_empty(), "{query}");
        for name in names {
            assert!(metrics.lines().any(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} "))), "{name} (in {query}) is not in /metrics:\n{metrics}");
        }
    }
}
