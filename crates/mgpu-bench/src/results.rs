//! The metric catalogue, the targets, and the output: a comfy-table (one column per
//! system, plus "how many times better mgpu is" against each other system) or one JSON object.

use comfy_table::{presets, Table};
use serde_json::{json, Value};

use crate::scenarios::Metrics;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Better {
    Lower,
    Higher,
    /// A count, not a figure of merit.
    None,
}

pub struct MetricDef {
    pub key: &'static str,
    pub label: &'static str,
    pub unit: &'static str,
    pub better: Better,
}

const fn def(
    key: &'static str,
    label: &'static str,
    unit: &'static str,
    better: Better,
) -> MetricDef {
    MetricDef {
        key,
        label,
        unit,
        better,
    }
}

/// Every measured column, in table order.
pub const METRICS: &[MetricDef] = &[
    def(
        "srun_median_ms",
        "1. srun true latency, median",
        "ms",
        Better::Lower,
    ),
    def(
        "srun_p99_ms",
        "1. srun true latency, p99",
        "ms",
        Better::Lower,
    ),
    def(
        "latency_steal_pct",
        "1. VM steal during the runs",
        "%",
        Better::None,
    ),
    def(
        "spawn_floor_per_s",
        "2. floor: /bin/true spawns, 1 client",
        "runs/s",
        Better::None,
    ),
    def(
        "submit_seq_per_s",
        "2. detached submits, 1 client",
        "jobs/s",
        Better::Higher,
    ),
    def(
        "submit_par_per_s",
        "2. detached submits, N clients",
        "jobs/s",
        Better::Higher,
    ),
    def(
        "throughput_per_s",
        "3. trivial 1-GPU jobs, end to end",
        "jobs/s",
        Better::Higher,
    ),
    def(
        "throughput_cpu_ms_per_job",
        "3. CPU time per job, all processes",
        "ms",
        Better::Lower,
    ),
    def(
        "array_throughput_per_s",
        "3. the same jobs as one job array",
        "jobs/s",
        Better::Higher,
    ),
    def(
        "array_throughput_cpu_ms_per_job",
        "3. CPU time per job, as one array",
        "ms",
        Better::Lower,
    ),
    def(
        "throughput_steal_pct",
        "3. VM steal during the run",
        "%",
        Better::None,
    ),
    def(
        "dispatch_median_ms",
        "4. dispatch latency, median",
        "ms",
        Better::Lower,
    ),
    def(
        "dispatch_p99_ms",
        "4. dispatch latency, p99",
        "ms",
        Better::Lower,
    ),
    def(
        "dispatch_steal_pct",
        "4. VM steal during the runs",
        "%",
        Better::None,
    ),
    def("scale_jobs", "5. pending jobs", "jobs", Better::None),
    def(
        "scale_fill_per_s",
        "5. queue fill, parallel submits",
        "jobs/s",
        Better::Higher,
    ),
    def(
        "scale_submit_p99_ms",
        "5. CLI submit p99 at full queue",
        "ms",
        Better::Lower,
    ),
    def(
        "scale_submit_raw_p99_ms",
        "5. protocol submit p99 at full queue",
        "ms",
        Better::Lower,
    ),
    def(
        "scale_queue_ms",
        "5. queue listing (JSON where offered)",
        "ms",
        Better::Lower,
    ),
    def(
        "scale_cancel_all_ms",
        "5. cancel-all command",
        "ms",
        Better::Lower,
    ),
    def(
        "scale_peak_rss_mib",
        "5. daemon peak RSS (VmHWM)",
        "MiB",
        Better::Lower,
    ),
];

fn metric(key: &str) -> &'static MetricDef {
    METRICS.iter().find(|d| d.key == key).expect("known metric")
}

/// One system's figures.
pub struct SystemResult {
    pub name: String,
    pub metrics: Metrics,
}

/// How many times better mgpu is than `other` on `key` (> 1: mgpu better).
fn advantage(key: &str, mgpu: &Metrics, other: &Metrics) -> Option<f64> {
    let (m, o) = (*mgpu.get(key)?, *other.get(key)?);
    let r = match metric(key).better {
        Better::Lower => o / m,
        Better::Higher => m / o,
        Better::None => return None,
    };
    r.is_finite().then_some(r)
}

enum Goal {
    /// mgpu's figure at most this.
    AtMost(f64),
    /// mgpu's figure at least this.
    AtLeast(f64),
    /// mgpu at least this many times better than the named system.
    TimesBetter(&'static str, f64),
}

/// The targets of issue 6.
const TARGETS: &[(&str, Goal)] = &[
    ("srun_median_ms", Goal::AtMost(3.0)),
    ("srun_median_ms", Goal::TimesBetter("slurm", 10.0)),
    ("srun_median_ms", Goal::TimesBetter("tsp", 1.0)),
    ("submit_seq_per_s", Goal::AtLeast(1000.0)),
    ("submit_seq_per_s", Goal::TimesBetter("slurm", 10.0)),
    ("submit_seq_per_s", Goal::TimesBetter("tsp", 3.0)),
    ("submit_par_per_s", Goal::AtLeast(3000.0)),
    ("throughput_per_s", Goal::AtLeast(500.0)),
    ("throughput_per_s", Goal::TimesBetter("tsp", 1.0)),
    ("dispatch_p99_ms", Goal::AtMost(5.0)),
    ("scale_submit_p99_ms", Goal::AtMost(5.0)),
    ("scale_submit_raw_p99_ms", Goal::AtMost(5.0)),
    ("scale_queue_ms", Goal::AtMost(1000.0)),
    ("scale_peak_rss_mib", Goal::AtMost(300.0)),
];

fn fmt(v: f64) -> String {
    if !v.is_finite() {
        "-".into()
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn find<'a>(results: &'a [SystemResult], name: &str) -> Option<&'a Metrics> {
    results.iter().find(|r| r.name == name).map(|r| &r.metrics)
}

/// Evaluated targets: (description, measured, met); `None` measured when not run.
fn targets(results: &[SystemResult]) -> Vec<(String, Option<f64>, Option<bool>)> {
    let Some(mgpu) = find(results, "mgpu") else {
        return Vec::new();
    };
    TARGETS
        .iter()
        .filter_map(|(key, goal)| {
            let d = metric(key);
            let v = mgpu.get(*key).copied();
            Some(match goal {
                Goal::AtMost(x) => (
                    format!("{} <= {} {}", d.label, fmt(*x), d.unit),
                    v,
                    v.map(|v| v <= *x),
                ),
                Goal::AtLeast(x) => (
                    format!("{} >= {} {}", d.label, fmt(*x), d.unit),
                    v,
                    v.map(|v| v >= *x),
                ),
                Goal::TimesBetter(other, x) => {
                    let r = advantage(key, mgpu, find(results, other)?);
                    (
                        format!("{}: at least {x}x better than {other}", d.label),
                        r,
                        r.map(|r| r >= *x),
                    )
                }
            })
        })
        .collect()
}

/// The results table, then the targets table.
pub fn render(results: &[SystemResult], header: &str) -> String {
    let mut t = Table::new();
    t.load_preset(presets::UTF8_FULL_CONDENSED);
    let mgpu = find(results, "mgpu");
    let others: Vec<&SystemResult> = results.iter().filter(|r| r.name != "mgpu").collect();
    let mut head = vec!["metric".to_string(), "unit".to_string()];
    head.extend(results.iter().map(|r| r.name.clone()));
    if mgpu.is_some() {
        head.extend(
            others
                .iter()
                .map(|o| format!("mgpu vs {} (x better)", o.name)),
        );
    }
    t.set_header(head);
    for d in METRICS {
        if results.iter().all(|r| !r.metrics.contains_key(d.key)) {
            continue;
        }
        let mut row = vec![d.label.to_string(), d.unit.to_string()];
        row.extend(
            results
                .iter()
                .map(|r| r.metrics.get(d.key).map_or("-".into(), |v| fmt(*v))),
        );
        if let Some(m) = mgpu {
            row.extend(others.iter().map(|o| {
                advantage(d.key, m, &o.metrics).map_or("-".into(), |r| format!("{}x", fmt(r)))
            }));
        }
        t.add_row(row);
    }
    let mut out = format!("{header}\n{t}\n");
    let tg = targets(results);
    if !tg.is_empty() {
        let mut t = Table::new();
        t.load_preset(presets::UTF8_FULL_CONDENSED);
        t.set_header(vec!["issue 6 target (mgpu)", "measured", "met"]);
        for (desc, v, met) in tg {
            t.add_row(vec![
                desc,
                v.map_or("not measured".into(), fmt),
                match met {
                    Some(true) => "yes".into(),
                    Some(false) => "NO".into(),
                    None => "-".into(),
                },
            ]);
        }
        out.push_str(&format!("{t}\n"));
    }
    out
}

/// Everything as one JSON object.
pub fn to_json(results: &[SystemResult], config: Value, notes: &[String]) -> Value {
    let systems: serde_json::Map<String, Value> = results
        .iter()
        .map(|r| (r.name.clone(), json!(r.metrics)))
        .collect();
    let mut ratios = serde_json::Map::new();
    if let Some(m) = find(results, "mgpu") {
        for o in results.iter().filter(|r| r.name != "mgpu") {
            let r: serde_json::Map<String, Value> = METRICS
                .iter()
                .filter_map(|d| Some((d.key.to_string(), json!(advantage(d.key, m, &o.metrics)?))))
                .collect();
            ratios.insert(o.name.clone(), Value::Object(r));
        }
    }
    let units: serde_json::Map<String, Value> = METRICS
        .iter()
        .map(|d| (d.key.to_string(), json!({"label": d.label, "unit": d.unit})))
        .collect();
    let targets: Vec<Value> = targets(results)
        .into_iter()
        .map(|(t, v, met)| json!({"target": t, "measured": v, "met": met}))
        .collect();
    json!({
        "config": config,
        "metrics": units,
        "systems": systems,
        "mgpu_times_better": ratios,
        "targets": targets,
        "notes": notes,
    })
}
