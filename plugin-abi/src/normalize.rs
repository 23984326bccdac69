//! Account-id normalisation, shared by host and SDK so both sides agree on which table an id names.

/// The longest account id, in characters.
pub const MAX_ACCOUNT_ID_LEN: usize = 64;

/// The id an empty account name normalises to.
pub const DEFAULT_ACCOUNT_ID: &str = "default";

/// Normalises an account id: trim, lowercase, every run of characters outside `[a-z0-9_-]`
/// becomes one `-`, dashes at the edges are stripped, at most 64 characters; empty → `default`.
///
/// ```
/// use channeld_plugin_abi::normalize_account_id;
/// assert_eq!(normalize_account_id("  Libera Chat! "), "libera-chat");
/// assert_eq!(normalize_account_id("***"), "default");
/// ```
pub fn normalize_account_id(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut in_run = false;
    for c in raw.trim().chars().flat_map(char::to_lowercase) {
        if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-' {
            out.push(c);
            in_run = false;
        } else if !in_run {
            out.push('-');
            in_run = true;
        }
    }
    let trimmed: String = out
        .trim_matches('-')
        .chars()
        .take(MAX_ACCOUNT_ID_LEN)
        .collect();
    // Cutting at 64 can leave a dash at the new edge.
    let trimmed = trimmed.trim_end_matches('-');
    if trimmed.is_empty() {
        DEFAULT_ACCOUNT_ID.to_owned()
    } else {
        trimmed.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_as_behaviour_md_says() {
        assert_eq!(normalize_account_id("Libera"), "libera");
        assert_eq!(normalize_account_id(" a  b "), "a-b");
        assert_eq!(normalize_account_id("a..b__c--d"), "a-b__c--d");
        assert_eq!(normalize_account_id("-x-"), "x");
        assert_eq!(normalize_account_id(""), "default");
        assert_eq!(normalize_account_id("ÄÖ"), "default");
        let long = "a".repeat(70);
        assert_eq!(normalize_account_id(&long).len(), 64);
        let edge = format!("{}!b", "a".repeat(63));
        assert_eq!(normalize_account_id(&edge), "a".repeat(63));
    }
}
