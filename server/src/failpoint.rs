//! Failpoints for etcd's robustness suite: named points in the write, snapshot, compaction,
//! defragmentation and watch paths, at the steps where etcd has its gofail points of the same
//! names, driven the way the suite drives gofail.
//!
//! Compiled in only with the `failpoints` cargo feature (`hit` is empty otherwise, so release
//! builds carry none). With it, `GOFAIL_FAILPOINTS="name=term;name=term"` arms points at start
//! and `GOFAIL_HTTP=host:port` serves gofail's HTTP interface: `GET /` lists every point as
//! `name=term` lines, `GET /name` gives its term, `PUT /name` (the term as body) arms it and
//! `DELETE /name` disarms it (both answer 204). Terms: `off`, `panic` (the process exits at
//! once, as a Go panic ends etcd), `sleep(D)` (D in milliseconds or a Go duration such as
//! `"1s"`), `print`, `return(...)` (logged: oxcd's points return nothing), each optionally
//! prefixed `N*` to act N times.

/// Every point oxcd has, by etcd's name.
pub const NAMES: &[&str] = &[
    // Raft loop (etcd's server/etcdserver/raft.go).
    "raftBeforeLeaderSend",
    "raftBeforeSave",
    "raftAfterSave",
    "raftBeforeFollowerSend",
    "raftBeforeSaveSnap",
    "raftAfterSaveSnap",
    "raftBeforeApplySnap",
    "raftAfterApplySnap",
    "raftAfterWALRelease",
    // Applier (etcd's server.go, apply of a snapshot and of conf changes).
    "applyBeforeOpenSnapshot",
    "beforeApplyOneConfChange",
    // Backend commit (etcd's batch_tx.go).
    "beforeCommit",
    "afterCommit",
    // Defragmentation (etcd's backend.go).
    "defragBeforeCopy",
    "defragBeforeRename",
    // Compaction (etcd's mvcc kvstore.go and kvstore_compaction.go).
    "compactBeforeCommitScheduledCompact",
    "compactAfterCommitScheduledCompact",
    "compactBeforeCommitBatch",
    "compactAfterCommitBatch",
    "compactBeforeSetFinishedCompact",
    "compactAfterSetFinishedCompact",
    // Watch (the point etcd's robustness patches into its watch server).
    "beforeSendWatchResponse",
];

// The term grammar is compiled (and tested) in every build; only the feature uses it.
use std::time::Duration;

#[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
#[derive(Clone, Debug, PartialEq)]
enum Action {
    Off,
    Panic,
    Sleep(Duration),
    Print,
    Return(String),
}

#[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
#[derive(Clone, Debug)]
struct Term {
    text: String,
    action: Action,
    /// Acts this many more times (None: always).
    left: Option<u64>,
}

/// gofail's sleep argument: a bare number of milliseconds, or a (quoted) Go duration.
#[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim().trim_matches('"');
    match s.parse::<u64>() {
        Ok(ms) => Some(Duration::from_millis(ms)),
        Err(_) => crate::duration::parse_go_duration(s),
    }
}

#[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
fn parse_term(text: &str) -> Result<Term, String> {
    let t = text.trim();
    let (left, rest) = match t.split_once('*') {
        Some((n, rest)) if n.chars().all(|c| c.is_ascii_digit()) && !n.is_empty() => {
            (Some(n.parse::<u64>().map_err(|e| e.to_string())?), rest)
        }
        _ => (None, t),
    };
    let (name, arg) = match rest.split_once('(') {
        Some((name, arg)) => (
            name,
            Some(
                arg.strip_suffix(')')
                    .ok_or_else(|| format!("unbalanced parentheses in {text:?}"))?,
            ),
        ),
        None => (rest, None),
    };
    let action = match (name, arg) {
        ("off", None) => Action::Off,
        ("panic", _) => Action::Panic,
        ("print", _) => Action::Print,
        ("sleep", Some(d)) => {
            Action::Sleep(parse_duration(d).ok_or_else(|| format!("bad duration {d:?}"))?)
        }
        ("return", arg) => Action::Return(arg.unwrap_or_default().to_string()),
        _ => return Err(format!("unsupported failpoint term {text:?}")),
    };
    Ok(Term {
        text: t.to_string(),
        action,
        left,
    })
}

/// Acts on the point's term, if it is armed.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_name: &'static str) {}

/// `hit` from async code: a sleep there blocks its task as etcd's blocks its goroutine, and
/// lets the runtime move the worker's other tasks elsewhere meanwhile.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit_async(_name: &'static str) {}

#[cfg(feature = "failpoints")]
pub use enabled::{hit, hit_async, start};

#[cfg(feature = "failpoints")]
mod enabled {
    use super::{parse_term, Action, Term, NAMES};
    use std::collections::HashMap;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;
    use std::time::Duration;

    static ARMED: AtomicBool = AtomicBool::new(false);
    static TERMS: Mutex<Option<HashMap<String, Term>>> = Mutex::new(None);

    fn set(name: &str, text: &str) -> Result<(), String> {
        if !NAMES.contains(&name) {
            return Err(format!("failpoint: {name} does not exist"));
        }
        let term = parse_term(text)?;
        let mut terms = TERMS.lock().map_err(|e| e.to_string())?;
        let map = terms.get_or_insert_with(HashMap::new);
        if term.action == Action::Off {
            map.remove(name);
        } else {
            map.insert(name.to_string(), term);
        }
        ARMED.store(!map.is_empty(), Ordering::Release);
        Ok(())
    }

    fn unset(name: &str) -> Result<(), String> {
        if !NAMES.contains(&name) {
            return Err(format!("failpoint: {name} does not exist"));
        }
        set(name, "off")
    }

    fn get(name: &str) -> Option<String> {
        let terms = TERMS.lock().ok()?;
        terms.as_ref()?.get(name).map(|t| t.text.clone())
    }

    pub fn hit(name: &'static str) {
        if !ARMED.load(Ordering::Acquire) {
            return;
        }
        let action = {
            let Ok(mut terms) = TERMS.lock() else { return };
            let Some(map) = terms.as_mut() else { return };
            let Some(term) = map.get_mut(name) else {
                return;
            };
            let action = term.action.clone();
            if let Some(left) = term.left.as_mut() {
                *left = left.saturating_sub(1);
                if *left == 0 {
                    map.remove(name);
                    ARMED.store(!map.is_empty(), Ordering::Release);
                }
            }
            action
        };
        match action {
            Action::Off => {}
            Action::Panic => {
                // A Go panic ends etcd's process at once: no cleanup, no flush.
                eprintln!("panic: failpoint {name}");
                std::process::exit(2);
            }
            Action::Sleep(d) => std::thread::sleep(d),
            Action::Print => tracing::info!(failpoint = name, "failpoint executed"),
            Action::Return(v) => tracing::info!(failpoint = name, value = %v, "failpoint executed"),
        }
    }

    pub fn hit_async(name: &'static str) {
        if ARMED.load(Ordering::Acquire) {
            tokio::task::block_in_place(|| hit(name));
        }
    }

    /// Arms the points named by GOFAIL_FAILPOINTS and serves GOFAIL_HTTP, when set.
    pub fn start() -> std::io::Result<()> {
        if let Ok(spec) = std::env::var("GOFAIL_FAILPOINTS") {
            for part in spec.split(';').filter(|p| !p.trim().is_empty()) {
                let (name, term) = part.split_once('=').ok_or_else(|| {
                    std::io::Error::other(format!("GOFAIL_FAILPOINTS: {part:?} is not name=term"))
                })?;
                set(name.trim(), term).map_err(std::io::Error::other)?;
            }
        }
        if let Ok(addr) = std::env::var("GOFAIL_HTTP") {
            let listener = TcpListener::bind(&addr)?;
            std::thread::Builder::new()
                .name("gofail-http".into())
                .spawn(move || {
                    for conn in listener.incoming().flatten() {
                        let _ = serve(conn);
                    }
                })?;
        }
        Ok(())
    }

    /// One HTTP/1.1 request per connection, as Go's client sends them here.
    fn serve(conn: TcpStream) -> std::io::Result<()> {
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut reader = BufReader::new(conn.try_clone()?);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or_default().to_string();
        let path = parts.next().unwrap_or("/").to_string();
        let mut length = 0usize;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.trim().eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0u8; length.min(1 << 16)];
        reader.read_exact(&mut body)?;
        let name = path.trim_start_matches('/');
        let (status, text) = match (method.as_str(), name) {
            ("GET", "") => {
                let mut out = String::new();
                for n in NAMES {
                    out.push_str(&format!("{n}={}\n", get(n).unwrap_or_default()));
                }
                ("200 OK", out)
            }
            ("GET", n) => match get(n) {
                Some(t) => ("200 OK", t),
                None if NAMES.contains(&n) => ("200 OK", String::new()),
                None => (
                    "404 Not Found",
                    "failpoint: failpoint does not exist\n".into(),
                ),
            },
            ("PUT", n) => match set(n, &String::from_utf8_lossy(&body)) {
                Ok(()) => ("204 No Content", String::new()),
                Err(e) => ("400 Bad Request", format!("{e}\n")),
            },
            ("DELETE", n) => match unset(n) {
                Ok(()) => ("204 No Content", String::new()),
                Err(e) => ("404 Not Found", format!("{e}\n")),
            },
            _ => ("405 Method Not Allowed", String::new()),
        };
        let mut conn = reader.into_inner();
        write!(
            conn,
            "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
            text.len()
        )?;
        conn.flush()
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn a_counted_term_disarms_itself() {
            assert!(set("noSuchPoint", "panic").is_err());
            set("defragBeforeRename", "2*sleep(1)").unwrap();
            assert!(get("defragBeforeRename").is_some());
            hit("defragBeforeRename");
            hit("defragBeforeRename");
            assert_eq!(get("defragBeforeRename"), None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_gofails_terms() {
        assert_eq!(parse_term("panic").unwrap().action, Action::Panic);
        assert_eq!(
            parse_term("sleep(\"1s\")").unwrap().action,
            Action::Sleep(Duration::from_secs(1))
        );
        assert_eq!(
            parse_term("sleep(100)").unwrap().action,
            Action::Sleep(Duration::from_millis(100))
        );
        let t = parse_term("2*sleep(\"10ms\")").unwrap();
        assert_eq!(
            (t.left, t.action),
            (Some(2), Action::Sleep(Duration::from_millis(10)))
        );
        assert!(parse_term("explode").is_err());
    }
}
