//! Tenants' own models: loaded with a tenant's key into its own namespace, from pinned remote
//! files only, within `quota.max_models` and `quota.max_model_bytes`; seen by that tenant's
//! guests and OIP calls (before a shared model of the same name) and by no other tenant; kept
//! across a restart.

use std::collections::HashMap;

use kiln_tests::{Server, artifact, examples_config};
use serde_json::{Value, json};

use super::sources::{FileServer, offset_bytes, remote_spec, sha256};
use super::{json_of, runtime, until_ready};

/// What tenant `tenant`'s guest (the misbehave guest, deployed as `NAME-nn`) gets from
/// `load-by-name(name)`.
async fn load_as(server: &Server, handler: &str, tenant: &str, name: &str) -> String {
    let url = server.url(&format!("/v1/handlers/{handler}/nn/load?{name}"));
    let (status, body) = json_of(server.client(tenant).get(url).send().await.expect("guest call")).await;
    assert_eq!(status, 200, "{body}");
    body["code"].as_str().unwrap_or_default().to_owned()
}

/// `name` as `tenant` calls it over OIP: the status and y[0] - x[0] (the offset file's number).
async fn offset_as(server: &Server, tenant: &str, name: &str) -> (u16, Option<f64>) {
    let request = json!({ "inputs": [{ "name": "x", "datatype": "FP32", "shape": [1, 4], "data": [0.0, 1.0, 2.0, 3.0] }] });
    let response = server.client(tenant).post(server.url(&format!("/v2/models/{name}/infer"))).json(&request).send().await;
    let (status, body) = json_of(response.expect("infer")).await;
    (status, body["outputs"][0]["data"][0].as_f64())
}

#[test]
fn a_tenant_loads_its_own_models_within_its_quota_and_no_other_tenant_sees_them() {
    let (one, two, three) = (offset_bytes(1), offset_bytes(2), offset_bytes(3));
    let (d1, d2, d3) = (sha256(&one), sha256(&two), sha256(&three));
    let biggest = one.len().max(two.len()).max(three.len());
    let web = FileServer::start(HashMap::from([
        ("offset-1.pt".to_owned(), one),
        ("offset-2.pt".to_owned(), two),
        ("offset-3.pt".to_owned(), three),
    ]));
    let acme = format!(
        "[[tenant]]\nname = \"acme\"\nmodels = [\"digits\"]\n\
         quota = {{ max_models = 2, max_model_bytes = {} }}\n\
         [[handler]]\nname = \"acme-nn\"\ntenant = \"acme\"\ncomponent = \"{}\"\n",
        biggest * 5 / 2,
        artifact("target/wasm32-wasip2/guest/misbehave.wasm").display()
    );
    // The file server is on loopback: let tenants' sources be private here.
    let config = examples_config("tenant_private_sources = true", &[], &acme);
    let server = Server::start(&config, &["demo", "mallory", "acme"]).unwrap_or_else(|e| panic!("{e:#}"));
    let rt = runtime();
    let put = |tenant: &str, name: &str, spec: Value| {
        server.client(tenant).put(server.url(&format!("/v1/models/{name}"))).json(&spec).send()
    };
    let file = |n: u32, digest: &str| remote_spec(&web.url(&format!("/files/offset-{n}.pt")), Some(digest));
    let without_tenants = |mut spec: Value| {
        spec.as_object_mut().expect("object").remove("tenants");
        spec
    };
    rt.block_on(async {
        // Refusals: no quota for models, a file of the server's, naming other tenants.
        let (status, body) = json_of(put("demo", "mine", without_tenants(file(1, &d1))).await.expect("put")).await;
        assert_eq!(status, 403, "{body}");
        assert!(body["error"].as_str().unwrap_or_default().contains("quota.max_models is 0"), "{body}");
        let local = json!({
            "source": artifact("build/models/offset-1.pt").display().to_string(),
            "inputs": [{ "name": "x", "dtype": "FP32", "shape": [-1, 4] }], "outputs": [{ "name": "y" }],
        });
        let (status, body) = json_of(put("acme", "mine", local).await.expect("put")).await;
        assert_eq!(status, 400, "{body}");
        assert!(body["error"].as_str().unwrap_or_default().contains("not a file of the server's"), "{body}");
        let (status, body) = json_of(put("acme", "mine", file(1, &d1)).await.expect("put")).await;
        assert_eq!(status, 400, "{body}");
        assert!(body["error"].as_str().unwrap_or_default().contains("leave `tenants` out"), "{body}");

        // Its own model: served to it under its name, to nobody else.
        let (status, body) = json_of(put("acme", "mine", without_tenants(file(1, &d1))).await.expect("put")).await;
        assert_eq!((status, body["name"].as_str(), body["origin"].as_str()), (201, Some("mine"), Some("tenant")), "{body}");
        assert_eq!(offset_as(&server, "acme", "mine").await, (200, Some(1.0)));
        assert_eq!(load_as(&server, "acme-nn", "acme", "mine").await, "ok");
        assert_eq!(offset_as(&server, "demo", "mine").await.0, 404);
        assert_eq!(load_as(&server, "misbehave", "mallory", "mine").await, "NotFound");
        let (status, _) = json_of(server.client("demo").get(server.url("/v1/models/mine")).send().await.expect("get")).await;
        assert_eq!(status, 404, "another tenant's own model is not there");
        let (_, listed) = json_of(server.client("acme").get(server.url("/v1/models")).send().await.expect("list")).await;
        let names: Vec<&str> = listed["models"].as_array().expect("models").iter().filter_map(|m| m["name"].as_str()).collect();
        assert_eq!(names, ["mine", "digits"], "its own, then those it may use");
        let (_, all) = json_of(server.admin_client().get(server.admin_url("/v1/models")).send().await.expect("list")).await;
        assert!(all["models"].as_array().expect("models").iter().any(|m| m["name"] == "acme:mine" && m["origin"] == "tenant"), "{all}");

        // Its own `digits` comes before the operator's for it alone. With `precision = "auto"`,
        // searched for in its confined workers; it cannot name calibration files (the server's).
        let mut auto = without_tenants(file(2, &d2));
        auto["precision"] = json!("auto");
        let mut calibrated = auto.clone();
        calibrated["calibration"] = json!(["/etc/passwd"]);
        let (status, body) = json_of(put("acme", "digits", calibrated).await.expect("put")).await;
        assert_eq!(status, 400, "{body}");
        assert!(body["error"].as_str().unwrap_or_default().starts_with("calibration: "), "{body}");
        let (status, body) = json_of(put("acme", "digits", auto).await.expect("put")).await;
        assert_eq!(status, 201, "{body}");
        assert_eq!(offset_as(&server, "acme", "digits").await, (200, Some(2.0)));
        let (_, info) = json_of(server.client("acme").get(server.url("/v1/models/digits")).send().await.expect("info")).await;
        let choice = &info["precision_search"][0];
        assert_eq!((choice["model"].as_str(), choice["device"].as_str()), (Some("digits"), Some("cpu")), "by the name it knows: {info}");
        assert_eq!(choice["candidates"].as_array().map(Vec::len), Some(3), "{info}");
        let chosen = choice["precision"].as_str().expect("precision");
        assert!(info["precision"].as_str().is_some_and(|p| p.starts_with(chosen)), "{info}");
        let (_, meta) = json_of(server.client("demo").get(server.url("/v2/models/digits")).send().await.expect("meta")).await;
        assert_eq!(meta["inputs"][0]["name"], "image", "demo still gets the operator's digits: {meta}");

        // Over the count, then over the bytes (a replacement counts its own new files only).
        let (status, body) = json_of(put("acme", "third", without_tenants(file(3, &d3))).await.expect("put")).await;
        assert_eq!(status, 403, "{body}");
        assert!(body["error"].as_str().unwrap_or_default().contains("quota.max_models"), "{body}");
        let two_versions = json!({
            "versions": [
                { "version": 1, "source": web.url("/files/offset-1.pt"), "sha256": d1 },
                { "version": 3, "source": web.url("/files/offset-3.pt"), "sha256": d3 },
            ],
            "version_policy": "all",
            "inputs": [{ "name": "x", "dtype": "FP32", "shape": [-1, 4] }], "outputs": [{ "name": "y" }],
        });
        let (status, body) = json_of(put("acme", "mine", two_versions).await.expect("put")).await;
        assert_eq!(status, 403, "{body}");
        assert!(body["error"].as_str().unwrap_or_default().contains("quota.max_model_bytes"), "{body}");
        assert_eq!(offset_as(&server, "acme", "mine").await, (200, Some(1.0)), "the one served stays");

        // Deleting its own `digits` uncovers the operator's; it cannot delete the operator's.
        let (status, _) = json_of(server.client("acme").delete(server.url("/v1/models/digits")).send().await.expect("delete")).await;
        assert_eq!(status, 200);
        let (_, meta) = json_of(server.client("acme").get(server.url("/v2/models/digits")).send().await.expect("meta")).await;
        assert_eq!(meta["inputs"][0]["name"], "image", "{meta}");
        let (status, _) = json_of(server.client("acme").delete(server.url("/v1/models/digits")).send().await.expect("delete")).await;
        assert_eq!(status, 404);
        let audit = server.audit_log_with(|l| l.contains("model_delete"));
        assert!(audit.lines().any(|l| l.contains("model_delete") && l.contains("acme")), "{audit}");
    });

    server.restart().expect("restart");
    rt.block_on(async {
        until_ready(&server, "acme:mine").await;
        assert_eq!(offset_as(&server, "acme", "mine").await, (200, Some(1.0)), "kept across a restart");
        assert_eq!(offset_as(&server, "demo", "mine").await.0, 404);
    });
}

/// Two tenants at once on one server, sharing its cores, its sandbox pool, the operator's digits
/// model and the model repository: while `acme` loads its own MiniLM with `precision = "auto"`
/// (downloaded, confined in its workers, and searched there: seconds of every core it gets) and
/// calls digits through its own handler, `demo` calls digits through the examples' handler.
/// acme calls as fast as it gets answers, past its rate quota (1000/s) where the machine is fast
/// enough: those 429s are its own. None of demo's calls fails or answers differently from
/// before, and acme's search finishes, reported to acme under its own name.
#[test]
fn a_neighbour_s_precision_search_never_fails_or_changes_another_tenant_s_answers() {
    let minilm = std::fs::read(artifact("build/models/minilm.pt")).expect("minilm.pt");
    let digest = sha256(&minilm);
    let bytes = minilm.len();
    let web = FileServer::start(HashMap::from([("minilm.pt".to_owned(), minilm)]));
    let acme = format!(
        "[[tenant]]\nname = \"acme\"\nmodels = [\"digits\"]\nquota = {{ max_models = 1, max_model_bytes = {} }}\n\
         [[handler]]\nname = \"acme-digits\"\ntenant = \"acme\"\nmodels = [\"digits\"]\ncomponent = \"{}\"\n",
        bytes * 2,
        artifact("target/wasm32-wasip2/guest/digits.wasm").display()
    );
    let config = examples_config("tenant_private_sources = true", &[], &acme);
    let server = Server::start(&config, &["demo", "acme"]).unwrap_or_else(|e| panic!("{e:#}"));
    let rt = runtime();
    rt.block_on(async {
        let digits = |png: Vec<u8>| server.client("demo").post(server.url("/v1/handlers/digits/")).body(png).send();
        let acme_digits = |png: Vec<u8>| server.client("acme").post(server.url("/v1/handlers/acme-digits/")).body(png).send();
        let mut baseline = Vec::new();
        for (png, _) in kiln_tests::holdout(8) {
            let (status, body) = json_of(digits(png.clone()).await.expect("digits")).await;
            assert_eq!(status, 200, "{body}");
            baseline.push((png, body));
        }
        let spec = json!({
            "source": web.url("/files/minilm.pt"), "sha256": digest, "precision": "auto",
            "inputs": [
                { "name": "input_ids", "dtype": "INT64", "shape": [-1, -1], "ragged_dim": 1, "pad": 0, "min": 0, "max": 30521, "max_dims": [-1, 512] },
                { "name": "attention_mask", "dtype": "INT64", "shape": [-1, -1], "ragged_dim": 1, "pad": 0, "min": 0, "max": 1, "max_dims": [-1, 512] },
            ],
            "outputs": [{ "name": "last_hidden_state", "ragged_dim": 1 }],
        });
        let put = server.client("acme").put(server.url("/v1/models/embedder")).json(&spec).send();
        let loading = tokio::spawn(async move { json_of(put.await.expect("put")).await });
        // Four callers of each tenant at a time, round after round, until acme's load has answered.
        let (mut rounds_while_loading, mut acme_answered) = (0, 0);
        while !loading.is_finished() {
            let calls: Vec<_> = baseline.iter().take(4).map(|(png, _)| digits(png.clone())).collect();
            let theirs: Vec<_> = baseline.iter().skip(4).take(4).map(|(png, _)| acme_digits(png.clone())).collect();
            let (calls, theirs) = futures::future::join(futures::future::join_all(calls), futures::future::join_all(theirs)).await;
            for call in theirs {
                // acme calls past its default rate (1000/s) too: its own quota answers.
                let (status, got) = json_of(call.expect("acme's digits")).await;
                assert!(status == 200 || (status == 429 && got["kind"] == "quota"), "acme's own digits call ({status}): {got}");
                acme_answered += usize::from(status == 200);
            }
            for ((call, (_, want)), i) in calls.into_iter().zip(&baseline).zip(0..) {
                let (status, got) = json_of(call.expect("digits")).await;
                assert_eq!(status, 200, "demo's call {i} while acme searched: {got}");
                assert!(kiln_tests::same_digits_answer(&got, want), "demo's answer changed while acme searched: {got} against {want}");
            }
            rounds_while_loading += 1;
        }
        let (status, body) = loading.await.expect("load task");
        assert_eq!(status, 201, "{body}");
        assert!(rounds_while_loading >= 3, "demo's calls overlapped acme's load only {rounds_while_loading} times");
        assert!(acme_answered > 0, "acme's own calls were answered too");

        let (_, info) = json_of(server.client("acme").get(server.url("/v1/models/embedder")).send().await.expect("info")).await;
        let choice = &info["precision_search"][0];
        assert_eq!((choice["model"].as_str(), choice["device"].as_str()), (Some("embedder"), Some("cpu")), "{info}");
        assert_eq!(choice["candidates"].as_array().map(Vec::len), Some(3), "every candidate reported: {info}");
        let (status, _) = json_of(server.client("demo").get(server.url("/v1/models/embedder")).send().await.expect("info")).await;
        assert_eq!(status, 404, "demo does not see acme's model");
    });
}
