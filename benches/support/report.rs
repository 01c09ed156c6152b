//! Figures, their targets, and the three outputs: the table on stdout (one row per
//! figure, printed as soon as it is measured), `target/bench/seaport.json` (every
//! figure with its raw numbers, so docs can be regenerated) and a Markdown table.

use serde_json::{Value, json};
use std::fmt::Write as _;

/// What a figure counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Records per second.
    PerSec,
    /// Milliseconds.
    Ms,
    /// Microseconds.
    Us,
    /// Mebibytes.
    MiB,
    /// Percent of one CPU.
    Percent,
    /// A number of things (connections).
    Count,
}

impl Unit {
    fn name(self) -> &'static str {
        match self {
            Unit::PerSec => "records/s",
            Unit::Ms => "ms",
            Unit::Us => "us",
            Unit::MiB => "MiB",
            Unit::Percent => "% of a CPU",
            Unit::Count => "connections",
        }
    }

    /// Formats a value of this unit for people.
    pub fn format(self, v: f64) -> String {
        match self {
            Unit::PerSec => format!("{}/s", thousands(v)),
            Unit::Ms if v < 10.0 => format!("{v:.2} ms"),
            Unit::Ms if v < 1000.0 => format!("{v:.1} ms"),
            Unit::Ms => format!("{} ms", thousands(v)),
            Unit::Us => format!("{v:.1} us"),
            Unit::MiB if v < 10.0 => format!("{v:.2} MiB"),
            Unit::MiB => format!("{v:.1} MiB"),
            Unit::Percent => format!("{v:.3} %"),
            Unit::Count => format!("{v:.1}"),
        }
    }
}

fn thousands(v: f64) -> String {
    let n = v.round() as u64;
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Whether a measurement is exact or only a bound (a run that hit its deadline
/// gives a bound: a rate of at most what it reached).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    /// As measured.
    Exact,
    /// The true value is at most this.
    AtMost,
    /// The true value is at least this.
    AtLeast,
}

impl Bound {
    fn flip(self) -> Bound {
        match self {
            Bound::Exact => Bound::Exact,
            Bound::AtMost => Bound::AtLeast,
            Bound::AtLeast => Bound::AtMost,
        }
    }

    fn prefix(self) -> &'static str {
        match self {
            Bound::Exact => "",
            Bound::AtMost => "<",
            Bound::AtLeast => ">",
        }
    }
}

/// One measured value.
#[derive(Debug, Clone, Copy)]
pub struct Measure {
    /// The number, in the figure's unit.
    pub value: f64,
    /// Exact or a bound.
    pub bound: Bound,
}

impl Measure {
    /// An exact value.
    pub fn exact(value: f64) -> Measure {
        Measure {
            value,
            bound: Bound::Exact,
        }
    }

    /// A value the truth is at most.
    pub fn at_most(value: f64) -> Measure {
        Measure {
            value,
            bound: Bound::AtMost,
        }
    }

    /// A value the truth is at least.
    pub fn at_least(value: f64) -> Measure {
        Measure {
            value,
            bound: Bound::AtLeast,
        }
    }

    /// `self / other`, with the bound that follows.
    pub fn ratio(self, other: Measure) -> Measure {
        let bound = match (self.bound, other.bound.flip()) {
            (Bound::Exact, b) | (b, Bound::Exact) => b,
            (a, b) if a == b => a,
            _ => Bound::Exact,
        };
        Measure {
            value: self.value / other.value,
            bound,
        }
    }
}

/// What a figure should reach.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    /// The ratio is at least this.
    RatioAtLeast(f64),
    /// The ratio is at most this.
    RatioAtMost(f64),
    /// Our value is at most this, in the figure's unit.
    OursAtMost(f64),
}

/// One row of the table.
#[derive(Debug, Clone)]
pub struct Figure {
    /// The scenario that measured it (`--only` name).
    pub scenario: &'static str,
    /// What it is, for people.
    pub name: String,
    /// Its unit.
    pub unit: Unit,
    /// Our hub or supervisor.
    pub ours: Option<Measure>,
    /// npm seaport 2.0.9.
    pub node: Option<Measure>,
    /// supervisord (supervisor figures only).
    pub supervisord: Option<Measure>,
    /// nginx (router figures only).
    pub nginx: Option<Measure>,
    /// What the ratio divides (`ours/node` unless set otherwise).
    pub ratio_of: &'static str,
    /// The ratio, computed from `ours` and `node` unless set.
    pub ratio: Option<Measure>,
    /// The target, if the issue set one.
    pub target: Option<Target>,
    /// Anything a reader should know about this row.
    pub notes: Vec<String>,
    /// Raw numbers behind the row (samples, counts, durations), for the JSON.
    pub raw: Value,
}

impl Figure {
    /// A row with nothing measured yet.
    pub fn new(scenario: &'static str, name: impl Into<String>, unit: Unit) -> Figure {
        Figure {
            scenario,
            name: name.into(),
            unit,
            ours: None,
            node: None,
            supervisord: None,
            nginx: None,
            ratio_of: "ours/node",
            ratio: None,
            target: None,
            notes: Vec::new(),
            raw: json!({}),
        }
    }

    /// Sets the target.
    pub fn target(mut self, target: Target) -> Figure {
        self.target = Some(target);
        self
    }

    /// The ratio shown: explicit, or ours/node.
    pub fn shown_ratio(&self) -> Option<Measure> {
        self.ratio.or_else(|| match (self.ours, self.node) {
            (Some(o), Some(n)) if n.value > 0.0 => Some(o.ratio(n)),
            _ => None,
        })
    }

    /// Whether the target is met (`None`: no target, or not measurable).
    pub fn met(&self) -> Option<bool> {
        match self.target? {
            Target::RatioAtLeast(t) => Some(self.shown_ratio()?.value >= t),
            Target::RatioAtMost(t) => Some(self.shown_ratio()?.value <= t),
            Target::OursAtMost(t) => Some(self.ours?.value <= t),
        }
    }

    fn target_text(&self) -> String {
        match self.target {
            None => "-".into(),
            Some(Target::RatioAtLeast(t)) => format!("{} >= {}", self.ratio_of, ratio_text(t)),
            Some(Target::RatioAtMost(t)) => format!("{} <= {}", self.ratio_of, ratio_text(t)),
            Some(Target::OursAtMost(t)) => format!("ours <= {}", self.unit.format(t)),
        }
    }

    fn cell(&self, m: Option<Measure>) -> String {
        m.map_or_else(
            || "-".into(),
            |m| format!("{}{}", m.bound.prefix(), self.unit.format(m.value)),
        )
    }

    fn ratio_cell(&self) -> String {
        self.shown_ratio().map_or_else(
            || "-".into(),
            |r| format!("{}{}", r.bound.prefix(), ratio_text(r.value)),
        )
    }

    fn result_cell(&self) -> &'static str {
        match self.met() {
            Some(true) => "met",
            Some(false) => "MISSED",
            None if self.target.is_some() => "n/a",
            None => "-",
        }
    }

    fn cells(&self) -> [String; 8] {
        [
            self.name.clone(),
            self.cell(self.ours),
            self.cell(self.node),
            self.cell(self.supervisord),
            self.cell(self.nginx),
            self.ratio_cell(),
            self.target_text(),
            self.result_cell().to_string(),
        ]
    }

    /// The row as JSON.
    pub fn to_json(&self) -> Value {
        let m = |m: Option<Measure>| {
            m.map(|m| {
                json!({
                    "value": m.value,
                    "bound": match m.bound { Bound::Exact => "exact", Bound::AtMost => "at_most", Bound::AtLeast => "at_least" },
                })
            })
        };
        json!({
            "scenario": self.scenario,
            "figure": self.name,
            "unit": self.unit.name(),
            "ours": m(self.ours),
            "node": m(self.node),
            "supervisord": m(self.supervisord),
            "nginx": m(self.nginx),
            "ratio_of": self.ratio_of,
            "ratio": m(self.shown_ratio()),
            "target": self.target_text(),
            "met": self.met(),
            "notes": self.notes,
            "raw": self.raw,
        })
    }
}

/// A ratio for people: `24×`, `2.4×`, `0.08×`.
pub fn ratio_text(r: f64) -> String {
    if r >= 100.0 {
        format!("{r:.0}x")
    } else if r >= 10.0 {
        format!("{r:.1}x")
    } else if r >= 0.1 {
        format!("{r:.2}x")
    } else {
        format!("{r:.3}x")
    }
}

const HEADERS: [&str; 8] = [
    "figure",
    "ours",
    "node",
    "supervisord",
    "nginx",
    "ratio",
    "target",
    "result",
];
const WIDTHS: [usize; 8] = [58, 14, 14, 14, 14, 9, 22, 6];

/// The figures of a run, printed as they come.
#[derive(Default)]
pub struct Report {
    /// Every figure so far.
    pub figures: Vec<Figure>,
    /// Scenarios that failed, with why.
    pub errors: Vec<(String, String)>,
}

impl Report {
    /// Prints the table header.
    pub fn print_header(&self) {
        println!("{}", row_text(&HEADERS.map(String::from)));
        println!(
            "{}",
            WIDTHS
                .iter()
                .map(|w| "-".repeat(*w))
                .collect::<Vec<_>>()
                .join("  ")
        );
    }

    /// Adds a figure and prints its row.
    pub fn push(&mut self, figure: Figure) {
        println!("{}", row_text(&figure.cells()));
        for note in &figure.notes {
            println!("    note: {note}");
        }
        self.figures.push(figure);
    }

    /// Records a failed scenario and prints it.
    pub fn error(&mut self, scenario: &str, error: String) {
        println!("{scenario}: FAILED: {error}");
        self.errors.push((scenario.to_string(), error));
    }

    /// The table as Markdown.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "| {} |", HEADERS.join(" | "));
        let _ = writeln!(
            out,
            "|{}",
            ["---", "---:", "---:", "---:", "---:", "---:", "---", "---"]
                .map(|s| format!(" {s} |"))
                .concat()
        );
        for f in &self.figures {
            let cells = f.cells().map(|c| c.replace('|', "\\|"));
            let _ = writeln!(out, "| {} |", cells.join(" | "));
        }
        let mut notes: Vec<String> = self
            .figures
            .iter()
            .flat_map(|f| f.notes.iter().map(move |n| format!("- {}: {n}", f.name)))
            .collect();
        notes.extend(
            self.errors
                .iter()
                .map(|(scenario, error)| format!("- {scenario}: FAILED: {error}")),
        );
        if !notes.is_empty() {
            let _ = writeln!(out, "\nNotes:\n\n{}", notes.join("\n"));
        }
        out
    }
}

fn row_text(cells: &[String; 8]) -> String {
    let mut out = String::new();
    for (i, (cell, width)) in cells.iter().zip(WIDTHS).enumerate() {
        if i > 0 {
            out.push_str("  ");
        }
        if i == 0 || i >= 5 {
            let _ = write!(out, "{cell:<width$}");
        } else {
            let _ = write!(out, "{cell:>width$}");
        }
    }
    out.trim_end().to_string()
}

/// Percentile `p` (0-100) of sorted samples, nearest-rank.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// What the machine is, for the record.
pub fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown", |(_, m)| m.trim())
        .to_string();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    json!({
        "nproc": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "cpu": model,
        "memory_gib": (mem_kib as f64 / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "loadavg": loadavg(),
    })
}

/// `/proc/loadavg`'s first three fields.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}
