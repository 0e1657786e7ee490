//! The history checker's own tests: it must accept linearizable histories and catch
//! violations, or the cluster tests that rely on it prove nothing.

mod support;

use std::time::{Duration, Instant};
use support::linearizability::{check, Event, Op};

fn ev(t0: Instant, client: usize, op: Op, invoke_ms: u64, ret_ms: Option<u64>) -> Event {
    Event {
        client,
        key: "k".into(),
        op,
        invoke: t0 + Duration::from_millis(invoke_ms),
        ret: ret_ms.map(|r| t0 + Duration::from_millis(r)),
    }
}

fn put(v: &str) -> Op {
    Op::Put { value: v.into() }
}
fn get(v: Option<&str>) -> Op {
    Op::Get {
        seen: v.map(Into::into),
    }
}

#[test]
fn sequential_and_concurrent_histories_are_accepted() {
    let t0 = Instant::now();
    let h = vec![
        ev(t0, 0, put("a"), 0, Some(10)),
        ev(t0, 1, get(Some("a")), 20, Some(30)),
        // Concurrent put and get: the get may see either value.
        ev(t0, 0, put("b"), 40, Some(60)),
        ev(t0, 1, get(Some("a")), 45, Some(50)),
        ev(t0, 1, get(Some("b")), 70, Some(80)),
        ev(
            t0,
            2,
            Op::Cas {
                expect: Some("b".into()),
                value: "c".into(),
                swapped: Some(true),
            },
            90,
            Some(95),
        ),
        ev(
            t0,
            2,
            Op::Cas {
                expect: Some("b".into()),
                value: "d".into(),
                swapped: Some(false),
            },
            96,
            Some(99),
        ),
        ev(t0, 1, get(Some("c")), 100, Some(110)),
    ];
    check(&h).unwrap();
}

#[test]
fn a_stale_read_is_caught() {
    let t0 = Instant::now();
    let h = vec![
        ev(t0, 0, put("a"), 0, Some(10)),
        ev(t0, 0, put("b"), 20, Some(30)),
        // Invoked after put(b) returned, yet saw the older value.
        ev(t0, 1, get(Some("a")), 40, Some(50)),
    ];
    let err = check(&h).unwrap_err();
    assert!(err.contains("not linearizable"), "{err}");
}

#[test]
fn a_lost_acknowledged_write_is_caught() {
    let t0 = Instant::now();
    let h = vec![
        ev(t0, 0, put("a"), 0, Some(10)),
        ev(t0, 1, get(None), 20, Some(30)),
    ];
    assert!(check(&h).is_err());
}

#[test]
fn two_successful_swaps_from_the_same_value_are_caught() {
    let t0 = Instant::now();
    let h = vec![
        ev(t0, 0, put("a"), 0, Some(10)),
        ev(
            t0,
            1,
            Op::Cas {
                expect: Some("a".into()),
                value: "x".into(),
                swapped: Some(true),
            },
            20,
            Some(40),
        ),
        ev(
            t0,
            2,
            Op::Cas {
                expect: Some("a".into()),
                value: "y".into(),
                swapped: Some(true),
            },
            21,
            Some(41),
        ),
    ];
    assert!(check(&h).is_err());
}

#[test]
fn unknown_outcomes_may_or_may_not_take_effect() {
    let t0 = Instant::now();
    // A put that timed out may have happened...
    let h = vec![
        ev(t0, 0, put("a"), 0, None),
        ev(t0, 1, get(Some("a")), 20, Some(30)),
    ];
    check(&h).unwrap();
    // ...or not.
    let h = vec![
        ev(t0, 0, put("a"), 0, None),
        ev(t0, 1, get(None), 20, Some(30)),
    ];
    check(&h).unwrap();
    // But not before it was invoked.
    let h = vec![
        ev(t0, 1, get(Some("a")), 0, Some(10)),
        ev(t0, 0, put("a"), 20, None),
    ];
    assert!(check(&h).is_err());
}

#[test]
fn many_pending_writes_nobody_saw_do_not_explode_the_search() {
    // A partitioned minority: 60 writes time out and never take effect, while the majority
    // goes on. Each could sit anywhere after its invocation (2^60 subsets if kept).
    let t0 = Instant::now();
    let mut h = vec![];
    for i in 0..60u64 {
        h.push(ev(t0, 10 + i as usize, put(&format!("lost{i}")), i, None));
    }
    for i in 0..200u64 {
        let v = format!("v{i}");
        h.push(ev(t0, 0, put(&v), 100 + 10 * i, Some(105 + 10 * i)));
        h.push(ev(t0, 1, get(Some(&v)), 106 + 10 * i, Some(109 + 10 * i)));
    }
    let started = Instant::now();
    assert_eq!(check(&h), Ok(()));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    // One of them was seen: it is kept, and must be placed before that read.
    h.push(ev(t0, 1, get(Some("lost7")), 3000, Some(3001)));
    assert_eq!(check(&h), Ok(()));
}

#[test]
fn a_pending_write_that_explains_a_failed_cas_is_not_dropped() {
    // Nobody read "b", but only the pending put of "b" explains why the CAS from "a" failed.
    let t0 = Instant::now();
    let h = vec![
        ev(t0, 0, put("a"), 0, Some(10)),
        ev(t0, 1, put("b"), 20, None),
        ev(
            t0,
            2,
            Op::Cas {
                expect: Some("a".into()),
                value: "c".into(),
                swapped: Some(false),
            },
            30,
            Some(40),
        ),
    ];
    assert_eq!(check(&h), Ok(()));
    // Without the pending put, the same failure is a violation.
    assert!(check(&[h[0].clone(), h[2].clone()]).is_err());
}
