//! The `channeld` binary: parses the command line and runs the verb. `anyhow` lives only here.

use std::{io::IsTerminal as _, process::ExitCode, sync::Arc};

use anyhow::Context as _;
use clap::Parser as _;
use manager::{
    cli::{Cli, Command, LogFormat},
    clock::SystemClock,
    registry::{Loader, Registry},
    stage::StagingDir,
    status::StatusBoard,
};
use tracing_subscriber::EnvFilter;

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match run(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("channeld: {error:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Check {
            plugins_dir,
            state_dir,
        } => {
            let temp;
            let state_dir = match state_dir {
                Some(dir) => dir,
                None => {
                    temp = tempfile::tempdir().context("creating a temporary state directory")?;
                    temp.path().to_owned()
                }
            };
            let staging = StagingDir::open(&state_dir.join("staging"))
                .with_context(|| format!("staging directory in {}", state_dir.display()))?;
            let clock = Arc::new(SystemClock);
            let board = Arc::new(StatusBoard::new(clock.clone()));
            let loader = Loader::new(staging, board, clock);
            let mut registry = Registry::default();
            let report = registry.load_dir(&loader, &plugins_dir)?;
            for plugin in registry.iter() {
                println!(
                    "ok      {}  {} {}  ({})",
                    plugin.staged.source.display(),
                    plugin.info.channel_id,
                    plugin.info.plugin_version,
                    plugin.info.display_name
                );
            }
            for error in &report.failed {
                println!("refused {error}");
            }
            Ok(if report.failed.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}
