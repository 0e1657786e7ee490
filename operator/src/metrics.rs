//! The operator's Prometheus metrics, with the `prometheus` crate as the server's are: one
//! registry per operator process, rendered at `/metrics`.

use prometheus::{
    Counter, Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry,
    TextEncoder,
};
use std::time::Duration;

pub struct Metrics {
    registry: Registry,
    reconciles: IntCounter,
    reconcile_errors: IntCounter,
    reconcile_seconds: Histogram,
    actions: IntCounterVec,
    backups: IntCounterVec,
    backup_seconds: Counter,
    backup_bytes: IntCounter,
}

fn register<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    // Each name is registered once, in `Default`: a refusal is a programming error.
    if let Err(e) = r.register(Box::new(c.clone())) {
        panic!("registering an operator metric: {e}");
    }
    c
}

impl Default for Metrics {
    fn default() -> Self {
        let r = Registry::new();
        let valid = "valid metric options";
        Metrics {
            reconciles: register(
                &r,
                IntCounter::new("oxcd_operator_reconciles_total", "Reconciles started.")
                    .expect(valid),
            ),
            reconcile_errors: register(
                &r,
                IntCounter::new(
                    "oxcd_operator_reconcile_errors_total",
                    "Reconciles that failed.",
                )
                .expect(valid),
            ),
            reconcile_seconds: register(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "oxcd_operator_reconcile_duration_seconds",
                        "Time one reconcile took, from observing to reporting.",
                    )
                    .buckets(vec![
                        0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    ]),
                )
                .expect(valid),
            ),
            actions: register(
                &r,
                IntCounterVec::new(
                    Opts::new("oxcd_operator_actions_total", "Actions taken, by kind."),
                    &["action"],
                )
                .expect(valid),
            ),
            backups: register(
                &r,
                IntCounterVec::new(
                    Opts::new("oxcd_operator_backups_total", "Backups taken, by result."),
                    &["result"],
                )
                .expect(valid),
            ),
            backup_seconds: register(
                &r,
                Counter::new(
                    "oxcd_operator_backup_duration_seconds_total",
                    "Time spent taking backups.",
                )
                .expect(valid),
            ),
            backup_bytes: register(
                &r,
                IntCounter::new(
                    "oxcd_operator_backup_bytes_total",
                    "Bytes of backups taken.",
                )
                .expect(valid),
            ),
            registry: r,
        }
    }
}

impl Metrics {
    /// A reconcile started; the returned timer records its duration when dropped.
    pub fn reconcile_started(&self) -> prometheus::HistogramTimer {
        self.reconciles.inc();
        self.reconcile_seconds.start_timer()
    }

    pub fn reconcile_failed(&self) {
        self.reconcile_errors.inc();
    }

    pub fn action(&self, kind: &str) {
        self.actions.with_label_values(&[kind]).inc();
    }

    pub fn backup(&self, ok: bool, took: Duration, bytes: u64) {
        let result = if ok { "succeeded" } else { "failed" };
        self.backups.with_label_values(&[result]).inc();
        self.backup_seconds.inc_by(took.as_secs_f64());
        self.backup_bytes.inc_by(bytes);
    }

    /// Prometheus text format.
    pub fn render(&self) -> String {
        // Both results are shown from the start, as before the first backup.
        for result in ["succeeded", "failed"] {
            self.backups.with_label_values(&[result]);
        }
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}
