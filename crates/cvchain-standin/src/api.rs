//! The service's request and answer conventions: every error is a JSON `CustomVisionError`
//! (`{"code", "message"}`) with its HTTP status, query parameters are matched case-insensitively
//! (as ASP.NET binds them), and bodies are parsed here so a malformed one is a coded error too.

use axum::{
    Json,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde::de::DeserializeOwned;
use serde_json::json;
use time::OffsetDateTime;
use uuid::Uuid;

/// An error answer in the service's shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    pub fn required(name: &str) -> Self {
        Self::bad_request(
            "BadRequestRequiredParamIsNull",
            format!("{name} is required"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error(self.status, self.code, &self.message)
    }
}

/// The service's error body.
pub fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (status, Json(json!({ "code": code, "message": message }))).into_response()
}

pub type ApiResult = Result<Response, ApiError>;

/// A query string, its names matched case-insensitively.
#[derive(Debug, Clone, Default)]
pub struct Params(Vec<(String, String)>);

impl Params {
    pub fn parse(query: Option<&str>) -> Self {
        Self(
            query
                .map(|q| {
                    url::form_urlencoded::parse(q.as_bytes())
                        .into_owned()
                        .collect()
                })
                .unwrap_or_default(),
        )
    }

    /// The value of `name`, if given and not empty.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    }

    pub fn bool(&self, name: &str) -> Result<Option<bool>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) if v.eq_ignore_ascii_case("true") => Ok(Some(true)),
            Some(v) if v.eq_ignore_ascii_case("false") => Ok(Some(false)),
            Some(v) => Err(ApiError::bad_request(
                "BadRequestInvalid",
                format!("{name} must be true or false, not {v}"),
            )),
        }
    }

    pub fn int(&self, name: &str, min: i64, max: i64) -> Result<Option<i64>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => match v.parse::<i64>() {
                Ok(n) if (min..=max).contains(&n) => Ok(Some(n)),
                _ => Err(ApiError::bad_request(
                    "BadRequestInvalid",
                    format!("{name} must be a whole number from {min} to {max}, not {v}"),
                )),
            },
        }
    }

    /// A comma-separated list of ids (`tagIds`, `imageIds`).
    pub fn ids(&self, name: &str, max: usize) -> Result<Vec<Uuid>, ApiError> {
        let Some(v) = self.get(name) else {
            return Ok(Vec::new());
        };
        let ids = v
            .split(',')
            .map(|s| parse_id(s.trim()))
            .collect::<Result<Vec<_>, _>>()?;
        if ids.len() > max {
            return Err(ApiError::bad_request(
                "BadRequestExceededBatchSize",
                format!("{name} takes at most {max} ids"),
            ));
        }
        Ok(ids)
    }
}

pub fn parse_id(s: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(s).map_err(|_| {
        ApiError::bad_request("BadRequestInvalidIds", format!("{s} is not a valid id"))
    })
}

/// A JSON body: an absent one is `BadRequestRequiredParamIsNull` naming the parameter, one that
/// does not parse or fit the model is `BadRequestInvalid` with serde's reason.
pub fn json_body<T: DeserializeOwned>(body: &[u8], name: &str) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::required(name));
    }
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request("BadRequestInvalid", format!("{name} cannot be read: {e}"))
    })
}

/// An optional JSON body (TrainProject's `trainingParameters`, CreateProject's `options`).
pub fn optional_json<T: DeserializeOwned>(body: &[u8], name: &str) -> Result<Option<T>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) || body == b"null" {
        return Ok(None);
    }
    json_body(body, name).map(Some)
}

/// RFC 3339 with milliseconds: iterations trained a moment apart keep their order.
pub fn now_string() -> String {
    let now = OffsetDateTime::now_utc();
    now.replace_millisecond(now.millisecond())
        .unwrap_or(now)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_names_match_in_any_case_and_values_are_checked() {
        let p = Params::parse(Some("PublishName=prod&overwrite=TRUE&take=300&tagIds=x"));
        assert_eq!(p.get("publishName"), Some("prod"));
        assert_eq!(p.bool("overwrite"), Ok(Some(true)));
        assert_eq!(p.int("take", 0, 256).unwrap_err().code, "BadRequestInvalid");
        assert_eq!(
            p.ids("tagIds", 20).unwrap_err().code,
            "BadRequestInvalidIds"
        );
        assert_eq!(p.get("absent"), None);
    }

    #[test]
    fn bodies_give_coded_errors() {
        assert_eq!(
            json_body::<serde_json::Value>(b" ", "batch")
                .unwrap_err()
                .code,
            "BadRequestRequiredParamIsNull"
        );
        assert_eq!(
            json_body::<serde_json::Value>(b"{", "batch")
                .unwrap_err()
                .code,
            "BadRequestInvalid"
        );
        assert_eq!(optional_json::<serde_json::Value>(b"", "x"), Ok(None));
    }
}
