//! The CLI's side of the API: finds the daemon's address and token from the same config, sends
//! one request, and maps failures to the CLI's exit codes.

use std::time::Duration;

use serde_json::Value;

use crate::{
    config::Config,
    daemon::{ADDRESS_FILE, TOKEN_FILE},
};

/// Why a CLI request did not succeed; each maps to an exit code.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The daemon is not there (exit 3).
    #[error(
        "cannot reach channeld at {address}: {reason}. Is `channeld run` running with this config?"
    )]
    Unreachable {
        /// Where it was looked for.
        address: String,
        /// Why.
        reason: String,
    },
    /// The daemon answered with an error (exit 1).
    #[error("{0}")]
    Failed(String),
    /// The token could not be found (exit 3).
    #[error(
        "no API token: {0}. Set [host] api_token, or start `channeld run` with this config first"
    )]
    NoToken(String),
}

impl ClientError {
    /// The CLI's exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Failed(_) => 1,
            Self::Unreachable { .. } | Self::NoToken(_) => 3,
        }
    }
}

/// A client for the daemon the config describes.
pub struct Client {
    base: String,
    token: String,
    agent: ureq::Agent,
}

impl Client {
    /// Reads address and token from `config`.
    pub fn from_config(config: &Config) -> Result<Self, ClientError> {
        let token = match &config.host.api_token {
            Some(token) => token.expose().to_owned(),
            None => {
                let path = config.host.state_dir.join(TOKEN_FILE);
                std::fs::read_to_string(&path)
                    .map(|t| t.trim().to_owned())
                    .map_err(|e| ClientError::NoToken(format!("{}: {e}", path.display())))?
            }
        };
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(300)))
            .http_status_as_error(false)
            .build()
            .into();
        // Port 0 means "any": the daemon wrote the address it got into the state directory.
        let address = if config.host.api_address.port() == 0 {
            let path = config.host.state_dir.join(ADDRESS_FILE);
            std::fs::read_to_string(&path)
                .map(|a| a.trim().to_owned())
                .map_err(|e| ClientError::Unreachable {
                    address: path.display().to_string(),
                    reason: e.to_string(),
                })?
        } else {
            config.host.api_address.to_string()
        };
        Ok(Self {
            base: format!("http://{address}"),
            token,
            agent,
        })
    }

    fn answer(
        &self,
        result: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<Value, ClientError> {
        let mut response = result.map_err(|e| ClientError::Unreachable {
            address: self.base.clone(),
            reason: e.to_string(),
        })?;
        let status = response.status();
        let body: Value = response
            .body_mut()
            .read_json()
            .unwrap_or_else(|e| serde_json::json!({ "error": format!("unreadable answer: {e}") }));
        if status.is_success() {
            Ok(body)
        } else {
            let message = body["error"]
                .as_str()
                .unwrap_or("request failed")
                .to_owned();
            Err(ClientError::Failed(format!(
                "{message} (HTTP {})",
                status.as_u16()
            )))
        }
    }

    /// `GET path`.
    pub fn get(&self, path: &str) -> Result<Value, ClientError> {
        let result = self
            .agent
            .get(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {}", self.token))
            .call();
        self.answer(result)
    }

    /// `GET path` as a stream (Server-Sent Events): the body, to be read as it arrives, with no
    /// overall timeout.
    pub fn stream(&self, path: &str) -> Result<ureq::Body, ClientError> {
        let result = self
            .agent
            .get(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {}", self.token))
            .header("Accept", "text/event-stream")
            .config()
            .timeout_global(None)
            .build()
            .call();
        let response = result.map_err(|e| ClientError::Unreachable {
            address: self.base.clone(),
            reason: e.to_string(),
        })?;
        if response.status().is_success() {
            return Ok(response.into_body());
        }
        self.answer(Ok(response))
            .and_then(|_| Err(ClientError::Failed("unexpected answer".into())))
    }

    /// `POST path` with no body.
    pub fn post(&self, path: &str) -> Result<Value, ClientError> {
        let result = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {}", self.token))
            .send_empty();
        self.answer(result)
    }
}
