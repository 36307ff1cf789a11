//! Answers keygate writes itself, shaped like Google's so SDKs parse and surface them:
//! `{"error":{"code","message","status"}}`, wrapped in an array on OpenAI-compatible paths.

use crate::wire::request::Api;
use bytes::Bytes;

/// An error answer keygate sends on its own.
#[derive(Debug, Clone)]
pub struct GatewayError {
    /// HTTP status.
    pub code: u16,
    /// Google's status name, e.g. `RESOURCE_EXHAUSTED`.
    pub status: &'static str,
    /// What happened and what to do, for a person. Never holds a key or token.
    pub message: String,
    /// Seconds for the `Retry-After` header.
    pub retry_after: Option<u64>,
}

impl GatewayError {
    /// A new error answer without `Retry-After`.
    pub fn new(code: u16, status: &'static str, message: impl Into<String>) -> Self {
        GatewayError {
            code,
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    /// The JSON body, array-wrapped for the OpenAI-compatible API.
    pub fn body(&self, api: Option<Api>) -> Bytes {
        let error = serde_json::json!({
            "error": {"code": self.code, "message": self.message, "status": self.status}
        });
        let value = match api {
            Some(Api::OpenAi) => serde_json::Value::Array(vec![error]),
            _ => error,
        };
        Bytes::from(value.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        let e = GatewayError::new(401, "UNAUTHENTICATED", "no \"token\"");
        let native: serde_json::Value = serde_json::from_slice(&e.body(Some(Api::Gemini))).unwrap();
        assert_eq!(native["error"]["code"], 401);
        assert_eq!(native["error"]["status"], "UNAUTHENTICATED");
        assert_eq!(native["error"]["message"], "no \"token\"");
        let openai: serde_json::Value = serde_json::from_slice(&e.body(Some(Api::OpenAi))).unwrap();
        assert_eq!(openai[0]["error"]["code"], 401);
    }
}
