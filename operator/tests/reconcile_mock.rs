//! The Kubernetes calls of a reconcile, checked against a mocked API (tower-test), as kube-rs
//! projects test controllers: the exact requests, in order, answered with realistic objects.

use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use kube::client::Body;
use kube::runtime::events::{Recorder, Reporter};
use oxcd_operator::controller::{reconcile, Context};
use oxcd_operator::crd::EtcdCluster;
use oxcd_operator::metrics::Metrics;
use serde_json::{json, Value};
use std::sync::Arc;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

fn cluster(spec: Value) -> EtcdCluster {
    serde_json::from_value(json!({
        "apiVersion": "oxcd.io/v1alpha1", "kind": "EtcdCluster",
        "metadata": {"name": "demo", "namespace": "prod", "uid": "7c0ffee0-0000-4000-8000-000000000001", "generation": 1},
        "spec": spec,
    }))
    .unwrap()
}

fn context() -> (Arc<Context>, Handle) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "prod");
    let ctx = Context {
        client: client.clone(),
        recorder: Recorder::new(
            client,
            Reporter {
                controller: "oxcd-operator".into(),
                instance: None,
            },
        ),
        domain_suffix: String::new(),
        metrics: Metrics::default(),
        failpoint: None,
        operator_image: "oxcd-operator:test".into(),
    };
    (Arc::new(ctx), handle)
}

fn respond(status: StatusCode, body: Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(&body).unwrap()))
        .unwrap()
}

fn not_found() -> Response<Body> {
    respond(
        StatusCode::NOT_FOUND,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"}),
    )
}

/// The next request: method, path with query, and body as JSON.
async fn next(
    handle: &mut Handle,
) -> (
    Method,
    String,
    Value,
    tower_test::mock::SendResponse<Response<Body>>,
) {
    let (req, send) =
        tokio::time::timeout(std::time::Duration::from_secs(10), handle.next_request())
            .await
            .expect("the reconcile made no further request")
            .expect("the client went away");
    let method = req.method().clone();
    let uri = req.uri().to_string();
    let bytes = req.into_body().collect().await.unwrap().to_bytes();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap_or(Value::Null)
    };
    (method, uri, body, send)
}

#[tokio::test]
async fn a_new_cluster_is_created_with_bootstrap_first_then_reported() {
    let (ctx, mut api) = context();
    let ec = Arc::new(cluster(json!({"replicas": 3, "version": "0.1.0"})));
    let task = tokio::spawn(reconcile(ec, ctx));

    // Observe: nothing exists yet.
    let (m, uri, _, send) = next(&mut api).await;
    assert_eq!(
        (m, uri.as_str()),
        (
            Method::GET,
            "/apis/apps/v1/namespaces/prod/statefulsets/demo"
        )
    );
    send.send_response(not_found());
    let (m, uri, _, send) = next(&mut api).await;
    assert_eq!(
        (m, uri.as_str()),
        (
            Method::GET,
            "/api/v1/namespaces/prod/configmaps/demo-bootstrap"
        )
    );
    send.send_response(not_found());
    for kind in ["pods", "persistentvolumeclaims"] {
        let (m, uri, _, send) = next(&mut api).await;
        assert_eq!(m, Method::GET);
        assert!(
            uri.starts_with(&format!("/api/v1/namespaces/prod/{kind}?")),
            "{uri}"
        );
        assert!(uri.contains("labelSelector=app.kubernetes.io%2Finstance%3Ddemo%2Capp.kubernetes.io%2Fname%3Doxcd"), "{uri}");
        send.send_response(respond(StatusCode::OK, json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "1"}, "items": []})));
    }

    // Act: the bootstrap ConfigMap before anything that starts a member, then the rest,
    // each with server-side apply under our field manager.
    let expected = [
        (
            "/api/v1/namespaces/prod/configmaps/demo-bootstrap",
            "ConfigMap",
        ),
        ("/api/v1/namespaces/prod/services/demo-peer", "Service"),
        ("/api/v1/namespaces/prod/services/demo", "Service"),
        (
            "/apis/policy/v1/namespaces/prod/poddisruptionbudgets/demo",
            "PodDisruptionBudget",
        ),
        (
            "/apis/apps/v1/namespaces/prod/statefulsets/demo",
            "StatefulSet",
        ),
    ];
    for (path, kind) in expected {
        let (m, uri, body, send) = next(&mut api).await;
        assert_eq!(m, Method::PATCH);
        assert_eq!(
            uri,
            format!("{path}?&force=true&fieldManager=oxcd-operator")
        );
        assert_eq!(body["kind"], kind);
        assert_eq!(
            body["metadata"]["ownerReferences"][0]["uid"],
            "7c0ffee0-0000-4000-8000-000000000001"
        );
        assert_eq!(body["metadata"]["ownerReferences"][0]["controller"], true);
        match kind {
            "ConfigMap" => {
                assert_eq!(body["data"]["ETCD_INITIAL_CLUSTER_STATE"], "new");
                assert_eq!(
                    body["data"]["ETCD_INITIAL_CLUSTER"],
                    "demo-0=http://demo-0.demo-peer.prod.svc:2380,demo-1=http://demo-1.demo-peer.prod.svc:2380,demo-2=http://demo-2.demo-peer.prod.svc:2380"
                );
            }
            "StatefulSet" => assert_eq!(body["spec"]["replicas"], 3),
            "PodDisruptionBudget" => assert_eq!(body["spec"]["minAvailable"], 2),
            _ => {}
        }
        send.send_response(respond(StatusCode::OK, body));
    }

    // Report: an Event for the action, then the status.
    let (m, uri, body, send) = next(&mut api).await;
    assert_eq!(
        (m, uri.as_str()),
        (
            Method::POST,
            "/apis/events.k8s.io/v1/namespaces/prod/events?"
        )
    );
    assert_eq!(body["reason"], "CreateCluster");
    assert_eq!(body["note"], "created a new cluster of 3 members");
    send.send_response(respond(StatusCode::CREATED, body));
    let (m, uri, body, send) = next(&mut api).await;
    assert_eq!(
        (m, uri.as_str()),
        (
            Method::PATCH,
            "/apis/oxcd.io/v1alpha1/namespaces/prod/etcdclusters/demo/status?"
        )
    );
    let status = &body["status"];
    assert_eq!(status["phase"], "Creating");
    assert_eq!(status["observedGeneration"], 1);
    assert_eq!(
        status["selector"],
        "app.kubernetes.io/instance=demo,app.kubernetes.io/name=oxcd"
    );
    let progressing = status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Progressing")
        .unwrap();
    assert_eq!(
        (
            progressing["status"].as_str(),
            progressing["reason"].as_str()
        ),
        (Some("True"), Some("CreateCluster"))
    );
    send.send_response(respond(StatusCode::OK, json!({"apiVersion": "oxcd.io/v1alpha1", "kind": "EtcdCluster", "metadata": {"name": "demo", "namespace": "prod"}, "spec": {"replicas": 3}, "status": status})));

    task.await.unwrap().expect("reconcile succeeds");
}

#[tokio::test]
async fn an_invalid_spec_changes_nothing_and_says_why() {
    let (ctx, mut api) = context();
    let ec = Arc::new(cluster(
        json!({"replicas": 3, "options": {"initial-cluster-state": "existing"}}),
    ));
    let task = tokio::spawn(reconcile(ec, ctx));
    // The only call: the status, Degraded with the reason.
    let (m, uri, body, send) = next(&mut api).await;
    assert_eq!(
        (m, uri.as_str()),
        (
            Method::PATCH,
            "/apis/oxcd.io/v1alpha1/namespaces/prod/etcdclusters/demo/status?"
        )
    );
    let degraded = body["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Degraded")
        .unwrap()
        .clone();
    assert_eq!(degraded["reason"], "InvalidSpec");
    assert_eq!(
        degraded["message"],
        "spec.options.initial-cluster-state: the operator sets this flag itself"
    );
    send.send_response(respond(StatusCode::OK, json!({"apiVersion": "oxcd.io/v1alpha1", "kind": "EtcdCluster", "metadata": {"name": "demo", "namespace": "prod"}, "spec": {"replicas": 3}})));
    task.await.unwrap().expect("reconcile succeeds");
    // No further request: either none arrives, or the client is gone.
    let more =
        tokio::time::timeout(std::time::Duration::from_millis(300), api.next_request()).await;
    assert!(matches!(more, Err(_) | Ok(None)), "nothing else is touched");
}
