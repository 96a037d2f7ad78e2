//! The configuration the decisions take, and what every part's settings parsing shares: the
//! error that names the wrong setting, and one reader of the environment with one number parser.
//!
//! Each part parses its own settings (storage connections in the storage adapter, worker options
//! in the worker, the chain here); the application assembles them.

use crate::chain::{ExportTarget, parse_chain};
use crate::channels::{CHANNEL_PATH_SETTING, Paths};
use crate::gate::{GATE_SETTING, Gate};
use crate::release::{DEFAULT_CONTAINER, DEFAULT_TEMPLATE, PathTemplate};
use crate::retention::{KEEP_ITERATIONS_SETTING, MAX_ITERATIONS};
use std::ops::RangeInclusive;
use url::Url;

pub const EXPORTS_SETTING: &str = "CVCHAIN_EXPORTS";
pub const PUBLISH_NAME_SETTING: &str = "CVCHAIN_PUBLISH_NAME";
pub const PREDICTION_RESOURCE_SETTING: &str = "CVCHAIN_PREDICTION_RESOURCE_ID";

/// A setting that is missing or wrong, and what to do about it. Never quotes a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("setting {setting}: {problem}")]
pub struct SettingsError {
    pub setting: String,
    pub problem: String,
}

impl SettingsError {
    pub fn new(setting: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            setting: setting.into(),
            problem: problem.into(),
        }
    }
}

/// The settings as the process sees them: the environment in production, a map in tests.
/// Empty values count as unset, as in the Functions host.
#[derive(Clone, Copy)]
pub struct Vars<'a> {
    lookup: &'a dyn Fn(&str) -> Option<String>,
}

impl<'a> Vars<'a> {
    pub fn new(lookup: &'a dyn Fn(&str) -> Option<String>) -> Self {
        Self { lookup }
    }

    /// The value, unless unset or blank.
    pub fn get(&self, name: &str) -> Option<String> {
        (self.lookup)(name).filter(|v| !v.trim().is_empty())
    }

    /// A whole number in `range`, `default` when unset. The error reads "must be a whole
    /// number{unit} from A to B{hint}".
    pub fn number(
        &self,
        name: &str,
        default: u64,
        range: RangeInclusive<u64>,
        unit: &str,
        hint: &str,
    ) -> Result<u64, SettingsError> {
        let Some(v) = self.get(name) else {
            return Ok(default);
        };
        v.trim()
            .parse::<u64>()
            .ok()
            .filter(|n| range.contains(n))
            .ok_or_else(|| {
                SettingsError::new(
                    name,
                    format!(
                        "must be a whole number{unit} from {} to {}{hint}",
                        range.start(),
                        range.end()
                    ),
                )
            })
    }
}

/// An absolute http(s) URL without a query string (a SAS belongs elsewhere) and without a user
/// name or password (they would be printed wherever the URL is).
pub fn parse_url(setting: &str, what: &str, value: &str) -> Result<Url, SettingsError> {
    match Url::parse(value.trim()) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.has_host() => {
            if !u.username().is_empty() || u.password().is_some() {
                return Err(SettingsError::new(
                    setting,
                    format!(
                        "{what} must not carry a user name or password (credentials go in their own settings)"
                    ),
                ));
            }
            if u.query().is_some() {
                return Err(SettingsError::new(
                    setting,
                    format!(
                        "{what} must not carry a query string (put a SAS in SharedAccessSignature)"
                    ),
                ));
            }
            Ok(u)
        }
        _ => Err(SettingsError::new(
            setting,
            format!("{what} is not an http(s) URL"),
        )),
    }
}

/// What happens after training: the exports, in order, and optional publishing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChainSettings {
    pub exports: Vec<ExportTarget>,
    pub publish: Option<PublishSettings>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishSettings {
    pub name: String,
    pub prediction_resource_id: String,
}

impl ChainSettings {
    /// `CVCHAIN_EXPORTS`, `CVCHAIN_PUBLISH_NAME` and `CVCHAIN_PREDICTION_RESOURCE_ID`.
    pub fn from_vars(vars: &Vars) -> Result<Self, SettingsError> {
        let exports = match vars.get(EXPORTS_SETTING) {
            Some(v) => parse_chain(&v).map_err(|p| SettingsError::new(EXPORTS_SETTING, p))?,
            None => Vec::new(),
        };
        let publish = match (
            vars.get(PUBLISH_NAME_SETTING),
            vars.get(PREDICTION_RESOURCE_SETTING),
        ) {
            (None, None) => None,
            (Some(name), Some(id)) => {
                let name = name.trim().to_owned();
                if name.chars().any(|c| c.is_whitespace() || c == '/') {
                    return Err(SettingsError::new(
                        PUBLISH_NAME_SETTING,
                        "must not contain spaces or `/`",
                    ));
                }
                let id = id.trim().to_owned();
                if !id.starts_with("/subscriptions/") {
                    return Err(SettingsError::new(
                        PREDICTION_RESOURCE_SETTING,
                        "must be the prediction resource's id (/subscriptions/…/providers/Microsoft.CognitiveServices/accounts/…)",
                    ));
                }
                Some(PublishSettings {
                    name,
                    prediction_resource_id: id,
                })
            }
            (Some(_), None) => {
                return Err(SettingsError::new(
                    PREDICTION_RESOURCE_SETTING,
                    format!("is required when {PUBLISH_NAME_SETTING} is set"),
                ));
            }
            (None, Some(_)) => {
                return Err(SettingsError::new(
                    PUBLISH_NAME_SETTING,
                    format!("is required when {PREDICTION_RESOURCE_SETTING} is set"),
                ));
            }
        };
        Ok(Self { exports, publish })
    }
}

/// Where exported models are copied from and to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseSettings {
    /// The container given to Custom Vision as `exportModelContainerUri`; a `modelUri` is used
    /// only when it lies inside it.
    pub backup_container: Option<Url>,
    /// The container in cvchain's account that receives the release copies.
    pub container: String,
    pub template: PathTemplate,
}

impl Default for ReleaseSettings {
    fn default() -> Self {
        Self {
            backup_container: None,
            container: DEFAULT_CONTAINER.to_owned(),
            template: PathTemplate::parse(DEFAULT_TEMPLATE).expect("the default template is valid"),
        }
    }
}

/// The model lifecycle: the promotion gate, where channel copies go, and retention.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LifecycleSettings {
    /// `CVCHAIN_GATE`; no rules: every iteration passes.
    pub gate: Gate,
    /// `CVCHAIN_CHANNEL_PATH`.
    pub channels: Paths,
    /// `CVCHAIN_KEEP_ITERATIONS`; `None`: retention is off.
    pub keep_iterations: Option<usize>,
}

impl LifecycleSettings {
    /// `CVCHAIN_GATE`, `CVCHAIN_CHANNEL_PATH` and `CVCHAIN_KEEP_ITERATIONS`.
    pub fn from_vars(vars: &Vars) -> Result<Self, SettingsError> {
        let mut s = Self::default();
        if let Some(v) = vars.get(GATE_SETTING) {
            s.gate = Gate::parse(&v).map_err(|p| SettingsError::new(GATE_SETTING, p))?;
        }
        if let Some(v) = vars.get(CHANNEL_PATH_SETTING) {
            s.channels.template = PathTemplate::parse_channel(&v)
                .map_err(|p| SettingsError::new(CHANNEL_PATH_SETTING, p))?;
        }
        if vars.get(KEEP_ITERATIONS_SETTING).is_some() {
            s.keep_iterations = Some(vars.number(
                KEEP_ITERATIONS_SETTING,
                MAX_ITERATIONS,
                1..=MAX_ITERATIONS,
                "",
                " (Custom Vision keeps at most 20 iterations per project)",
            )? as usize);
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn vars_of(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn numbers_default_range_and_name_the_setting() {
        let map = vars_of(&[("A", "7"), ("B", " 0 "), ("C", "x"), ("D", " ")]);
        let lookup = move |k: &str| map.get(k).cloned();
        let vars = Vars::new(&lookup);
        assert_eq!(vars.number("A", 1, 1..=10, "", "").unwrap(), 7);
        assert_eq!(vars.number("D", 3, 1..=10, "", "").unwrap(), 3);
        assert_eq!(vars.number("Z", 3, 1..=10, "", "").unwrap(), 3);
        let e = vars.number("B", 1, 1..=10, " of seconds", "").unwrap_err();
        assert_eq!(
            e.to_string(),
            "setting B: must be a whole number of seconds from 1 to 10"
        );
        let e = vars.number("C", 1, 1..=100, "", " (hint)").unwrap_err();
        assert_eq!(e.problem, "must be a whole number from 1 to 100 (hint)");
    }

    #[test]
    fn lifecycle_settings_are_validated_and_name_the_setting() {
        let map = vars_of(&[
            ("CVCHAIN_GATE", "map>=80%,improves:map"),
            ("CVCHAIN_KEEP_ITERATIONS", "2"),
        ]);
        let lookup = move |k: &str| map.get(k).cloned();
        let s = LifecycleSettings::from_vars(&Vars::new(&lookup)).unwrap();
        assert_eq!(s.gate.rules.len(), 2);
        assert_eq!(s.keep_iterations, Some(2));
        for (name, value) in [
            ("CVCHAIN_GATE", "accuracy>=1"),
            ("CVCHAIN_KEEP_ITERATIONS", "21"),
            ("CVCHAIN_KEEP_ITERATIONS", "0"),
            ("CVCHAIN_CHANNEL_PATH", "{projectName}/{platform}-{flavor}"),
        ] {
            let map = vars_of(&[(name, value)]);
            let lookup = move |k: &str| map.get(k).cloned();
            let e = LifecycleSettings::from_vars(&Vars::new(&lookup)).unwrap_err();
            assert_eq!(e.setting, name, "{value}: {e}");
        }
        let none: HashMap<String, String> = HashMap::new();
        let lookup = move |k: &str| none.get(k).cloned();
        assert_eq!(
            LifecycleSettings::from_vars(&Vars::new(&lookup)).unwrap(),
            LifecycleSettings::default()
        );
    }
}
