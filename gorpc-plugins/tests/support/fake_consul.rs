//! `FakeConsul`: an in-process stand-in for a Consul agent, serving the part of Consul's HTTP
//! API that the consul plugin uses, as Consul documents it:
//!
//! - `PUT /v1/agent/service/register`: the JSON service definition (`Name`, `ID` defaulting
//!   to the name, `Address`, `Port`, `Weights` defaulting to `{Passing: 1, Warning: 1}` with
//!   `Passing` at least 1, and TTL checks in `Check` or `Checks`). A check's ID defaults to
//!   `service:<id>` (`service:<id>:<n>` when there are several), its status to `critical`.
//!   Registering an ID again replaces it.
//! - `PUT /v1/agent/service/deregister/:id`, `PUT /v1/agent/check/pass/:check_id?note=`:
//!   unknown IDs answer 404. Passing resets the TTL clock; a check not passed within its TTL
//!   turns critical ("TTL expired"), and one critical for longer than its
//!   `DeregisterCriticalServiceAfter` (at least a minute, as in Consul) removes its service.
//! - `GET /v1/health/service/:service` with `passing` (only entries whose checks all pass),
//!   `index` and `wait` (default 5m, at most 10m; Go duration syntax): with an index, the
//!   answer waits until the service's index passes it or the wait runs out. Every answer
//!   carries `X-Consul-Index`. Consul's wait jitter is left out.
//! - `X-Consul-Token`, when the fake is built to require one: 403 without it.
//!
//! Only TTL checks exist here; a check of another kind is refused with 400. State changes
//! bump a Raft-like index; a TTL pass that changes neither status nor output does not, as in
//! Consul (the agent syncs only changes). It serves HTTP/1.1 on 127.0.0.1 with hyper, on the
//! tokio runtime it is started on, and stops when dropped.

#![allow(dead_code)] // each test binary uses a different part

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Consul's floor on `DeregisterCriticalServiceAfter`.
const MIN_DEREGISTER_AFTER: Duration = Duration::from_secs(60);
const NODE: &str = "fake-node";
const NODE_ADDRESS: &str = "127.0.0.1";

pub(crate) struct FakeConsul {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeConsul {
    fn drop(&mut self) {
        // The accept loop owns the connection tasks (a JoinSet): aborting it ends them all.
        self.server.abort();
    }
}

struct Shared {
    state: Mutex<State>,
    /// Woken whenever the index moves, for the blocked health queries.
    changed: Notify,
    health_queries: AtomicUsize,
    required_token: Option<String>,
}

#[derive(Default)]
struct State {
    /// The Raft-like index: bumped by every change.
    index: u64,
    /// Per service name, the index of the last change to its instances (what a health
    /// query on that name reports and blocks on).
    service_index: HashMap<String, u64>,
    /// Registered instances by service ID.
    services: BTreeMap<String, ServiceRecord>,
}

struct ServiceRecord {
    id: String,
    name: String,
    address: String,
    port: u16,
    passing_weight: u32,
    warning_weight: u32,
    checks: Vec<TtlCheck>,
}

struct TtlCheck {
    id: String,
    name: String,
    ttl: Duration,
    status: String,
    output: String,
    expires: Instant,
    critical_since: Option<Instant>,
    deregister_after: Option<Duration>,
}

/// One registered instance, as a test inspects it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FakeService {
    pub id: String,
    pub name: String,
    pub address: String,
    pub port: u16,
    pub weight: u32,
    /// `(check id, ttl, status)`.
    pub checks: Vec<(String, Duration, String)>,
}

impl FakeConsul {
    /// Serves on a free port of 127.0.0.1.
    pub(crate) async fn start() -> FakeConsul {
        Self::start_with(SocketAddr::from(([127, 0, 0, 1], 0)), None).await
    }

    /// Serves on `addr` (e.g. a port a test found closed before), answering only requests
    /// that carry `token` as `X-Consul-Token` when it is given.
    pub(crate) async fn start_with(addr: SocketAddr, token: Option<&str>) -> FakeConsul {
        let listener = TcpListener::bind(addr).await.expect("bind the fake consul");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                index: 1,
                ..State::default()
            }),
            changed: Notify::new(),
            health_queries: AtomicUsize::new(0),
            required_token: token.map(str::to_owned),
        });
        let server = tokio::spawn(serve(listener, shared.clone()));
        FakeConsul {
            addr,
            shared,
            server,
        }
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Health queries received so far (answered or still blocked).
    pub(crate) fn health_queries(&self) -> usize {
        self.shared.health_queries.load(Ordering::SeqCst)
    }

    /// The registered instances, with TTL expiry applied up to now.
    pub(crate) fn services(&self) -> Vec<FakeService> {
        let mut state = self.shared.lock_refreshed();
        state
            .services
            .values_mut()
            .map(|s| FakeService {
                id: s.id.clone(),
                name: s.name.clone(),
                address: s.address.clone(),
                port: s.port,
                weight: s.passing_weight,
                checks: s
                    .checks
                    .iter()
                    .map(|c| (c.id.clone(), c.ttl, c.status.clone()))
                    .collect(),
            })
            .collect()
    }

    /// Drops every registration, as an agent that restarted without its state would.
    pub(crate) fn forget_everything(&self) {
        let mut state = self.shared.lock_refreshed();
        let names: Vec<String> = state.services.values().map(|s| s.name.clone()).collect();
        state.services.clear();
        for name in names {
            state.bump(&name);
        }
        drop(state);
        self.shared.changed.notify_waiters();
    }

    /// Moves the index back to `index` (a snapshot restore does this), for every service.
    pub(crate) fn move_index_back_to(&self, index: u64) {
        let mut state = self.shared.lock_refreshed();
        state.index = index;
        for value in state.service_index.values_mut() {
            *value = (*value).min(index);
        }
    }
}

impl Shared {
    fn lock_refreshed(&self) -> std::sync::MutexGuard<'_, State> {
        let mut state = self.state.lock().unwrap();
        if state.refresh(Instant::now()) {
            self.changed.notify_waiters();
        }
        state
    }
}

impl State {
    fn bump(&mut self, service: &str) {
        self.index += 1;
        self.service_index.insert(service.to_owned(), self.index);
    }

    /// Applies TTL expiry and critical-service reaping due by `now`; true if anything changed.
    fn refresh(&mut self, now: Instant) -> bool {
        let mut touched = Vec::new();
        let mut reaped = Vec::new();
        for service in self.services.values_mut() {
            for check in &mut service.checks {
                if check.status != "critical" && now >= check.expires {
                    check.status = "critical".to_owned();
                    check.output = "TTL expired".to_owned();
                    check.critical_since = Some(now);
                    touched.push(service.name.clone());
                }
                if let (Some(since), Some(after)) = (check.critical_since, check.deregister_after) {
                    if now >= since + after.max(MIN_DEREGISTER_AFTER) {
                        reaped.push(service.id.clone());
                    }
                }
            }
        }
        for id in reaped {
            if let Some(service) = self.services.remove(&id) {
                touched.push(service.name);
            }
        }
        let changed = !touched.is_empty();
        for name in touched {
            self.bump(&name);
        }
        changed
    }

    /// When the next TTL expiry or reaping is due, if any.
    fn next_due(&self) -> Option<Instant> {
        self.services
            .values()
            .flat_map(|s| &s.checks)
            .filter_map(|c| match (c.critical_since, c.deregister_after) {
                (None, _) => Some(c.expires),
                (Some(since), Some(after)) => Some(since + after.max(MIN_DEREGISTER_AFTER)),
                (Some(_), None) => None,
            })
            .min()
    }

    fn index_of(&self, service: &str) -> u64 {
        // A name never registered reports the whole catalog's index, as Consul's table
        // index does.
        self.service_index
            .get(service)
            .copied()
            .unwrap_or(self.index)
    }

    fn health_entries(&self, service: &str, passing_only: bool) -> serde_json::Value {
        let entries: Vec<serde_json::Value> = self
            .services
            .values()
            .filter(|s| s.name == service)
            .filter(|s| !passing_only || s.checks.iter().all(|c| c.status == "passing"))
            .map(|s| {
                let mut checks = vec![json!({
                    "Node": NODE, "CheckID": "serfHealth", "Name": "Serf Health Status",
                    "Status": "passing", "Notes": "", "Output": "Agent alive and reachable",
                    "ServiceID": "", "ServiceName": "", "ServiceTags": [], "Type": "",
                })];
                checks.extend(s.checks.iter().map(|c| {
                    json!({
                        "Node": NODE, "CheckID": c.id, "Name": c.name, "Status": c.status,
                        "Notes": "", "Output": c.output, "ServiceID": s.id,
                        "ServiceName": s.name, "ServiceTags": [], "Type": "ttl",
                    })
                }));
                json!({
                    "Node": {
                        "ID": "00000000-0000-0000-0000-000000000001", "Node": NODE,
                        "Address": NODE_ADDRESS, "Datacenter": "dc1",
                        "TaggedAddresses": {"lan": NODE_ADDRESS, "wan": NODE_ADDRESS},
                        "Meta": {},
                    },
                    "Service": {
                        "ID": s.id, "Service": s.name, "Tags": [], "Address": s.address,
                        "Meta": null, "Port": s.port,
                        "Weights": {"Passing": s.passing_weight, "Warning": s.warning_weight},
                        "EnableTagOverride": false,
                    },
                    "Checks": checks,
                })
            })
            .collect();
        serde_json::Value::Array(entries)
    }
}

async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(&shared, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
        // Reap finished connections so the set does not grow with every client.
        while connections.try_join_next().is_some() {}
    }
}

type Answer = Response<Full<Bytes>>;

fn answer(status: StatusCode, body: impl Into<Bytes>) -> Answer {
    Response::builder()
        .status(status)
        .header("Content-Type", "text/plain; charset=utf-8")
        .body(Full::new(body.into()))
        .unwrap()
}

async fn handle(shared: &Shared, req: Request<Incoming>) -> Answer {
    if let Some(token) = &shared.required_token {
        let sent = req
            .headers()
            .get("X-Consul-Token")
            .and_then(|v| v.to_str().ok());
        if sent != Some(token.as_str()) {
            return answer(StatusCode::FORBIDDEN, "Permission denied: token not found");
        }
    }
    let path = req.uri().path().to_owned();
    let query: HashMap<String, String> = req
        .uri()
        .query()
        .map(|q| {
            url_pairs(q)
                .into_iter()
                .collect::<HashMap<String, String>>()
        })
        .unwrap_or_default();
    let method = req.method().clone();
    let route = |prefix: &str| path.strip_prefix(prefix).filter(|rest| !rest.is_empty());

    if path == "/v1/agent/service/register" {
        if method != Method::PUT {
            return answer(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
        }
        let body = match req.into_body().collect().await {
            Ok(body) => body.to_bytes(),
            Err(e) => return answer(StatusCode::BAD_REQUEST, e.to_string()),
        };
        return register(shared, &body);
    }
    if let Some(id) = route("/v1/agent/service/deregister/") {
        if method != Method::PUT {
            return answer(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
        }
        return deregister(shared, &decode(id));
    }
    if let Some(check_id) = route("/v1/agent/check/pass/") {
        if method != Method::PUT {
            return answer(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
        }
        let note = query.get("note").cloned().unwrap_or_default();
        return pass(shared, &decode(check_id), note);
    }
    if let Some(service) = route("/v1/health/service/") {
        if method != Method::GET {
            return answer(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
        }
        return health(shared, &decode(service), &query).await;
    }
    answer(StatusCode::NOT_FOUND, format!("no handler for {path}"))
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ServiceDefinition {
    name: Option<String>,
    #[serde(rename = "ID")]
    id: Option<String>,
    address: Option<String>,
    port: Option<u16>,
    weights: Option<WeightsDefinition>,
    check: Option<CheckDefinition>,
    checks: Option<Vec<CheckDefinition>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct WeightsDefinition {
    passing: Option<u32>,
    warning: Option<u32>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct CheckDefinition {
    #[serde(rename = "CheckID")]
    check_id: Option<String>,
    name: Option<String>,
    #[serde(rename = "TTL")]
    ttl: Option<String>,
    status: Option<String>,
    deregister_critical_service_after: Option<String>,
    #[serde(rename = "HTTP")]
    http: Option<String>,
    #[serde(rename = "TCP")]
    tcp: Option<String>,
}

fn register(shared: &Shared, body: &[u8]) -> Answer {
    let definition: ServiceDefinition = match serde_json::from_slice(body) {
        Ok(d) => d,
        Err(e) => {
            return answer(
                StatusCode::BAD_REQUEST,
                format!("Request decode failed: {e}"),
            )
        }
    };
    let Some(name) = definition.name.filter(|n| !n.is_empty()) else {
        return answer(StatusCode::BAD_REQUEST, "Missing service name");
    };
    let id = definition.id.unwrap_or_else(|| name.clone());
    let (passing_weight, warning_weight) = match definition.weights {
        None => (1, 1),
        Some(w) => (w.passing.unwrap_or(0), w.warning.unwrap_or(0)),
    };
    if passing_weight < 1 {
        return answer(
            StatusCode::BAD_REQUEST,
            "Invalid Weights: Passing must be greater than 0",
        );
    }
    let mut definitions: Vec<CheckDefinition> = definition.check.into_iter().collect();
    definitions.extend(definition.checks.unwrap_or_default());
    let several = definitions.len() > 1;
    let now = Instant::now();
    let mut checks = Vec::new();
    for (n, check) in definitions.into_iter().enumerate() {
        if check.http.is_some() || check.tcp.is_some() || check.ttl.is_none() {
            return answer(
                StatusCode::BAD_REQUEST,
                "FakeConsul implements TTL checks only",
            );
        }
        let Some(ttl) = check.ttl.as_deref().and_then(parse_go_duration) else {
            return answer(StatusCode::BAD_REQUEST, "Invalid check: bad TTL");
        };
        let deregister_after = match check.deregister_critical_service_after.as_deref() {
            None => None,
            Some(d) => match parse_go_duration(d) {
                Some(d) => Some(d),
                None => {
                    return answer(
                        StatusCode::BAD_REQUEST,
                        "Invalid check: bad DeregisterCriticalServiceAfter",
                    )
                }
            },
        };
        let status = check.status.unwrap_or_else(|| "critical".to_owned());
        if !matches!(status.as_str(), "passing" | "warning" | "critical") {
            return answer(StatusCode::BAD_REQUEST, "Invalid check: bad Status");
        }
        let check_id = check.check_id.unwrap_or_else(|| {
            if several {
                format!("service:{id}:{}", n + 1)
            } else {
                format!("service:{id}")
            }
        });
        checks.push(TtlCheck {
            name: check
                .name
                .unwrap_or_else(|| format!("Service '{name}' check")),
            id: check_id,
            ttl,
            critical_since: (status == "critical").then_some(now),
            status,
            output: String::new(),
            expires: now + ttl,
            deregister_after,
        });
    }
    let record = ServiceRecord {
        address: definition.address.unwrap_or_default(),
        port: definition.port.unwrap_or(0),
        id: id.clone(),
        name: name.clone(),
        passing_weight,
        warning_weight,
        checks,
    };
    let mut state = shared.lock_refreshed();
    if let Some(old) = state.services.insert(id, record) {
        if old.name != name {
            state.bump(&old.name);
        }
    }
    state.bump(&name);
    drop(state);
    shared.changed.notify_waiters();
    answer(StatusCode::OK, "")
}

fn deregister(shared: &Shared, id: &str) -> Answer {
    let mut state = shared.lock_refreshed();
    let Some(record) = state.services.remove(id) else {
        return answer(
            StatusCode::NOT_FOUND,
            format!("Unknown service ID {id:?}. Ensure that the service ID is passed, not the service name."),
        );
    };
    state.bump(&record.name);
    drop(state);
    shared.changed.notify_waiters();
    answer(StatusCode::OK, "")
}

fn pass(shared: &Shared, check_id: &str, note: String) -> Answer {
    let mut state = shared.lock_refreshed();
    let now = Instant::now();
    let mut found = None;
    for service in state.services.values_mut() {
        if let Some(check) = service.checks.iter_mut().find(|c| c.id == check_id) {
            let changed = check.status != "passing" || check.output != note;
            check.status = "passing".to_owned();
            check.output = note;
            check.critical_since = None;
            check.expires = now + check.ttl;
            found = Some((service.name.clone(), changed));
            break;
        }
    }
    let Some((name, changed)) = found else {
        return answer(
            StatusCode::NOT_FOUND,
            format!("Unknown check ID {check_id:?}. Ensure that the check ID is passed, not the check name."),
        );
    };
    if changed {
        state.bump(&name);
        drop(state);
        shared.changed.notify_waiters();
    }
    answer(StatusCode::OK, "")
}

async fn health(shared: &Shared, service: &str, query: &HashMap<String, String>) -> Answer {
    shared.health_queries.fetch_add(1, Ordering::SeqCst);
    // `?passing` alone means true, as in Consul.
    let passing_only = match query.get("passing").map(String::as_str) {
        None => false,
        Some("" | "true" | "1") => true,
        Some("false" | "0") => false,
        Some(other) => {
            return answer(
                StatusCode::BAD_REQUEST,
                format!("Invalid value for 'passing': {other:?}"),
            )
        }
    };
    let min_index = match query.get("index").map(|i| i.parse::<u64>()) {
        None => 0,
        Some(Ok(index)) => index,
        Some(Err(_)) => return answer(StatusCode::BAD_REQUEST, "Invalid index"),
    };
    let wait = match query.get("wait") {
        None => Duration::from_secs(300),
        Some(w) => match parse_go_duration(w) {
            Some(w) => w.min(Duration::from_secs(600)),
            None => return answer(StatusCode::BAD_REQUEST, "Invalid wait time"),
        },
    };
    let deadline = Instant::now() + wait;
    loop {
        // Registered before the state is read, so a change in between is not missed.
        let notified = shared.changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let (index, next_due) = {
            let state = shared.lock_refreshed();
            (state.index_of(service), state.next_due())
        };
        let now = Instant::now();
        if min_index == 0 || index > min_index || now >= deadline {
            let state = shared.state.lock().unwrap();
            let body = state.health_entries(service, passing_only).to_string();
            let index = state.index_of(service);
            return Response::builder()
                .status(StatusCode::OK)
                .header("Content-Type", "application/json")
                .header("X-Consul-Index", index.to_string())
                .header("X-Consul-KnownLeader", "true")
                .header("X-Consul-LastContact", "0")
                .body(Full::new(Bytes::from(body)))
                .unwrap();
        }
        let wake = next_due.map_or(deadline, |due| due.min(deadline));
        tokio::select! {
            _ = notified => {}
            _ = tokio::time::sleep_until(wake) => {}
        }
    }
}

/// Go's `time.ParseDuration` for what clients send: a sequence of decimal numbers with
/// units ns, us, ms, s, m, h.
fn parse_go_duration(text: &str) -> Option<Duration> {
    if text == "0" {
        return Some(Duration::ZERO);
    }
    let mut rest = text;
    let mut total = 0f64;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let number_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let number: f64 = rest[..number_end].parse().ok()?;
        rest = &rest[number_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += number * seconds;
        rest = &rest[unit_end..];
    }
    Some(Duration::from_secs_f64(total))
}

fn url_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(pair), String::new()),
        })
        .collect()
}

/// Percent-decoding (`+` for a space does not occur in what the plugin sends).
fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
            if let Ok(byte) = u8::from_str_radix(hex, 16) {
                out.push(byte);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
