//! What a benchmark run measured: latencies, errors by gRPC code, throughput; printed as a
//! table or JSON.

use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;

/// One worker's (or the merged) observations.
#[derive(Default, Debug, Clone)]
pub struct Recorder {
    /// Latency of every successful operation, in microseconds.
    pub latencies_us: Vec<u32>,
    /// Failed operations by gRPC code and message.
    pub errors: BTreeMap<String, u64>,
}

impl Recorder {
    pub fn ok(&mut self, d: Duration) {
        self.latencies_us
            .push(d.as_micros().min(u32::MAX as u128) as u32);
    }

    pub fn err(&mut self, status: &tonic::Status) {
        *self
            .errors
            .entry(format!("{:?}: {}", status.code(), status.message()))
            .or_default() += 1;
    }

    pub fn merge(&mut self, other: Recorder) {
        self.latencies_us.extend(other.latencies_us);
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
    }
}

#[derive(Debug, Clone)]
pub struct Report {
    pub workload: String,
    pub ok: u64,
    pub errors: BTreeMap<String, u64>,
    pub elapsed: Duration,
    /// Milliseconds.
    pub min: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64 / 1000.0
}

impl Report {
    pub fn new(workload: &str, mut rec: Recorder, elapsed: Duration) -> Report {
        rec.latencies_us.sort_unstable();
        let l = &rec.latencies_us;
        let mean = if l.is_empty() {
            0.0
        } else {
            l.iter().map(|x| *x as f64).sum::<f64>() / l.len() as f64 / 1000.0
        };
        Report {
            workload: workload.to_string(),
            ok: l.len() as u64,
            errors: rec.errors,
            elapsed,
            min: percentile(l, 0.0),
            p50: percentile(l, 50.0),
            p90: percentile(l, 90.0),
            p99: percentile(l, 99.0),
            p999: percentile(l, 99.9),
            max: l.last().map(|x| *x as f64 / 1000.0).unwrap_or(0.0),
            mean,
        }
    }

    pub fn throughput(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 {
            self.ok as f64 / s
        } else {
            0.0
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "workload": self.workload,
            "ok": self.ok,
            "errors": self.errors,
            "elapsed_s": self.elapsed.as_secs_f64(),
            "throughput": self.throughput(),
            "latency_ms": {
                "min": self.min, "mean": self.mean, "p50": self.p50, "p90": self.p90,
                "p99": self.p99, "p99.9": self.p999, "max": self.max,
            },
        })
    }

    pub fn to_text(&self) -> String {
        let errors = if self.errors.is_empty() {
            "none".to_string()
        } else {
            self.errors
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            "Summary ({}):\n  Total:\t{:.4} secs.\n  Requests:\t{}\n  Errors:\t{}\n  Requests/sec:\t{:.1}\n\nLatency (ms):\n  min\t{:.3}\n  mean\t{:.3}\n  p50\t{:.3}\n  p90\t{:.3}\n  p99\t{:.3}\n  p99.9\t{:.3}\n  max\t{:.3}\n",
            self.workload,
            self.elapsed.as_secs_f64(),
            self.ok,
            errors,
            self.throughput(),
            self.min,
            self.mean,
            self.p50,
            self.p90,
            self.p99,
            self.p999,
            self.max
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut r = Recorder::default();
        for ms in 1..=100u64 {
            r.ok(Duration::from_millis(ms));
        }
        r.err(&tonic::Status::unavailable("x"));
        let rep = Report::new("put", r, Duration::from_secs(2));
        assert_eq!(rep.ok, 100);
        assert_eq!(rep.p50, 50.0);
        assert_eq!(rep.p99, 99.0);
        assert_eq!(rep.max, 100.0);
        assert_eq!(rep.min, 1.0);
        assert_eq!(rep.throughput(), 50.0);
        assert_eq!(rep.errors.get("Unavailable: x"), Some(&1));
    }
}
