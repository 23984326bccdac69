//! The one error type plugin code returns.

use std::fmt;

/// An error from plugin code: a message the host shows as the account's `lastError`.
///
/// * Any `std::error::Error` converts into it with `?`; the message keeps the error's source
///   chain.
/// * For errors that are not a `std::error::Error` (a `String`, a `&str`, an `anyhow::Error`),
///   use [`PluginError::msg`], or [`ResultExt::context`] on the `Result`, which works for any
///   error that implements `Display` (an `anyhow::Error` keeps its causes):
///   `parse(x).context("reading the token")?`.
///
/// Why it does not implement `std::error::Error` itself, and why there is no `From<String>`: the
/// blanket `impl<E: std::error::Error> From<E> for PluginError` is what makes `?` work on every
/// error type. If `PluginError` were an `Error`, that impl would overlap with the standard
/// `From<T> for T`; and `From<String>` / `From<&str>` / `From<anyhow::Error>` are refused by the
/// compiler beside it, because their crates may one day implement `Error` for those types.
pub struct PluginError {
    message: String,
}

/// The result of a fallible hook: `Result<T, PluginError>`.
pub type PluginResult<T = ()> = Result<T, PluginError>;

impl PluginError {
    /// An error with this message.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }

    /// An error from anything that displays: `.map_err(PluginError::msg)`. It is formatted with
    /// `{:#}`, which is plain `{}` for most types and, for an `anyhow::Error`, keeps its chain of
    /// causes ("outer: inner").
    pub fn msg(message: impl fmt::Display) -> Self {
        Self {
            message: format!("{message:#}"),
        }
    }

    /// The same error with `context` in front: "context: message".
    pub fn context(self, context: impl fmt::Display) -> Self {
        Self {
            message: format!("{context}: {}", self.message),
        }
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl<E: std::error::Error> From<E> for PluginError {
    fn from(error: E) -> Self {
        let mut message = error.to_string();
        let mut source = error.source();
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        Self { message }
    }
}

impl fmt::Display for PluginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl fmt::Debug for PluginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PluginError({:?})", self.message)
    }
}

/// Turns any `Result` whose error displays into a [`PluginResult`], with a context line.
pub trait ResultExt<T> {
    /// The error becomes a [`PluginError`] reading "context: error".
    fn context(self, context: impl fmt::Display) -> PluginResult<T>;
}

impl<T, E: fmt::Display> ResultExt<T> for Result<T, E> {
    fn context(self, context: impl fmt::Display) -> PluginResult<T> {
        self.map_err(|e| PluginError::msg(format!("{context}: {e:#}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_convert_and_carry_context() {
        fn io() -> PluginResult {
            Err(std::io::Error::other("disk full"))?;
            Ok(())
        }
        assert_eq!(io().unwrap_err().message(), "disk full");
        let owned: Result<(), String> = Err("bad token".into());
        assert_eq!(
            owned.context("login").unwrap_err().message(),
            "login: bad token"
        );
        assert_eq!(PluginError::msg("x").context("y").message(), "y: x");
    }
}
