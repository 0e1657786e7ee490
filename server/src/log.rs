//! Logging: `tracing` in the JSON shape of etcd's zap logger (etcd 3.6's default
//! `--log-format json`): one object per line with `level`, `ts`, `caller` and `msg` first,
//! then the event's fields with etcd's kebab-case keys; or as text (`--log-format console`).
//! raft-rs's slog records are forwarded into tracing.

use slog::{Drain, OwnedKVList, Record};
use std::fmt::Write as _;
use tracing::field::{Field, Visit};
use tracing_subscriber::fmt::{format::Writer, FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Where log lines go (`--log-outputs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Stderr,
    Stdout,
}

pub fn init(level: &str, json: bool, output: Output) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!(
            "{level},raft=warn,sled=warn,h2=warn,tower=warn,hyper=warn,rustls=warn"
        ))
    });
    let writer = move || -> Box<dyn std::io::Write> {
        match output {
            Output::Stderr => Box::new(std::io::stderr()),
            Output::Stdout => Box::new(std::io::stdout()),
        }
    };
    let terminal = match output {
        Output::Stderr => std::io::IsTerminal::is_terminal(&std::io::stderr()),
        Output::Stdout => std::io::IsTerminal::is_terminal(&std::io::stdout()),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    if json {
        builder.event_format(ZapJson).init();
    } else {
        builder.with_ansi(terminal).init();
    }
}

/// etcd's zap JSON line format.
struct ZapJson;

/// The event's fields as JSON values, in the order they were recorded.
#[derive(Default)]
struct Fields {
    msg: String,
    rest: Vec<(String, serde_json::Value)>,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let text = format!("{value:?}");
        // A list of strings (`?urls`) is logged as a JSON array, as zap.Strings logs it.
        if text.starts_with('[') {
            if let Ok(list @ serde_json::Value::Array(_)) = serde_json::from_str(&text) {
                return self.put(field, list);
            }
        }
        self.put(field, serde_json::Value::String(text));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, serde_json::Value::String(value.to_string()));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, value.into());
    }
}

impl Fields {
    fn put(&mut self, field: &Field, value: serde_json::Value) {
        if field.name() == "message" {
            self.msg = match value {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
        } else {
            self.rest.push((field.name().replace('_', "-"), value));
        }
    }
}

fn zap_level(l: &tracing::Level) -> &'static str {
    match *l {
        tracing::Level::ERROR => "error",
        tracing::Level::WARN => "warn",
        tracing::Level::INFO => "info",
        _ => "debug",
    }
}

/// etcd 3.6's zap time: ISO 8601 with microseconds, in UTC: `2026-12-02T08:42:35.001000Z`.
pub(crate) fn zap_time(now: time::OffsetDateTime) -> String {
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
    );
    now.format(&format).unwrap_or_default()
}

impl<S, N> FormatEvent<S, N> for ZapJson
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let meta = event.metadata();
        let mut fields = Fields::default();
        event.record(&mut fields);
        let caller = match (meta.file(), meta.line()) {
            (Some(f), Some(l)) => format!("{}:{l}", f.trim_start_matches("server/src/")),
            _ => meta.target().to_string(),
        };
        let q = |s: &str| serde_json::Value::String(s.to_string()).to_string();
        let mut line = format!(
            "{{\"level\":{},\"ts\":{},\"caller\":{},\"msg\":{}",
            q(zap_level(meta.level())),
            q(&zap_time(time::OffsetDateTime::now_utc())),
            q(&caller),
            q(&fields.msg)
        );
        for (k, v) in &fields.rest {
            let _ = write!(line, ",{}:{v}", q(k));
        }
        line.push('}');
        writeln!(writer, "{line}")
    }
}

/// Drain sending raft-rs's slog records to tracing, under the `raft` target.
pub struct SlogToTracing;

impl Drain for SlogToTracing {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &Record, _: &OwnedKVList) -> Result<(), slog::Never> {
        let msg = record.msg().to_string();
        match record.level() {
            slog::Level::Critical | slog::Level::Error => tracing::error!(target: "raft", "{msg}"),
            slog::Level::Warning => tracing::warn!(target: "raft", "{msg}"),
            slog::Level::Info => tracing::info!(target: "raft", "{msg}"),
            _ => tracing::debug!(target: "raft", "{msg}"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn zap_time_has_microseconds_and_z() {
        let t = time::OffsetDateTime::from_unix_timestamp_nanos(1_764_664_955_001_002_000).unwrap();
        assert_eq!(super::zap_time(t), "2025-12-02T08:42:35.001002Z");
    }
}
