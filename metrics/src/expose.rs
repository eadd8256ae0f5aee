//! The Prometheus exposition of [`Metrics`], through prometheus-client's text encoder
//! (OpenMetrics text 1.0, which Prometheus scrapes). Names follow Prometheus's conventions:
//! `ftvm_` prefix, base units in the name (`_seconds`, `_bytes`), `_total` on counters.
//!
//! The numbers live in [`Metrics`]' own atomics; a [`Collector`] reads them at each scrape.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::histogram::HistogramSnapshot;
use crate::{ExitKind, Metrics, Outcome, Process, RejectCause, ReplicaState};

type Res = Result<(), std::fmt::Error>;

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, unit: Option<&Unit>, v: u64) -> Res {
    let mut m = e.encode_descriptor(name, help, unit, MetricType::Counter)?;
    m.encode_counter::<NoLabelSet, _, u64>(&v, None)
}

fn counters<L: EncodeLabelSet>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: &[(L, u64)],
) -> Res {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in series {
        m.encode_family(labels)?
            .encode_counter::<NoLabelSet, _, u64>(v, None)?;
    }
    Ok(())
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, unit: Option<&Unit>, v: f64) -> Res {
    let mut m = e.encode_descriptor(name, help, unit, MetricType::Gauge)?;
    m.encode_gauge(&v)
}

fn histogram(e: &mut DescriptorEncoder, name: &str, help: &str, h: &HistogramSnapshot) -> Res {
    let mut m = e.encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Histogram)?;
    m.encode_histogram::<NoLabelSet>(h.sum_ns as f64 / 1e9, h.count(), &h.buckets_seconds(), None)
}

/// Reads a [`Metrics`] at every scrape.
#[derive(Debug)]
pub struct MetricsCollector(pub &'static Metrics);

impl Collector for MetricsCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let m = self.0;
        let (process, name) = m.process();
        let kind = match process {
            Process::Replica => "replica",
            Process::Front => "front",
            Process::Arbiter => "arbiter",
        };
        let mut info = e.encode_descriptor(
            "ftvm_build",
            "The ftvm process: its kind, name and version.",
            None,
            MetricType::Info,
        )?;
        info.encode_info(&[
            ("process", kind),
            ("name", name.as_str()),
            ("version", env!("CARGO_PKG_VERSION")),
        ])?;
        if process == Process::Replica {
            replica(m, &mut e)?;
        }
        own(m, &mut e)
    }
}

fn replica(m: &Metrics, e: &mut DescriptorEncoder) -> Res {
    let view = m.state.view();
    {
        let mut s = e.encode_descriptor(
            "ftvm_replica_state",
            "1 for the replica's current state, 0 for the others.",
            None,
            MetricType::Gauge,
        )?;
        for st in ReplicaState::ALL {
            let v = i64::from(st == view.state);
            s.encode_family(&[("state", st.name())])?.encode_gauge(&v)?;
        }
    }
    {
        let mut r = e.encode_descriptor(
            "ftvm_replica_role",
            "1 for the replica's current role (primary, backup; none before it has one).",
            None,
            MetricType::Gauge,
        )?;
        for role in [crate::Role::None, crate::Role::Primary, crate::Role::Backup] {
            let v = i64::from(role == view.role);
            r.encode_family(&[("role", role.name())])?
                .encode_gauge(&v)?;
        }
    }
    gauge(
        e,
        "ftvm_replica_epoch",
        "The fencing epoch the replica serves or replays in.",
        None,
        view.epoch as f64,
    )?;
    counter(
        e,
        "ftvm_replica_state_changes",
        "Changes of the replica's state.",
        None,
        view.transitions,
    )?;
    gauge(
        e,
        "ftvm_replica_protected_since_timestamp",
        "When the pair last became protected (Unix time), 0 while it is not.",
        Some(&Unit::Seconds),
        view.protected_since_unix_ms
            .map_or(0.0, |ms| ms as f64 / 1e3),
    )?;
    histogram(
        e,
        "ftvm_output_commit",
        "Output-commit latency: from the guest's output to its release after the backup's ACK.",
        &m.commit.snapshot(),
    )?;
    let log = m.log.read();
    counter(
        e,
        "ftvm_log_entries",
        "Log entries sent (primary) or received (backup).",
        None,
        log.entries,
    )?;
    counter(
        e,
        "ftvm_log",
        "Bytes of log frames sent (primary) or received (backup).",
        Some(&Unit::Bytes),
        log.bytes,
    )?;
    counter(
        e,
        "ftvm_log_frames",
        "Log frames sent (primary) or received (backup).",
        None,
        log.frames,
    )?;
    counter(
        e,
        "ftvm_log_heartbeats",
        "Heartbeats sent.",
        None,
        log.heartbeats,
    )?;
    gauge(
        e,
        "ftvm_ack_lag_entries",
        "Primary: log entries sealed and not yet acknowledged by the backup.",
        None,
        log.ack_lag_entries as f64,
    )?;
    gauge(
        e,
        "ftvm_replay_lag_entries",
        "Log entries the backup holds and has not replayed yet.",
        None,
        log.replay_lag_entries as f64,
    )?;
    gauge(
        e,
        "ftvm_replay_lag",
        "Primary: the time the backup needs to replay its backlog (lag control's estimate at the last frame).",
        Some(&Unit::Seconds),
        log.replay_lag_ns as f64 / 1e9,
    )?;
    let rejected: Vec<_> = RejectCause::ALL
        .iter()
        .map(|c| ([("cause", c.name())], m.frames_rejected[*c as usize].get()))
        .collect();
    counters(
        e,
        "ftvm_log_frames_rejected",
        "Log frames or messages refused, by cause.",
        &rejected,
    )?;
    counter(
        e,
        "ftvm_heartbeats_missed",
        "Times the peer stayed silent past the heartbeat timeout.",
        None,
        m.heartbeats_missed.get(),
    )?;
    counter(
        e,
        "ftvm_failovers",
        "Times this replica went on live after its peer failed (having won the arbiter).",
        None,
        m.failovers.get(),
    )?;
    counter(
        e,
        "ftvm_ack_kicks",
        "Times the primary kicked its backup's vCPU thread for an ACK an output waited for.",
        None,
        m.ack_kicks.get(),
    )?;
    counter(
        e,
        "ftvm_ack_helps",
        "Times the primary woke its backup's ACK helper thread for an ACK an output waited for.",
        None,
        m.ack_helps.get(),
    )?;
    counters(
        e,
        "ftvm_joins",
        "Joins served (primary) or made (backup), by result.",
        &[
            ([("result", "completed")], m.joins_completed.get()),
            ([("result", "failed")], m.joins_failed.get()),
            ([("result", "refused")], m.joins_refused.get()),
        ],
    )?;
    histogram(
        e,
        "ftvm_join_pause",
        "How long the primary's guest stood still for a join.",
        &m.join_pause.snapshot(),
    )?;
    histogram(
        e,
        "ftvm_join_duration",
        "Join start to the pair protected again.",
        &m.join_duration.snapshot(),
    )?;
    let decisions: Vec<_> = Outcome::ALL
        .iter()
        .map(|o| {
            (
                [("outcome", o.name())],
                m.arbiter_decisions[*o as usize].get(),
            )
        })
        .collect();
    counters(
        e,
        "ftvm_arbiter_decisions",
        "Arbiter decisions asked for, by outcome (unavailable: an attempt without an answer).",
        &decisions,
    )?;
    histogram(
        e,
        "ftvm_arbiter_decision",
        "From the first attempt to the arbiter's decision.",
        &m.arbiter_latency.snapshot(),
    )?;
    let exits: Vec<_> = ExitKind::ALL
        .iter()
        .map(|k| ([("kind", k.name())], m.exits[*k as usize].get()))
        .collect();
    counters(e, "ftvm_vm_exits", "VM exits handled, by kind.", &exits)?;
    counter(
        e,
        "ftvm_guest_requests",
        "Requests the guest took in (logged or replayed).",
        None,
        m.requests.get(),
    )
}

fn own(m: &Metrics, e: &mut DescriptorEncoder) -> Res {
    for s in m.source_samples() {
        if s.counter {
            counter(e, s.name, s.help, None, s.value as u64)?;
        } else {
            gauge(e, s.name, s.help, None, s.value)?;
        }
    }
    Ok(())
}

/// The exposition of `m` now, in OpenMetrics text.
pub fn encode(m: &'static Metrics) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(MetricsCollector(m)));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)?;
    Ok(out)
}

/// The content type of [`encode`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Reads an exposition back: every sample line as `name{labels}` (as written) to its value.
/// Comment lines and lines that do not parse are skipped. For checking a scrape in tests and
/// reports, not a general OpenMetrics parser.
pub fn parse(text: &str) -> std::collections::BTreeMap<String, f64> {
    let mut out = std::collections::BTreeMap::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        // The value follows the last space outside the labels.
        let split_at = match line.rfind('}') {
            Some(close) => line[close..].find(' ').map(|i| close + i),
            None => line.find(' '),
        };
        let Some(at) = split_at else { continue };
        let (series, value) = (line[..at].trim(), line[at..].trim());
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => match v.parse::<f64>() {
                Ok(x) => x,
                Err(_) => continue,
            },
        };
        out.insert(series.to_owned(), value);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_exports_every_family_with_conventional_names() {
        static M: Metrics = Metrics::new();
        M.set_process(Process::Replica, "a");
        M.state
            .set(ReplicaState::Protected, crate::Role::Primary, 3, "test");
        M.commit.observe_ns(2_500);
        M.exit(ExitKind::NetRx);
        M.rejected(RejectCause::StaleEpoch);
        let text = encode(&M).unwrap_or_default();
        for line in [
            "ftvm_build_info{process=\"replica\",name=\"a\",version=\"0.1.0\"} 1",
            "ftvm_replica_state{state=\"protected\"} 1",
            "ftvm_replica_state{state=\"starting\"} 0",
            "ftvm_replica_role{role=\"primary\"} 1",
            "ftvm_replica_epoch 3",
            "ftvm_output_commit_seconds_count 1",
            "ftvm_output_commit_seconds_bucket{le=\"+Inf\"} 1",
            "ftvm_log_bytes_total 0",
            "ftvm_log_entries_total 0",
            "ftvm_log_frames_rejected_total{cause=\"stale_epoch\"} 1",
            "ftvm_vm_exits_total{kind=\"net_rx\"} 1",
            "ftvm_join_pause_seconds_count 0",
            "ftvm_arbiter_decision_seconds_count 0",
            "# EOF",
        ] {
            assert!(text.contains(line), "{line:?} missing from:\n{text}");
        }
        assert!(text.contains("# TYPE ftvm_output_commit_seconds histogram"));
        let parsed = parse(&text);
        assert_eq!(parsed.get("ftvm_replica_epoch"), Some(&3.0));
        assert_eq!(
            parsed.get("ftvm_vm_exits_total{kind=\"net_rx\"}"),
            Some(&1.0)
        );
        assert_eq!(parsed.get("ftvm_output_commit_seconds_sum"), Some(&2.5e-6));
        assert!(!text.contains("ftvm_front_"));
    }

    #[test]
    fn a_front_exports_its_own_families_only() {
        static M: Metrics = Metrics::new();
        M.set_process(Process::Front, "front");
        M.set_source(Box::new(|| {
            vec![crate::Sample {
                name: "ftvm_front_fenced_responses",
                help: "test double",
                counter: true,
                value: 1.0,
            }]
        }));
        let text = encode(&M).unwrap_or_default();
        assert!(
            text.contains("ftvm_front_fenced_responses_total 1"),
            "{text}"
        );
        assert!(!text.contains("ftvm_replica_state"));
    }
}
