//! The API's answers as types shared by the server ([`crate::api`]) and the CLI
//! ([`crate::client`]), and the request paths the CLI builds: each path segment percent-encoded,
//! each account id normalised the way the server normalises it.

use std::collections::BTreeMap;

use channeld_plugin_abi::normalize_account_id;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::{Deserialize, Serialize};

/// Every error answer: `{"error": "…"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// One line saying what is wrong, naming the channel or account.
    pub error: String,
}

/// What an operation did to one account (the `outcome` tags of the supervisor's outcomes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// The task is running.
    Started,
    /// It was running already.
    AlreadyRunning,
    /// Disabled in the config.
    Disabled,
    /// Not configured.
    NotConfigured,
    /// The start failed.
    Failed,
    /// The start did not hand over its task in time.
    TimedOut,
    /// Refused (a previous task is stuck).
    Refused,
    /// Not running (any more).
    Stopped,
    /// Cancelled after the stop timeout.
    Cancelled,
    /// The task would not end.
    Stuck,
    /// The task ended, but the plugin's stop hook failed (an error or a panic).
    HookFailed,
    /// Stopped and its credentials cleared.
    LoggedOut,
    /// Its restart counter was reset.
    Reset,
    /// An outcome this CLI does not know (a newer daemon).
    #[serde(other)]
    Unknown,
}

impl Outcome {
    /// Whether the operation failed for this account (the CLI exits 1).
    pub fn is_failure(self) -> bool {
        matches!(
            self,
            Self::Failed
                | Self::TimedOut
                | Self::Refused
                | Self::Disabled
                | Self::NotConfigured
                | Self::Stuck
                | Self::HookFailed
        )
    }
}

/// One account's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpResult {
    /// What happened.
    pub outcome: Outcome,
    /// Why, for outcomes that carry a reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// For a logout: whether the plugin cleared stored credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cleared: Option<bool>,
}

/// The answer to `POST /v1/accounts/…/{op}`: results keyed by `channel:account`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpAnswer {
    /// Per account.
    pub results: BTreeMap<String, OpResult>,
}

/// What a rescan did to one file (the reconciler's change, as the CLI reads it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeView {
    /// `added`, `replaced`, `removed`, `unchanged` or `failed`.
    pub outcome: String,
    /// The channel concerned, if any.
    #[serde(default)]
    pub channel: Option<String>,
    /// The load error of a failed change.
    #[serde(default)]
    pub error: Option<String>,
}

/// One file of a rescan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RescanEntry {
    /// The file.
    pub file: String,
    /// What happened to it.
    pub change: ChangeView,
}

/// The answer to `POST /v1/rescan`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RescanAnswer {
    /// Every change the rescan made.
    pub changes: Vec<RescanEntry>,
}

/// Everything but RFC 3986's unreserved characters is encoded in a path segment.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// `segment`, percent-encoded for one path segment (`/`, `#`, `?`, spaces and the rest escaped).
pub fn segment(segment: &str) -> String {
    utf8_percent_encode(segment, SEGMENT).to_string()
}

/// `/v1/status[/{channel}[/{account}]]`.
pub fn status_path(channel: Option<&str>, account: Option<&str>) -> String {
    match (channel, account) {
        (None, _) => "/v1/status".to_owned(),
        (Some(channel), None) => format!("/v1/status/{}", segment(channel)),
        (Some(channel), Some(account)) => format!(
            "/v1/status/{}/{}",
            segment(channel),
            segment(&normalize_account_id(account))
        ),
    }
}

/// `/v1/accounts/{channel}[/{account}]/{op}`.
pub fn op_path(channel: &str, account: Option<&str>, op: &str) -> String {
    match account {
        Some(account) => format!(
            "/v1/accounts/{}/{}/{}",
            segment(channel),
            segment(&normalize_account_id(account)),
            segment(op)
        ),
        None => format!("/v1/accounts/{}/{}", segment(channel), segment(op)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_encoded_and_accounts_normalised() {
        assert_eq!(status_path(Some("web#hook"), None), "/v1/status/web%23hook");
        assert_eq!(
            status_path(Some("a/b"), Some("Main Account")),
            "/v1/status/a%2Fb/main-account"
        );
        assert_eq!(
            op_path("webhook", Some("x?y"), "stop"),
            "/v1/accounts/webhook/x-y/stop"
        );
    }

    #[test]
    fn supervisor_outcomes_read_as_typed_results() {
        use crate::supervise::{StartOutcome, StopOutcome};
        let read = |v: serde_json::Value| serde_json::from_value::<OpResult>(v).unwrap();
        let failed = read(serde_json::to_value(StartOutcome::Failed("boom".into())).unwrap());
        assert_eq!(failed.outcome, Outcome::Failed);
        assert_eq!(failed.reason.as_deref(), Some("boom"));
        assert!(failed.outcome.is_failure());
        let stopped = read(serde_json::to_value(StopOutcome::Stopped).unwrap());
        assert_eq!(stopped.outcome, Outcome::Stopped);
        assert!(!stopped.outcome.is_failure());
    }
}
