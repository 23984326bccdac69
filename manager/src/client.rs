//! The CLI's side of the API: finds the daemon's address and token from the same config, sends
//! one request, reads the answer as its [`crate::api_types`] type, and maps failures to the CLI's
//! exit codes: 3 only when the daemon cannot be reached (connect error, timeout), 1 otherwise.

use std::time::Duration;

use crate::{
    api_types::ErrorBody,
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

    fn answer<T: serde::de::DeserializeOwned>(
        &self,
        result: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<T, ClientError> {
        let mut response = result.map_err(|e| self.request_error(e))?;
        let status = response.status();
        if status.is_success() {
            response
                .body_mut()
                .read_json()
                .map_err(|e| ClientError::Failed(format!("unreadable answer from channeld: {e}")))
        } else {
            let message = response
                .body_mut()
                .read_json::<ErrorBody>()
                .map(|b| b.error)
                .unwrap_or_else(|_| "request failed".to_owned());
            Err(ClientError::Failed(format!(
                "{message} (HTTP {})",
                status.as_u16()
            )))
        }
    }

    fn request_error(&self, error: ureq::Error) -> ClientError {
        classify(&self.base, error)
    }

    /// `GET path`.
    pub fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
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
        let response = result.map_err(|e| self.request_error(e))?;
        if response.status().is_success() {
            return Ok(response.into_body());
        }
        self.answer::<serde_json::Value>(Ok(response))
            .and_then(|_| Err(ClientError::Failed("unexpected answer".into())))
    }

    /// `POST path` with no body.
    pub fn post<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let result = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {}", self.token))
            .send_empty();
        self.answer(result)
    }

    /// `POST path` with a JSON body.
    pub fn post_json<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &impl serde::Serialize,
    ) -> Result<T, ClientError> {
        let result = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {}", self.token))
            .send_json(body);
        self.answer(result)
    }

    /// `DELETE path`.
    pub fn delete<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let result = self
            .agent
            .delete(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {}", self.token))
            .call();
        self.answer(result)
    }
}

/// Connect errors and timeouts mean the daemon is not there (exit 3); anything else is a failed
/// request (exit 1).
fn classify(address: &str, error: ureq::Error) -> ClientError {
    use std::io::ErrorKind as K;
    let unreachable = match &error {
        ureq::Error::ConnectionFailed | ureq::Error::HostNotFound | ureq::Error::Timeout(_) => true,
        ureq::Error::Io(e) => matches!(
            e.kind(),
            K::ConnectionRefused
                | K::AddrNotAvailable
                | K::HostUnreachable
                | K::NetworkUnreachable
                | K::TimedOut
        ),
        _ => false,
    };
    if unreachable {
        ClientError::Unreachable {
            address: address.to_owned(),
            reason: error.to_string(),
        }
    } else {
        ClientError::Failed(format!("request to channeld at {address} failed: {error}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_connect_errors_and_timeouts_are_unreachable() {
        let code = |e| classify("http://127.0.0.1:1", e).exit_code();
        let io = |kind| ureq::Error::Io(std::io::Error::from(kind));
        assert_eq!(code(ureq::Error::ConnectionFailed), 3);
        assert_eq!(code(io(std::io::ErrorKind::ConnectionRefused)), 3);
        assert_eq!(code(io(std::io::ErrorKind::TimedOut)), 3);
        assert_eq!(code(ureq::Error::BadUri("http://x/a b".into())), 1);
        assert_eq!(code(ureq::Error::BodyExceedsLimit(10)), 1);
        assert_eq!(code(io(std::io::ErrorKind::ConnectionReset)), 1);
    }
}
