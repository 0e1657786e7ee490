//! A linearizability checker for key-value histories (Wing & Gong's search with the
//! memoization of Lowe and of porcupine), so that tests check histories instead of trusting
//! them.
//!
//! A history is a list of operations, each with the time it was invoked and the time it
//! returned. An operation whose outcome is unknown (the request failed or timed out, so it may
//! or may not have taken effect) gets no return time: it may be linearized at any point after
//! its invocation, including after everything else, which is the same as never. Operations on
//! different keys are independent (P-compositionality), so each key is checked on its own.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

/// What a client asked for and what it saw, on one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Put {
        value: String,
    },
    /// A read and the value it returned (None: no such key).
    Get {
        seen: Option<String>,
    },
    /// Compare-and-swap: if the value is `expect`, set `value`; `swapped` is what the txn said
    /// (None when the outcome is unknown).
    Cas {
        expect: Option<String>,
        value: String,
        swapped: Option<bool>,
    },
}

#[derive(Clone, Debug)]
pub struct Event {
    pub client: usize,
    pub key: String,
    pub op: Op,
    pub invoke: Instant,
    /// None: the outcome is unknown.
    pub ret: Option<Instant>,
}

/// The register model: one key's value.
fn step(state: &Option<String>, op: &Op, known: bool) -> Option<Option<String>> {
    match op {
        Op::Put { value } => Some(Some(value.clone())),
        Op::Get { seen } => (!known || seen == state).then(|| state.clone()),
        Op::Cas {
            expect,
            value,
            swapped,
        } => {
            let matches = state == expect;
            match swapped {
                Some(true) if matches => Some(Some(value.clone())),
                Some(false) if !matches => Some(state.clone()),
                Some(_) => None,
                // Unknown outcome: it swapped if it could.
                None => Some(if matches {
                    Some(value.clone())
                } else {
                    state.clone()
                }),
            }
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    op: usize,
    is_call: bool,
    /// Index of the matching call/return entry.
    peer: usize,
    prev: usize,
    next: usize,
}

const HEAD: usize = usize::MAX;

/// At most this many (linearized set, state) configurations are remembered per key (about
/// 1 GB at worst): beyond it the search gives up instead of exhausting the machine.
const MAX_CONFIGURATIONS: usize = 4_000_000;

#[derive(Debug, PartialEq, Eq)]
enum KeyFailure {
    /// No linearization exists; the longest prefix (by invocation) that could be ordered.
    NotLinearizable(usize),
    /// The search outgrew `MAX_CONFIGURATIONS` without an answer.
    TooLarge,
}

/// Checks one key's history.
fn check_key(events: &[&Event]) -> Result<(), KeyFailure> {
    let n = events.len();
    if n == 0 {
        return Ok(());
    }
    // Unknown outcomes return after everything else.
    let end = events
        .iter()
        .filter_map(|e| e.ret)
        .chain(events.iter().map(|e| e.invoke))
        .max()
        .unwrap_or_else(Instant::now);
    let mut times: Vec<(Instant, bool, usize)> = Vec::with_capacity(2 * n);
    for (i, e) in events.iter().enumerate() {
        times.push((e.invoke, true, i));
        times.push((
            e.ret.unwrap_or(end + std::time::Duration::from_secs(1)),
            false,
            i,
        ));
    }
    // At equal times a return comes before a call: they did not overlap.
    times.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
    let mut list: Vec<Entry> = Vec::with_capacity(2 * n);
    let mut call_at = vec![0; n];
    let mut ret_at = vec![0; n];
    for (pos, (_, is_call, op)) in times.iter().enumerate() {
        list.push(Entry {
            op: *op,
            is_call: *is_call,
            peer: 0,
            prev: if pos == 0 { HEAD } else { pos - 1 },
            next: pos + 1,
        });
        if *is_call {
            call_at[*op] = pos;
        } else {
            ret_at[*op] = pos;
        }
    }
    let len = list.len();
    list[len - 1].next = HEAD;
    for op in 0..n {
        list[call_at[op]].peer = ret_at[op];
        list[ret_at[op]].peer = call_at[op];
    }
    let mut head = 0usize;
    let unlink = |list: &mut Vec<Entry>, head: &mut usize, i: usize| {
        let (p, nx) = (list[i].prev, list[i].next);
        if p == HEAD {
            *head = nx
        } else {
            list[p].next = nx
        }
        if nx != HEAD {
            list[nx].prev = p
        }
    };
    let relink = |list: &mut Vec<Entry>, head: &mut usize, i: usize| {
        let (p, nx) = (list[i].prev, list[i].next);
        if p == HEAD {
            *head = i
        } else {
            list[p].next = i
        }
        if nx != HEAD {
            list[nx].prev = i
        }
    };

    let words = n.div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut state: Option<String> = None;
    let mut cache: HashSet<(Vec<u64>, Option<String>)> = HashSet::new();
    let mut stack: Vec<(usize, Option<String>)> = Vec::new();
    let mut best = 0usize;
    let mut cur = head;
    while head != HEAD {
        let e = list[cur];
        if e.is_call {
            let ev = events[e.op];
            if let Some(next_state) = step(&state, &ev.op, ev.ret.is_some()) {
                let mut lin = linearized.clone();
                lin[e.op / 64] |= 1 << (e.op % 64);
                if cache.len() >= MAX_CONFIGURATIONS {
                    return Err(KeyFailure::TooLarge);
                }
                if cache.insert((lin.clone(), next_state.clone())) {
                    stack.push((cur, state));
                    state = next_state;
                    linearized = lin;
                    best = best.max(stack.len());
                    unlink(&mut list, &mut head, e.peer);
                    unlink(&mut list, &mut head, cur);
                    cur = head;
                    continue;
                }
            }
            cur = e.next;
        } else {
            // This operation returned, yet none of the ways tried linearizes it: back up.
            let Some((top, prev_state)) = stack.pop() else {
                return Err(KeyFailure::NotLinearizable(best));
            };
            state = prev_state;
            let op = list[top].op;
            linearized[op / 64] &= !(1 << (op % 64));
            relink(&mut list, &mut head, top);
            let peer = list[top].peer;
            relink(&mut list, &mut head, peer);
            cur = list[top].next;
        }
    }
    Ok(())
}

/// `events` without the writes of unknown outcome whose value no read returned and no
/// successful compare-and-swap expected.
fn without_unseen_unknown_writes<'a>(events: &[&'a Event]) -> Vec<&'a Event> {
    let mut seen: HashSet<&str> = HashSet::new();
    for e in events.iter().filter(|e| e.ret.is_some()) {
        match &e.op {
            Op::Get { seen: Some(v) } => {
                seen.insert(v);
            }
            Op::Cas {
                expect: Some(v),
                swapped: Some(true),
                ..
            } => {
                seen.insert(v);
            }
            _ => {}
        }
    }
    events
        .iter()
        .copied()
        .filter(|e| {
            let written = match &e.op {
                Op::Put { value } | Op::Cas { value, .. } => Some(value.as_str()),
                Op::Get { .. } => None,
            };
            e.ret.is_some() || written.is_none_or(|v| seen.contains(v))
        })
        .collect()
}

/// Checks a whole history. On a violation, returns the offending key's history, trimmed to
/// the operations around the point where no linearization could continue.
pub fn check(history: &[Event]) -> Result<(), String> {
    let mut by_key: HashMap<&str, Vec<&Event>> = HashMap::new();
    // A read whose outcome is unknown constrains nothing and changes nothing, but left in it
    // would double the states the search visits (it could sit anywhere): drop it.
    let unknown_read = |e: &Event| e.ret.is_none() && matches!(e.op, Op::Get { .. });
    for e in history.iter().filter(|e| !unknown_read(e)) {
        by_key.entry(e.key.as_str()).or_default().push(e);
    }
    let mut keys: Vec<&str> = by_key.keys().copied().collect();
    keys.sort();
    for k in keys {
        let mut evs = by_key.remove(k).unwrap_or_default();
        evs.sort_by_key(|e| e.invoke);
        // First without the unknown-outcome writes whose value nobody saw: a linearization
        // without such a write is one with it placed last (its return is unbounded), so a
        // pass here is a pass of the whole history. Pending writes are what makes the search
        // exponential, and under partitions most of them never took effect.
        let pruned = without_unseen_unknown_writes(&evs);
        let result = match check_key(&pruned) {
            Ok(()) => Ok(()),
            // Only the full history can say whether a dropped write was needed.
            Err(_) if pruned.len() < evs.len() => check_key(&evs),
            Err(e) => Err(e),
        };
        let best = match result {
            Ok(()) => continue,
            Err(KeyFailure::TooLarge) => {
                return Err(format!(
                    "history of key {k:?} ({} operations) could not be decided within \
                     {MAX_CONFIGURATIONS} search states",
                    evs.len()
                ))
            }
            Err(KeyFailure::NotLinearizable(best)) => best,
        };
        {
            let t0 = evs.first().map(|e| e.invoke).unwrap_or_else(Instant::now);
            let from = best.saturating_sub(5);
            let shown: Vec<String> = evs
                .iter()
                .skip(from)
                .take(20)
                .map(|e| {
                    let ret = e
                        .ret
                        .map(|r| format!("{:?}", r - t0))
                        .unwrap_or_else(|| "unknown".into());
                    format!(
                        "  client {} {:?} invoked {:?} returned {}",
                        e.client,
                        e.op,
                        e.invoke - t0,
                        ret
                    )
                })
                .collect();
            return Err(format!(
                "history of key {k:?} ({} operations) is not linearizable; {best} could be ordered. Around there:\n{}",
                evs.len(),
                shown.join("\n")
            ));
        }
    }
    Ok(())
}

/// One client's share of a linearizability test: put / get / compare-and-swap on `keys`
/// keys (`lin/0`..) until `until`, each operation's invocation and return recorded in
/// `history`. A failed or timed-out write is recorded with an unknown outcome; a failed
/// read changed nothing and is left out.
pub async fn run_client(
    c: usize,
    mut client: etcd_client::Client,
    keys: usize,
    until: Instant,
    op_timeout: std::time::Duration,
    history: std::sync::Arc<std::sync::Mutex<Vec<Event>>>,
) {
    use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp};
    use std::time::Duration;
    let mut n = 0u64;
    let mut last_seen: Vec<Option<String>> = vec![None; keys];
    while Instant::now() < until {
        n += 1;
        let k = (rand::random::<u32>() as usize) % keys;
        let key = format!("lin/{k}");
        let choice = rand::random::<u32>() % 3;
        let invoke = Instant::now();
        let (op, ret) = match choice {
            0 => {
                let value = format!("c{c}-{n}");
                let r = tokio::time::timeout(
                    op_timeout,
                    client.put(key.as_str(), value.as_str(), None),
                )
                .await;
                let ok = matches!(r, Ok(Ok(_)));
                (Op::Put { value }, ok.then(Instant::now))
            }
            1 => {
                let r = tokio::time::timeout(
                    op_timeout,
                    client.get(key.as_str(), Some(GetOptions::new())),
                )
                .await;
                match r {
                    Ok(Ok(resp)) => {
                        let seen = resp
                            .kvs()
                            .first()
                            .map(|kv| String::from_utf8_lossy(kv.value()).to_string());
                        last_seen[k] = seen.clone();
                        (Op::Get { seen }, Some(Instant::now()))
                    }
                    // A failed read changed nothing: leave it out.
                    _ => continue,
                }
            }
            _ => {
                let expect = last_seen[k].clone();
                let value = format!("c{c}-{n}");
                let cmp = match &expect {
                    Some(v) => Compare::value(key.as_str(), CompareOp::Equal, v.as_str()),
                    None => Compare::version(key.as_str(), CompareOp::Equal, 0),
                };
                let txn = Txn::new().when([cmp]).and_then([TxnOp::put(
                    key.as_str(),
                    value.as_str(),
                    None,
                )]);
                let r = tokio::time::timeout(op_timeout, client.txn(txn)).await;
                match r {
                    Ok(Ok(resp)) => (
                        Op::Cas {
                            expect,
                            value,
                            swapped: Some(resp.succeeded()),
                        },
                        Some(Instant::now()),
                    ),
                    _ => (
                        Op::Cas {
                            expect,
                            value,
                            swapped: None,
                        },
                        None,
                    ),
                }
            }
        };
        history.lock().unwrap().push(Event {
            client: c,
            key,
            op,
            invoke,
            ret,
        });
        if ret.is_none() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Checks a recorded history, after making sure it is big enough to mean something.
pub fn assert_linearizable(
    history: &[Event],
    faults: &str,
    min_completed: usize,
    min_writes: usize,
) {
    let completed = history.iter().filter(|e| e.ret.is_some()).count();
    let writes = history
        .iter()
        .filter(|e| e.ret.is_some() && !matches!(e.op, Op::Get { .. }))
        .count();
    eprintln!(
        "history: {} operations ({completed} completed, {writes} completed writes), {faults}",
        history.len()
    );
    assert!(
        completed >= min_completed && writes >= min_writes,
        "too few operations completed to mean anything"
    );
    if let Err(violation) = check(history) {
        panic!("{violation}");
    }
}
