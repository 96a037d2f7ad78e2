//! What the stand-in checks requests against, read from the Training API's OpenAPI specs (the
//! copies in `tests/fixtures/customvision/`, from Azure/azure-rest-api-specs) rather than from
//! cvchain's own lists, so a mistake in cvchain cannot hide behind the stand-in agreeing with it.

use serde_json::Value;
use std::{collections::BTreeSet, sync::OnceLock};

/// The API versions served, each under `/customvision/{version}/training`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ApiVersion {
    V3_3,
    /// The default of Microsoft's Python SDK 3.1 (`azure-cognitiveservices-vision-customvision`).
    V3_4Preview,
}

impl ApiVersion {
    pub const ALL: [ApiVersion; 2] = [ApiVersion::V3_3, ApiVersion::V3_4Preview];

    /// The version's path segment.
    pub fn path(self) -> &'static str {
        match self {
            ApiVersion::V3_3 => "v3.3",
            ApiVersion::V3_4Preview => "v3.4-preview",
        }
    }

    /// The version's OpenAPI document.
    pub fn document(self) -> &'static str {
        match self {
            ApiVersion::V3_3 => include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../tests/fixtures/customvision/Training.v3.3.json"
            )),
            ApiVersion::V3_4Preview => include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../tests/fixtures/customvision/Training.v3.4-preview.json"
            )),
        }
    }

    pub fn spec(self) -> &'static Spec {
        static SPECS: [OnceLock<Spec>; 2] = [OnceLock::new(), OnceLock::new()];
        let i = match self {
            ApiVersion::V3_3 => 0,
            ApiVersion::V3_4Preview => 1,
        };
        SPECS[i].get_or_init(|| Spec::parse(self.document()).expect("the bundled spec parses"))
    }
}

/// The enums of one spec version the stand-in validates with.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    /// ExportIteration's `platform` enum.
    pub platforms: Vec<String>,
    /// ExportIteration's `flavor` enum.
    pub flavors: Vec<String>,
    /// Which flavors each platform takes, from the `Export.flavor` description ("Docker platform
    /// has valid flavors: Linux, Windows, ARM."); a platform it does not name takes none.
    pub flavors_by_platform: Vec<(String, Vec<String>)>,
    /// `CustomVisionErrorCodes`.
    pub error_codes: BTreeSet<String>,
    /// `ImageCreateStatus`.
    pub image_statuses: BTreeSet<String>,
}

impl Spec {
    pub fn parse(document: &str) -> Result<Spec, String> {
        let doc: Value = serde_json::from_str(document).map_err(|e| e.to_string())?;
        let strings = |v: &Value, what: &str| -> Result<Vec<String>, String> {
            v.as_array()
                .ok_or_else(|| format!("{what} is not an array"))?
                .iter()
                .map(|x| {
                    x.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| format!("{what} holds a non-string"))
                })
                .collect()
        };
        let export_op =
            &doc["paths"]["/projects/{projectId}/iterations/{iterationId}/export"]["post"];
        let param = |name: &str| -> Result<&Value, String> {
            export_op["parameters"]
                .as_array()
                .and_then(|ps| ps.iter().find(|p| p["name"] == name))
                .ok_or_else(|| format!("ExportIteration has no {name} parameter"))
        };
        let platforms = strings(&param("platform")?["enum"], "platform enum")?;
        let flavors = strings(&param("flavor")?["enum"], "flavor enum")?;
        let description = doc["definitions"]["Export"]["properties"]["flavor"]["description"]
            .as_str()
            .ok_or("Export.flavor has no description")?;
        let mut flavors_by_platform: Vec<(String, Vec<String>)> = Vec::new();
        for line in description.lines() {
            let Some((who, list)) = line.split_once(" platform has valid flavors:") else {
                continue;
            };
            let who = who.trim().to_ascii_lowercase();
            let platform = platforms
                .iter()
                .find(|p| p.to_ascii_lowercase().starts_with(&who))
                .ok_or_else(|| format!("the flavor description names an unknown platform {who}"))?;
            let mut names = Vec::new();
            for f in list.trim().trim_end_matches('.').split(',') {
                let f = f.trim();
                if !flavors.iter().any(|k| k == f) {
                    return Err(format!(
                        "flavor {f} of {platform} is not in the flavor enum"
                    ));
                }
                names.push(f.to_owned());
            }
            flavors_by_platform.push((platform.clone(), names));
        }
        let error_codes = strings(
            &doc["definitions"]["CustomVisionError"]["properties"]["code"]["enum"],
            "CustomVisionErrorCodes",
        )?
        .into_iter()
        .collect();
        let image_statuses = strings(
            &doc["definitions"]["ImageCreateResult"]["properties"]["status"]["enum"],
            "ImageCreateStatus",
        )?
        .into_iter()
        .collect();
        Ok(Spec {
            platforms,
            flavors,
            flavors_by_platform,
            error_codes,
            image_statuses,
        })
    }

    /// The platform in the spec's spelling (matched case-insensitively, as the service does).
    pub fn platform(&self, name: &str) -> Option<&str> {
        self.platforms
            .iter()
            .find(|p| p.eq_ignore_ascii_case(name))
            .map(String::as_str)
    }

    /// Checks a platform and flavor against the enums and their pairing; answers the flavor in
    /// the spec's spelling (none for an absent or empty one).
    pub fn export_target(
        &self,
        platform: &str,
        flavor: Option<&str>,
    ) -> Result<(String, Option<String>), String> {
        let Some(platform) = self.platform(platform) else {
            return Err(format!(
                "{platform} is not an export platform (the API takes {})",
                self.platforms.join(", ")
            ));
        };
        let Some(flavor) = flavor.filter(|f| !f.is_empty()) else {
            return Ok((platform.to_owned(), None));
        };
        let Some(canonical) = self.flavors.iter().find(|k| k.eq_ignore_ascii_case(flavor)) else {
            return Err(format!(
                "{flavor} is not an export flavor (the API takes {})",
                self.flavors.join(", ")
            ));
        };
        let allowed = self
            .flavors_by_platform
            .iter()
            .find(|(p, _)| p == platform)
            .map(|(_, f)| f.as_slice())
            .unwrap_or_default();
        if !allowed.contains(canonical) {
            return Err(if allowed.is_empty() {
                format!("{platform} takes no flavor, not {canonical}")
            } else {
                format!(
                    "{canonical} is not a flavor of {platform} (it takes {})",
                    allowed.join(", ")
                )
            });
        }
        Ok((platform.to_owned(), Some(canonical.clone())))
    }

    pub fn has_code(&self, code: &str) -> bool {
        self.error_codes.contains(code)
    }

    /// `preferred` when this version's enum has it, else `fallback` (which every version has).
    pub fn code_or(&self, preferred: &'static str, fallback: &'static str) -> &'static str {
        if self.has_code(preferred) {
            preferred
        } else {
            fallback
        }
    }
}

/// A domain the stand-in knows: ids as in the service (the spec's GetDomains example).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Domain {
    pub id: &'static str,
    pub name: &'static str,
    /// Compact domains make exportable iterations (to every platform of the API version).
    pub compact: bool,
}

pub const DOMAINS: &[Domain] = &[
    Domain {
        id: "ee85a74c-405e-4adc-bb47-ffa8ca0c9f31",
        name: "General",
        compact: false,
    },
    Domain {
        id: "c151d5b5-dd07-472a-acc8-15d29dea8518",
        name: "Food",
        compact: false,
    },
    Domain {
        id: "ca455789-012d-4b50-9fec-5bb63841c793",
        name: "Landmarks",
        compact: false,
    },
    Domain {
        id: "b30a91ae-e3c1-4f73-a81e-c270bff27c39",
        name: "Retail",
        compact: false,
    },
    Domain {
        id: "0732100f-1a38-4e49-a514-c9b44c697ab5",
        name: "General (compact)",
        compact: true,
    },
    Domain {
        id: "b5cfd229-2ac7-4b2b-8d0a-2b0661344894",
        name: "Landmarks (compact)",
        compact: true,
    },
    Domain {
        id: "6b4faeda-8396-481b-9f8b-177b9fa3097f",
        name: "Retail (compact)",
        compact: true,
    },
];

/// The default domain of CreateProject, as in the service.
pub const GENERAL_DOMAIN: &str = "ee85a74c-405e-4adc-bb47-ffa8ca0c9f31";
pub const COMPACT_DOMAIN: &str = "0732100f-1a38-4e49-a514-c9b44c697ab5";

pub fn domain(id: &uuid::Uuid) -> Option<&'static Domain> {
    let id = id.to_string();
    DOMAINS.iter().find(|d| d.id == id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_enums_come_from_the_specs() {
        let v33 = ApiVersion::V3_3.spec();
        let v34 = ApiVersion::V3_4Preview.spec();
        assert!(v33.platform("openvino").is_none(), "v3.3 has no OpenVino");
        assert_eq!(v34.platform("openvino"), Some("OpenVino"));
        assert_eq!(v33.error_codes.len(), 130);
        assert!(v34.has_code("BadRequestInvalidUri") && !v33.has_code("BadRequestInvalidUri"));
        assert_eq!(
            v34.export_target("dockerfile", Some("arm")),
            Ok(("DockerFile".into(), Some("ARM".into())))
        );
        assert_eq!(
            v34.export_target("TensorFlow", Some("TensorFlowLite")),
            Ok(("TensorFlow".into(), Some("TensorFlowLite".into())))
        );
        assert_eq!(v34.export_target("VAIDK", None), Ok(("VAIDK".into(), None)));
        // Flavors cvchain's own list knows but neither spec does, and wrong pairings.
        for (p, f) in [
            ("TensorFlow", "TensorFlowSavedModel"),
            ("CoreML", "CoreMLFloat16"),
            ("ONNX", "OnnxFloat16"),
            ("OpenVino", "NoPostProcess"),
            ("ONNX", "Linux"),
            ("CoreML", "ONNX10"),
        ] {
            assert!(v34.export_target(p, Some(f)).is_err(), "{p}:{f}");
        }
        assert!(v33.export_target("OpenVino", None).is_err());
        assert!(v34.export_target("Caffe", None).is_err());
    }
}
