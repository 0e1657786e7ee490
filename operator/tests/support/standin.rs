//! A small stand-in for the Kubernetes API server, for end-to-end tests of the operator on
//! machines without Kubernetes. It stores objects as JSON and serves the REST calls kube-rs
//! makes: get, list (equality label selectors), watch (streamed from an event log, resumable
//! by resourceVersion), create, replace (with resourceVersion conflicts), delete, JSON merge
//! patch, server-side apply and the status subresource.
//!
//! What it does NOT emulate, honestly:
//! - server-side apply field ownership: an apply is a JSON merge of the applied object into
//!   the stored one (lists are replaced), not a managed-fields merge;
//! - schema validation, defaulting, admission, CEL rules (tests of the CRD cover those);
//! - garbage collection through owner references, finalizers and graceful deletion: a delete
//!   removes the object at once (pods are stopped by `kubelet.rs`);
//! - authentication, RBAC, pagination, field selectors, watch bookmarks, 410 Gone.
//! - generation: bumped whenever `spec` changes, for every kind.

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use tokio::sync::broadcast;

/// A collection: API group/version and resource plural, e.g. ("apps/v1", "statefulsets").
pub type Collection = (String, String);

#[derive(Clone, Debug)]
pub struct WatchEvent {
    pub rv: u64,
    pub collection: Collection,
    pub kind: &'static str,
    pub object: Value,
}

#[derive(Default)]
struct State {
    rv: u64,
    /// (collection, namespace, name) -> object.
    objects: BTreeMap<(Collection, String, String), Value>,
    log: Vec<WatchEvent>,
    next_uid: u64,
}

#[derive(Clone)]
pub struct Store {
    state: Arc<Mutex<State>>,
    events: broadcast::Sender<WatchEvent>,
}

fn kind_of(plural: &str) -> &'static str {
    match plural {
        "etcdclusters" => "EtcdCluster",
        "statefulsets" => "StatefulSet",
        "configmaps" => "ConfigMap",
        "pods" => "Pod",
        "persistentvolumeclaims" => "PersistentVolumeClaim",
        "services" => "Service",
        "poddisruptionbudgets" => "PodDisruptionBudget",
        "leases" => "Lease",
        "events" => "Event",
        "secrets" => "Secret",
        _ => "Unknown",
    }
}

pub fn collection(gv: &str, plural: &str) -> Collection {
    (gv.to_string(), plural.to_string())
}

/// JSON merge patch (RFC 7386).
pub fn merge(target: &mut Value, patch: &Value) {
    match (target.as_object_mut(), patch.as_object()) {
        (Some(t), Some(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        _ => *target = patch.clone(),
    }
}

fn matches_selector(obj: &Value, selector: &[(String, String)]) -> bool {
    selector
        .iter()
        .all(|(k, v)| obj["metadata"]["labels"][k].as_str() == Some(v.as_str()))
}

impl Store {
    pub fn new() -> Store {
        let (events, _) = broadcast::channel(4096);
        Store {
            state: Arc::default(),
            events,
        }
    }

    pub fn get(&self, c: &Collection, ns: &str, name: &str) -> Option<Value> {
        let s = self.state.lock().unwrap();
        s.objects
            .get(&(c.clone(), ns.to_string(), name.to_string()))
            .cloned()
    }

    pub fn list(
        &self,
        c: &Collection,
        ns: Option<&str>,
        selector: &[(String, String)],
    ) -> (u64, Vec<Value>) {
        let s = self.state.lock().unwrap();
        let items = s
            .objects
            .iter()
            .filter(|((col, n, _), _)| col == c && ns.is_none_or(|ns| ns == n))
            .filter(|(_, o)| matches_selector(o, selector))
            .map(|(_, o)| o.clone())
            .collect();
        (s.rv, items)
    }

    /// Creates or replaces an object, filling metadata as the API server does.
    /// `expect_rv`: optimistic concurrency (409 on mismatch). `create_only`: 409 if present.
    pub fn put(
        &self,
        c: &Collection,
        ns: &str,
        mut obj: Value,
        expect_rv: Option<&str>,
        create_only: bool,
    ) -> Result<Value, (u16, String)> {
        let mut s = self.state.lock().unwrap();
        let name = obj["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        // Secrets: the API server turns stringData into base64 data.
        if c.1 == "secrets" {
            if let Some(sd) = obj.get("stringData").and_then(|v| v.as_object()).cloned() {
                for (k, v) in sd {
                    obj["data"][k] = json!(base64(v.as_str().unwrap_or_default().as_bytes()));
                }
                obj.as_object_mut().map(|o| o.remove("stringData"));
            }
        }
        if name.is_empty() {
            return Err((422, "metadata.name is required".into()));
        }
        let key = (c.clone(), ns.to_string(), name.clone());
        let old = s.objects.get(&key).cloned();
        if create_only && old.is_some() {
            return Err((409, format!("{name} already exists")));
        }
        if let (Some(want), Some(old)) = (expect_rv, &old) {
            if !want.is_empty() && old["metadata"]["resourceVersion"].as_str() != Some(want) {
                return Err((409, format!("{name}: the object has been modified")));
            }
        }
        let rv = s.rv + 1;
        let meta = obj["metadata"].as_object_mut().cloned().unwrap_or_default();
        let mut meta = Value::Object(meta);
        meta["namespace"] = json!(ns);
        meta["resourceVersion"] = json!(rv.to_string());
        match &old {
            Some(old) => {
                meta["uid"] = old["metadata"]["uid"].clone();
                meta["creationTimestamp"] = old["metadata"]["creationTimestamp"].clone();
                let generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
                let changed = old.get("spec") != obj.get("spec");
                meta["generation"] = json!(generation + i64::from(changed));
            }
            None => {
                s.next_uid += 1;
                meta["uid"] = json!(format!(
                    "{:08x}-0000-4000-8000-{:012x}",
                    s.next_uid, s.next_uid
                ));
                meta["creationTimestamp"] = json!(jiff::Timestamp::now()
                    .strftime("%Y-%m-%dT%H:%M:%SZ")
                    .to_string());
                meta["generation"] = json!(1);
            }
        }
        obj["metadata"] = meta;
        let (gv, plural) = c;
        obj["apiVersion"] = json!(gv);
        obj["kind"] = json!(kind_of(plural));
        // A write that changes nothing is a no-op, as on a real API server (no new
        // resourceVersion, no watch event), so controllers that re-apply do not loop.
        if let Some(old) = &old {
            let mut same = obj.clone();
            same["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
            if &same == old {
                return Ok(old.clone());
            }
        }
        s.rv = rv;
        s.objects.insert(key, obj.clone());
        let ev = WatchEvent {
            rv,
            collection: c.clone(),
            kind: if old.is_some() { "MODIFIED" } else { "ADDED" },
            object: obj.clone(),
        };
        s.log.push(ev.clone());
        let _ = self.events.send(ev);
        Ok(obj)
    }

    /// Merges `patch` into an object; for `status_only`, only its status.
    pub fn patch(
        &self,
        c: &Collection,
        ns: &str,
        name: &str,
        patch: &Value,
        status_only: bool,
        create: bool,
    ) -> Result<Value, (u16, String)> {
        let current = self.get(c, ns, name);
        let mut obj = match current {
            Some(o) => o,
            None if create => json!({"metadata": {"name": name}}),
            None => return Err((404, format!("{name} not found"))),
        };
        if status_only {
            let mut status = obj.get("status").cloned().unwrap_or(json!({}));
            merge(&mut status, &patch["status"]);
            obj["status"] = status;
        } else {
            let status = obj.get("status").cloned();
            let mut p = patch.clone();
            if let Some(m) = p.as_object_mut() {
                // The status subresource owns status.
                m.remove("status");
                m.remove("apiVersion");
                m.remove("kind");
            }
            merge(&mut obj, &p);
            if let Some(s) = status {
                obj["status"] = s;
            }
        }
        self.put(c, ns, obj, None, false)
    }

    pub fn delete(&self, c: &Collection, ns: &str, name: &str) -> Option<Value> {
        let mut s = self.state.lock().unwrap();
        let obj = s
            .objects
            .remove(&(c.clone(), ns.to_string(), name.to_string()))?;
        s.rv += 1;
        let mut gone = obj.clone();
        gone["metadata"]["resourceVersion"] = json!(s.rv.to_string());
        let ev = WatchEvent {
            rv: s.rv,
            collection: c.clone(),
            kind: "DELETED",
            object: gone,
        };
        s.log.push(ev.clone());
        let _ = self.events.send(ev);
        Some(obj)
    }

    /// Events after `rv` in `c` (and namespace), then live ones.
    fn watch(
        &self,
        c: Collection,
        ns: Option<String>,
        selector: Vec<(String, String)>,
        rv: u64,
    ) -> impl futures::Stream<Item = WatchEvent> {
        let (past, rx) = {
            let s = self.state.lock().unwrap();
            let rx = self.events.subscribe();
            let past: Vec<WatchEvent> = s.log.iter().filter(|e| e.rv > rv).cloned().collect();
            (past, rx)
        };
        let live =
            tokio_stream::wrappers::BroadcastStream::new(rx).filter_map(|e| async move { e.ok() });
        let keep = move |e: &WatchEvent| {
            e.collection == c
                && ns
                    .as_deref()
                    .is_none_or(|ns| e.object["metadata"]["namespace"].as_str() == Some(ns))
                && matches_selector(&e.object, &selector)
        };
        let last_past = past.last().map_or(rv, |e| e.rv);
        let keep2 = keep.clone();
        futures::stream::iter(past)
            .filter(move |e| futures::future::ready(keep(e)))
            .chain(live.filter(move |e| futures::future::ready(e.rv > last_past && keep2(e))))
    }
}

fn base64(data: &[u8]) -> String {
    const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

pub fn unbase64(text: &str) -> Vec<u8> {
    const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let vals: Vec<u32> = text
        .bytes()
        .filter_map(|c| T.iter().position(|t| *t == c).map(|p| p as u32))
        .collect();
    let mut out = Vec::new();
    for chunk in vals.chunks(4) {
        let mut n = 0u32;
        for (i, v) in chunk.iter().enumerate() {
            n |= v << (18 - 6 * i);
        }
        for i in 0..chunk.len().saturating_sub(1) {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    out
}

type Body = BoxBody<Bytes, Infallible>;

fn full(status: u16, v: Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())).boxed());
    *r.status_mut() = StatusCode::from_u16(status).unwrap();
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    r
}

fn status_err(code: u16, message: String) -> Response<Body> {
    let reason = match code {
        404 => "NotFound",
        409 => "Conflict",
        _ => "Invalid",
    };
    full(
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code}),
    )
}

/// Parsed request path: collection, namespace, name, subresource.
type ParsedPath = (Collection, Option<String>, Option<String>, Option<String>);

fn parse_path(path: &str) -> Option<ParsedPath> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (gv, rest) = match parts.as_slice() {
        ["api", v, rest @ ..] => (v.to_string(), rest),
        ["apis", g, v, rest @ ..] => (format!("{g}/{v}"), rest),
        _ => return None,
    };
    let (ns, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        _ => (None, rest),
    };
    match rest {
        [plural] => Some(((gv, plural.to_string()), ns, None, None)),
        [plural, name] => Some(((gv, plural.to_string()), ns, Some(name.to_string()), None)),
        [plural, name, sub] => Some((
            (gv, plural.to_string()),
            ns,
            Some(name.to_string()),
            Some(sub.to_string()),
        )),
        _ => None,
    }
}

fn query(req: &Request<hyper::body::Incoming>) -> BTreeMap<String, String> {
    url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}

fn selector(q: &BTreeMap<String, String>) -> Vec<(String, String)> {
    q.get("labelSelector")
        .map(|s| {
            s.split(',')
                .filter_map(|p| {
                    p.split_once('=')
                        .map(|(k, v)| (k.to_string(), v.trim_start_matches('=').to_string()))
                })
                .collect()
        })
        .unwrap_or_default()
}

async fn handle(store: Store, req: Request<hyper::body::Incoming>) -> Response<Body> {
    let q = query(&req);
    let Some((c, ns, name, sub)) = parse_path(req.uri().path()) else {
        return status_err(404, format!("no route {}", req.uri().path()));
    };
    let method = req.method().clone();
    let ctype = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let body: Value = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&body)
            .or_else(|_| serde_yaml::from_slice(&body))
            .unwrap_or(Value::Null)
    };
    let nsn = ns.clone().unwrap_or_default();
    match (method, name) {
        (Method::GET, None) if q.get("watch").is_some_and(|w| w == "true" || w == "1") => {
            let rv = q
                .get("resourceVersion")
                .and_then(|r| r.parse().ok())
                .unwrap_or(0);
            let timeout = q
                .get("timeoutSeconds")
                .and_then(|t| t.parse().ok())
                .unwrap_or(60u64);
            let events = store.watch(c, ns, selector(&q), rv).map(|e| {
                let line = json!({"type": e.kind, "object": e.object}).to_string() + "\n";
                Ok::<_, Infallible>(Frame::data(Bytes::from(line)))
            });
            let bounded =
                events.take_until(tokio::time::sleep(std::time::Duration::from_secs(timeout)));
            let mut r = Response::new(BodyExt::boxed(StreamBody::new(bounded)));
            r.headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            r
        }
        (Method::GET, None) => {
            let (rv, items) = store.list(&c, ns.as_deref(), &selector(&q));
            full(
                200,
                json!({"apiVersion": c.0, "kind": format!("{}List", kind_of(&c.1)),
                "metadata": {"resourceVersion": rv.to_string()}, "items": items}),
            )
        }
        (Method::GET, Some(name)) => match store.get(&c, &nsn, &name) {
            Some(o) => full(200, o),
            None => status_err(404, format!("{} \"{name}\" not found", c.1)),
        },
        (Method::POST, None) => match store.put(&c, &nsn, body, None, true) {
            Ok(o) => full(201, o),
            Err((code, m)) => status_err(code, m),
        },
        (Method::PUT, Some(_)) => {
            let rv = body["metadata"]["resourceVersion"]
                .as_str()
                .map(str::to_string);
            let status_only = sub.as_deref() == Some("status");
            if status_only {
                let name = body["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                return match store.patch(
                    &c,
                    &nsn,
                    &name,
                    &json!({"status": body["status"]}),
                    true,
                    false,
                ) {
                    Ok(o) => full(200, o),
                    Err((code, m)) => status_err(code, m),
                };
            }
            match store.put(&c, &nsn, body, rv.as_deref(), false) {
                Ok(o) => full(200, o),
                Err((code, m)) => status_err(code, m),
            }
        }
        (Method::PATCH, Some(name)) => {
            let apply = ctype.starts_with("application/apply-patch");
            let status_only = sub.as_deref() == Some("status");
            match store.patch(&c, &nsn, &name, &body, status_only, apply) {
                Ok(o) => full(200, o),
                Err((code, m)) => status_err(code, m),
            }
        }
        (Method::DELETE, Some(name)) => match store.delete(&c, &nsn, &name) {
            Some(o) => full(200, o),
            None => status_err(404, format!("{} \"{name}\" not found", c.1)),
        },
        (m, _) => status_err(405, format!("{m} not supported by the stand-in")),
    }
}

/// Serves the store on a loopback port; returns the URL.
pub async fn serve(store: Store) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let store = store.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let store = store.clone();
                    async move { Ok::<_, Infallible>(handle(store, req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    format!("http://{addr}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_encodes() {
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        for s in ["", "f", "fo", "foo", "http://127.0.0.1:5000"] {
            assert_eq!(unbase64(&base64(s.as_bytes())), s.as_bytes());
        }
    }

    #[test]
    fn paths_parse() {
        let (c, ns, name, sub) =
            parse_path("/apis/oxcd.io/v1alpha1/namespaces/t/etcdclusters/demo/status").unwrap();
        assert_eq!(c, collection("oxcd.io/v1alpha1", "etcdclusters"));
        assert_eq!(
            (ns.as_deref(), name.as_deref(), sub.as_deref()),
            (Some("t"), Some("demo"), Some("status"))
        );
        let (c, ns, name, _) = parse_path("/api/v1/pods").unwrap();
        assert_eq!((c.1.as_str(), ns, name), ("pods", None, None));
    }
}
