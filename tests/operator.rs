//! The daemon and the CLI as an operator meets them: the state-directory lock, signals, exit
//! codes, percent-encoded targets, the audit trail, checked settings, and the project's own docs.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::util::{
    self,
    daemon::{Daemon, PATIENCE, channeld},
};

fn idle_daemon() -> Daemon {
    Daemon::start(&[], "", "", &[])
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_second_run_with_the_same_state_dir_refuses_and_leaves_the_first_reachable() {
    let first = idle_daemon();
    let (_, token_before) = first.api();
    let mut second = Command::new(channeld())
        .args(["run", "--config"])
        .arg(&first.config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(status) = second.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = second.kill();
            panic!("the second daemon kept running");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let out = second.wait_with_output().unwrap();
    let text = stderr(&out);
    assert_eq!(status.code(), Some(1), "{text}");
    assert!(
        text.contains(&format!("pid {}", first.pid())),
        "names the first daemon's pid: {text}"
    );
    assert_eq!(text.lines().count(), 1, "one line: {text}");
    let (_, token_after) = first.api();
    assert_eq!(
        token_before, token_after,
        "the first daemon's token is untouched"
    );
    let status = first.cli(&["status"]);
    assert_eq!(status.status.code(), Some(0), "{}", stderr(&status));

    // `check` stages into the state directory it is given: not into a running daemon's.
    let check = Command::new(channeld())
        .args(["check", "--config"])
        .arg(&first.config)
        .arg("--state-dir")
        .arg(first.root().join("state"))
        .output()
        .unwrap();
    assert_eq!(check.status.code(), Some(1), "{}", stderr(&check));
    assert!(
        stderr(&check).contains(&format!("pid {}", first.pid())),
        "{}",
        stderr(&check)
    );
}

#[test]
fn sighup_leaves_the_daemon_running() {
    let mut daemon = idle_daemon();
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(daemon.pid() as i32, libc::SIGHUP) };
    daemon.wait_for_log("config reloaded");
    let status = daemon.cli(&["status"]);
    assert_eq!(status.status.code(), Some(0), "{}", stderr(&status));
    let (code, log) = daemon.terminate();
    assert_eq!(code.code(), Some(0), "{log}");
}

fn fixture_daemon(extra: &str) -> Daemon {
    Daemon::start(
        &[("fixture.so", util::plugin_file("channeld-plugin-fixture"))],
        "",
        &format!("[health]\ninterval = \"0s\"\n[channels.fixture.accounts.main]\n{extra}"),
        &[],
    )
}

#[test]
fn targets_are_percent_encoded_and_usage_errors_exit_2() {
    let daemon = fixture_daemon("");
    daemon.wait_for_account("fixture", "main", |s| s["running"] == true);

    let spaced = daemon.cli(&["status", "fixture:Main Account"]);
    assert_eq!(spaced.status.code(), Some(1), "{}", stderr(&spaced));
    assert!(
        stderr(&spaced).contains("unknown account fixture:main-account"),
        "{}",
        stderr(&spaced)
    );
    let hashed = daemon.cli(&["status", "fix#ture"]);
    assert_eq!(hashed.status.code(), Some(1), "{}", stderr(&hashed));
    assert!(
        stderr(&hashed).contains("unknown channel \"fix#ture\""),
        "the whole name reaches the daemon: {}",
        stderr(&hashed)
    );
    let stop = daemon.cli(&["stop", "fixture:Main Account"]);
    assert_eq!(stop.status.code(), Some(1), "{}", stderr(&stop));

    for verb in ["reset", "logout"] {
        let usage = daemon.cli(&[verb, "fixture"]);
        assert_eq!(usage.status.code(), Some(2), "{verb}: {}", stderr(&usage));
        assert!(
            stderr(&usage).contains("needs an account"),
            "{}",
            stderr(&usage)
        );
    }
    let reset = daemon.cli(&["reset", "fixture:main"]);
    assert_eq!(reset.status.code(), Some(0), "{}", stderr(&reset));
    assert_eq!(
        String::from_utf8_lossy(&reset.stdout).trim(),
        "fixture:main: reset"
    );
}

#[test]
fn help_has_an_exit_status_section() {
    let out = Command::new(channeld()).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0));
    let section = help.split("EXIT STATUS:").nth(1).expect(&help);
    for code in ["0 ", "1 ", "2 ", "3 "] {
        assert!(section.contains(&format!("  {code}")), "{help}");
    }
}

#[test]
fn a_plugins_log_fields_arrive_as_json_fields_tagged_by_the_host() {
    let daemon = Daemon::start(
        &[("fixture.so", util::plugin_file("channeld-plugin-fixture"))],
        "",
        "[health]\ninterval = \"0s\"\n[channels.fixture.accounts.main]\nlog = true\n",
        &[("CHANNELD_LOG_FORMAT", "json")],
    );
    let line = daemon.wait_for_log("fixture account started");
    let line: serde_json::Value = serde_json::from_str(&line).expect(&line);
    let fields = &line["fields"];
    assert_eq!(fields["starts"], 1, "{line}");
    assert_eq!(fields["flavour"], "salty", "{line}");
    assert_eq!(fields["channel"], "fixture", "{line}");
    assert_eq!(fields["account"], "main", "{line}");
}

#[test]
fn an_operation_through_the_api_leaves_an_audit_line() {
    let daemon = fixture_daemon("");
    daemon.wait_for_account("fixture", "main", |s| s["running"] == true);
    let stop = daemon.cli(&["stop", "fixture:main"]);
    assert_eq!(stop.status.code(), Some(0), "{}", stderr(&stop));
    let line = daemon.wait_for_log("user operation");
    for part in [
        "INFO",
        "channeld::audit",
        "peer=127.0.0.1:",
        "operation=stop",
        "target=fixture:main",
        "result=200",
    ] {
        assert!(line.contains(part), "{part} missing: {line}");
    }
    let refused = daemon.cli(&["reset", "fixture:ghost"]);
    assert_eq!(refused.status.code(), Some(1));
    let line = daemon.wait_for_log_count("user operation", 2);
    assert!(
        line.contains("operation=reset") && line.contains("result=404"),
        "{line}"
    );
}

#[test]
fn an_invalid_rust_log_is_an_error() {
    let out = Command::new(channeld())
        .args(["status"])
        .env("RUST_LOG", "debug,channeld=loud")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("invalid RUST_LOG"),
        "{}",
        stderr(&out)
    );
}

/// The value of a default or of the example, durations compared as durations ("300s" = "5m").
fn same_setting(a: &toml::Value, b: &toml::Value) -> bool {
    let duration = |v: &toml::Value| v.as_str().and_then(|s| humantime::parse_duration(s).ok());
    match (duration(a), duration(b)) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

#[test]
fn the_example_config_lists_every_host_owned_key_with_its_default() {
    let path = util::workspace_root().join("scripts/example-channeld.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let example: toml::Table = toml::from_str(&text).unwrap();
    let mut missing = Vec::new();
    for (section, defaults) in channeld::config::host_owned_defaults() {
        for (key, default) in defaults.as_table().unwrap() {
            match example.get(&section).and_then(|s| s.get(key)) {
                Some(value) if same_setting(value, default) => {}
                Some(value) => missing.push(format!(
                    "[{section}] {key} = {value} in the example, but the default is {default}"
                )),
                None => missing.push(format!("[{section}] {key} (default {default}) is missing")),
            }
        }
    }
    assert!(
        text.contains("# api_token = "),
        "the example shows api_token (no default) in a comment"
    );
    assert!(
        missing.is_empty(),
        "{}:\n{}",
        path.display(),
        missing.join("\n")
    );
    channeld::config::Config::load_for_client(&path).expect("the example loads");
}

/// Files outside the project that its files must not send readers to (built here so that this
/// file does not name them itself).
fn outside_references() -> Vec<String> {
    vec![
        format!("{}.md", "ARCHITECTURE"),
        format!("{}.md", "BEHAVIOUR"),
        format!("..{}shared", '/'),
    ]
}

fn project_files(dir: &std::path::Path, into: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        // Build output, the VCS, and scripts/run's scratch directory are not the project's files.
        if name.starts_with("target") || name == ".git" || name == ".run" {
            continue;
        }
        let kind = entry.file_type().unwrap();
        if kind.is_dir() {
            project_files(&entry.path(), into);
        } else if kind.is_file() {
            into.push(entry.path());
        }
    }
}

#[test]
fn no_file_in_the_project_names_files_outside_it() {
    let root = util::workspace_root();
    let mut files = Vec::new();
    project_files(&root, &mut files);
    assert!(files.len() > 20, "found the project's files");
    let needles = outside_references();
    let mut offenders = Vec::new();
    for file in files {
        let bytes = std::fs::read(&file).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        for needle in &needles {
            if let Some(line) = text.lines().position(|l| l.contains(needle.as_str())) {
                offenders.push(format!(
                    "{}:{}: names {needle}",
                    file.strip_prefix(&root).unwrap().display(),
                    line + 1
                ));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "say it in the project's own words (docs/) instead:\n{}",
        offenders.join("\n")
    );
}

#[test]
fn the_docs_index_is_linked_from_the_readme_and_links_every_page() {
    let root = util::workspace_root();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    assert!(
        readme.contains("(docs/README.md)"),
        "README links the docs index"
    );
    let index = std::fs::read_to_string(root.join("docs/README.md")).unwrap();
    for page in ["behaviour.md", "status.md"] {
        assert!(root.join("docs").join(page).exists(), "docs/{page}");
        assert!(
            index.contains(&format!("({page})")),
            "the index links {page}"
        );
    }
}

#[test]
fn a_daemon_that_cannot_bind_leaves_the_token_and_address_files_alone() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::create_dir(dir.path().join("plugins")).unwrap();
    std::fs::write(state.join("api-token"), "earlier-token").unwrap();
    std::fs::write(state.join("api-address"), "127.0.0.1:9").unwrap();
    let config = dir.path().join("channeld.toml");
    std::fs::write(
        &config,
        format!(
            "[host]\napi_address = \"{}\"\n",
            taken.local_addr().unwrap()
        ),
    )
    .unwrap();
    let out = Command::new(channeld())
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("cannot listen on"),
        "{}",
        stderr(&out)
    );
    for (file, before) in [
        ("api-token", "earlier-token"),
        ("api-address", "127.0.0.1:9"),
    ] {
        assert_eq!(
            std::fs::read_to_string(state.join(file)).unwrap(),
            before,
            "{file}"
        );
    }
}
