//! The promotion gate (`CVCHAIN_GATE`): rules an iteration must meet before it may go to the
//! `production` channel. Evaluated once, when its training completes, on the performance
//! GetIterationPerformance reports at the default thresholds; the verdict and its reasons are
//! recorded on the iteration's Training row, and every later decision reads them from there.

use crate::customvision::IterationPerformance;
use std::fmt;

pub const GATE_SETTING: &str = "CVCHAIN_GATE";

/// A metric the gate can judge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Metric {
    Precision,
    Recall,
    /// Mean average precision (`averagePrecision`).
    Map,
}

impl Metric {
    pub const ALL: [Metric; 3] = [Metric::Precision, Metric::Recall, Metric::Map];

    pub fn as_str(self) -> &'static str {
        match self {
            Metric::Precision => "precision",
            Metric::Recall => "recall",
            Metric::Map => "map",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|m| m.as_str().eq_ignore_ascii_case(s.trim()))
    }
}

/// An iteration's performance, as the gate reads it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Metrics {
    pub precision: Option<f64>,
    pub recall: Option<f64>,
    pub map: Option<f64>,
}

impl Metrics {
    pub fn get(&self, m: Metric) -> Option<f64> {
        match m {
            Metric::Precision => self.precision,
            Metric::Recall => self.recall,
            Metric::Map => self.map,
        }
        .filter(|v| v.is_finite())
    }
}

impl From<&IterationPerformance> for Metrics {
    fn from(p: &IterationPerformance) -> Self {
        Self {
            precision: p.precision,
            recall: p.recall,
            map: p.average_precision,
        }
    }
}

/// One rule of the gate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rule {
    /// `precision>=0.8`, `recall>=85%`, `map>=0.9`.
    AtLeast(Metric, f64),
    /// `improves:map`: strictly better than the iteration now in production (passes when
    /// production is empty).
    Improves(Metric),
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rule::AtLeast(m, x) => write!(f, "{}>={x}", m.as_str()),
            Rule::Improves(m) => write!(f, "improves:{}", m.as_str()),
        }
    }
}

/// The rules, all of which must hold. No rules: every iteration passes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Gate {
    pub rules: Vec<Rule>,
}

/// What the gate said about an iteration.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub passed: bool,
    /// Why: the rules that failed, or, when it passed, the rules that held.
    pub reasons: Vec<String>,
}

impl Verdict {
    pub fn describe(&self) -> String {
        self.reasons.join("; ")
    }
}

/// `0.85` or `85%`, from 0 to 1.
fn threshold(text: &str) -> Result<f64, String> {
    let t = text.trim();
    let value = match t.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().map(|v| v / 100.0),
        None => t.parse::<f64>(),
    }
    .map_err(|_| format!("{t:?} is not a number (0 to 1, or a percentage such as 85%)"))?;
    if !(0.0..=1.0).contains(&value) {
        return Err(format!("{t:?} is outside 0 to 1 (or 0% to 100%)"));
    }
    Ok(value)
}

impl Gate {
    /// Parses `precision>=0.8, recall>=75%, improves:map`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut rules = Vec::new();
        for raw in text.split(',') {
            let rule = raw.trim();
            if rule.is_empty() {
                continue;
            }
            let known = || {
                Metric::ALL
                    .iter()
                    .map(|m| m.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let parsed = if let Some(m) = rule.strip_prefix("improves:") {
                Rule::Improves(Metric::parse(m).ok_or_else(|| {
                    format!(
                        "unknown metric {:?} in {rule:?}; known: {}",
                        m.trim(),
                        known()
                    )
                })?)
            } else if let Some((m, x)) = rule.split_once(">=") {
                let metric = Metric::parse(m).ok_or_else(|| {
                    format!(
                        "unknown metric {:?} in {rule:?}; known: {}",
                        m.trim(),
                        known()
                    )
                })?;
                Rule::AtLeast(
                    metric,
                    threshold(x).map_err(|e| format!("in {rule:?}: {e}"))?,
                )
            } else {
                return Err(format!(
                    "{rule:?} is not a rule: use metric>=X (precision, recall or map; X from 0 to \
                     1 or a percentage) or improves:metric"
                ));
            };
            if rules.contains(&parsed) {
                return Err(format!("{rule:?} appears twice"));
            }
            rules.push(parsed);
        }
        Ok(Self { rules })
    }

    /// Whether an `improves:` rule needs the production iteration's metrics.
    pub fn compares_with_production(&self) -> bool {
        self.rules.iter().any(|r| matches!(r, Rule::Improves(_)))
    }

    /// Judges `metrics`, against `production` (the metrics of the iteration now in production,
    /// `None` when production is empty). A metric the service did not report fails its rule.
    pub fn evaluate(&self, metrics: &Metrics, production: Option<&Metrics>) -> Verdict {
        if self.rules.is_empty() {
            return Verdict {
                passed: true,
                reasons: vec!["no gate configured".into()],
            };
        }
        let mut failed = Vec::new();
        let mut held = Vec::new();
        let show = |v: f64| format!("{v:.2}");
        for rule in &self.rules {
            match *rule {
                Rule::AtLeast(m, x) => match metrics.get(m) {
                    None => failed.push(format!("{} unknown", m.as_str())),
                    Some(v) if v >= x => {
                        held.push(format!("{} {} >= {}", m.as_str(), show(v), show(x)))
                    }
                    Some(v) => failed.push(format!("{} {} < {}", m.as_str(), show(v), show(x))),
                },
                Rule::Improves(m) => match (metrics.get(m), production) {
                    (_, None) => held.push(format!("{} improves: production is empty", m.as_str())),
                    (None, Some(_)) => failed.push(format!("{} unknown", m.as_str())),
                    (Some(v), Some(p)) => match p.get(m) {
                        None => held.push(format!(
                            "{} {}: production's is unknown",
                            m.as_str(),
                            show(v)
                        )),
                        Some(pv) if v > pv => held.push(format!(
                            "{} {} > production's {}",
                            m.as_str(),
                            show(v),
                            show(pv)
                        )),
                        Some(pv) => failed.push(format!(
                            "{} {} <= production's {}",
                            m.as_str(),
                            show(v),
                            show(pv)
                        )),
                    },
                },
            }
        }
        let passed = failed.is_empty();
        Verdict {
            passed,
            reasons: if passed { held } else { failed },
        }
    }
}

impl fmt::Display for Gate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rules: Vec<String> = self.rules.iter().map(ToString::to_string).collect();
        f.write_str(&rules.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: f64, r: f64, map: f64) -> Metrics {
        Metrics {
            precision: Some(p),
            recall: Some(r),
            map: Some(map),
        }
    }

    #[test]
    fn rules_parse_with_fractions_and_percentages() {
        let g = Gate::parse(" precision>=0.8, recall>=75% ,improves:MAP,").unwrap();
        assert_eq!(
            g.rules,
            vec![
                Rule::AtLeast(Metric::Precision, 0.8),
                Rule::AtLeast(Metric::Recall, 0.75),
                Rule::Improves(Metric::Map),
            ]
        );
        assert!(g.compares_with_production());
        assert_eq!(Gate::parse("").unwrap(), Gate::default());
        assert!(!Gate::default().compares_with_production());
    }

    #[test]
    fn malformed_rules_say_what_is_wrong() {
        for (text, want) in [
            ("accuracy>=0.5", "unknown metric \"accuracy\""),
            ("precision>=1.5", "outside 0 to 1"),
            ("recall>=120%", "outside 0 to 1"),
            ("map>=high", "not a number"),
            ("precision>0.5", "is not a rule"),
            ("improves:f1", "unknown metric \"f1\""),
            ("map>=0.5, map>=0.5", "appears twice"),
        ] {
            let e = Gate::parse(text).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn every_rule_must_hold_and_the_reasons_say_which_did_not() {
        let g = Gate::parse("precision>=0.8,recall>=0.80").unwrap();
        let v = g.evaluate(&m(0.9, 0.78, 0.8), None);
        assert!(!v.passed);
        assert_eq!(v.reasons, vec!["recall 0.78 < 0.80"]);
        let v = g.evaluate(&m(0.9, 0.8, 0.8), None);
        assert!(v.passed, "{v:?}");
        assert_eq!(v.describe(), "precision 0.90 >= 0.80; recall 0.80 >= 0.80");
        let v = g.evaluate(&Metrics::default(), None);
        assert_eq!(v.reasons, vec!["precision unknown", "recall unknown"]);
    }

    #[test]
    fn improves_compares_with_production_strictly() {
        let g = Gate::parse("improves:map").unwrap();
        assert!(g.evaluate(&m(0.5, 0.5, 0.5), None).passed);
        let prod = m(0.9, 0.9, 0.85);
        assert!(!g.evaluate(&m(0.9, 0.9, 0.85), Some(&prod)).passed);
        let v = g.evaluate(&m(0.9, 0.9, 0.84), Some(&prod));
        assert_eq!(v.reasons, vec!["map 0.84 <= production's 0.85"]);
        assert!(g.evaluate(&m(0.9, 0.9, 0.86), Some(&prod)).passed);
    }

    #[test]
    fn no_gate_passes_everything() {
        let v = Gate::default().evaluate(&Metrics::default(), None);
        assert!(v.passed);
        assert_eq!(v.describe(), "no gate configured");
    }
}
