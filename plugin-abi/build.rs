//! Records the rustc that compiled this crate, so a plugin's metadata can say which compiler built
//! it (the host compares it with its own to show that the ABI, not the compiler, is the contract).
use std::process::Command;

fn main() {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned());
    let version = Command::new(&rustc)
        .arg("--version")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| "rustc (unknown)".to_owned());
    println!("cargo:rustc-env=CHANNELD_RUSTC_VERSION={version}");
    println!("cargo:rerun-if-env-changed=RUSTC");
}
