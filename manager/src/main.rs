//! The `channeld` binary: parses the command line and runs the verb. `anyhow` lives only here.

use std::{path::Path, process::ExitCode, sync::Arc};

use anyhow::Context as _;
use channeld::{
    api_types::{self, OpAnswer, RescanAnswer},
    cli::{Cli, Command, ConfigArgs, LogFormat, OpArgs},
    client::Client,
    clock::{Clock, SystemClock},
    config::Config,
    daemon,
    stage::StagingDir,
    status::StatusBoard,
    status_table,
};
use clap::Parser as _;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(error) = channeld::logging::init(cli.log_format == LogFormat::Json) {
        eprintln!("channeld: {error}");
        return ExitCode::from(2);
    }
    match run(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("channeld: {error:#}");
            let code = match error.downcast_ref::<channeld::daemon::DaemonError>() {
                Some(channeld::daemon::DaemonError::NotEveryAccountStopped(_)) => {
                    channeld::daemon::EXIT_NOT_ALL_STOPPED
                }
                _ => error
                    .downcast_ref::<channeld::client::ClientError>()
                    .map_or(1, |e| e.exit_code()),
            };
            ExitCode::from(code)
        }
    }
}

/// The config the flags name: `--config`, else ./channeld.toml if present, else the defaults.
fn load_config(args: &ConfigArgs) -> anyhow::Result<Config> {
    load_with(args, Config::load)
}

/// The same, for the verbs that only talk to the daemon (channel secrets stay unresolved).
fn load_client_config(args: &ConfigArgs) -> anyhow::Result<Config> {
    load_with(args, Config::load_for_client)
}

fn load_with(
    args: &ConfigArgs,
    load: fn(&Path) -> Result<Config, channeld::config::ConfigError>,
) -> anyhow::Result<Config> {
    match &args.config {
        Some(path) => Ok(load(path)?),
        None if Path::new("channeld.toml").exists() => Ok(load(Path::new("channeld.toml"))?),
        None => Ok(Config::defaults(Path::new("."))),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        // Each thread's heap grown once, up front: starting many accounts then makes no
        // `mprotect` call per page of heap it grows.
        .on_thread_start(channeld_plugin_abi::grow_thread_arena)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run {
            config,
            plugins_dir,
        } => {
            let mut config = load_config(&config)?;
            if let Some(dir) = plugins_dir {
                config.host.plugins_dir = dir;
            }
            runtime()?.block_on(daemon::run(config))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check {
            config,
            plugins_dir,
            state_dir,
        } => {
            let mut config = load_config(&config)?;
            if let Some(dir) = plugins_dir {
                config.host.plugins_dir = dir;
            }
            let runtime = runtime()?;
            let code = runtime.block_on(check(config, state_dir));
            // A plugin call that never returned (each was bounded) must not hold the exit.
            runtime.shutdown_timeout(std::time::Duration::from_millis(100));
            code
        }
        Command::Status {
            config,
            target,
            json,
        } => {
            let config = load_client_config(&config)?;
            let client = Client::from_config(&config)?;
            let path = api_types::status_path(
                target.as_ref().map(|t| t.channel.as_str()),
                target.as_ref().and_then(|t| t.account.as_deref()),
            );
            let status: serde_json::Value = client.get(&path)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", status_table::render(&status, SystemClock.wall_ms()));
                // Then a line per starved plugin runtime (none from an older daemon).
                if let Ok(runtimes) = client.get::<serde_json::Value>("/v1/runtimes") {
                    print!("{}", channeld::health::starvation::render(&runtimes));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Plugins { config, json } => {
            let config = load_client_config(&config)?;
            let listing: serde_json::Value = Client::from_config(&config)?.get("/v1/plugins")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&listing)?);
            } else {
                print!("{}", status_table::render_plugins(&listing));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Reload { config, json } => {
            // A file the CLI cannot read is one the daemon would refuse too.
            let config = load_client_config(&config).map_err(|e| {
                anyhow::anyhow!("{e:#}; channeld was not asked to reload: the running config stays")
            })?;
            let report: channeld::reload::ReloadReport =
                Client::from_config(&config)?.post("/v1/reload")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                for line in channeld::reload::report_lines(&report) {
                    println!("{line}");
                }
            }
            Ok(if report.failed.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Rescan { config, json } => {
            let config = load_client_config(&config)?;
            let raw: serde_json::Value = Client::from_config(&config)?.post("/v1/rescan")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&raw)?);
            }
            let answer: RescanAnswer =
                serde_json::from_value(raw).context("reading channeld's rescan answer")?;
            let mut failed = false;
            for entry in &answer.changes {
                let outcome = entry.change.outcome.as_str();
                failed |= outcome == "failed";
                if !json && outcome != "unchanged" {
                    let detail = entry
                        .change
                        .error
                        .as_deref()
                        .or(entry.change.channel.as_deref())
                        .unwrap_or("");
                    println!("{}: {outcome} {detail}", entry.file);
                }
            }
            Ok(if failed {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Tail {
            config,
            target,
            since,
            json,
        } => {
            let config = load_client_config(&config)?;
            channeld::tail::follow(
                &config,
                target.as_ref(),
                since,
                json,
                &mut std::io::stdout().lock(),
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Cluster { config, json } => {
            let config = load_client_config(&config)?;
            let view = Client::from_config(&config)?.get::<serde_json::Value>("/v1/cluster")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&view)?);
            } else {
                print!("{}", channeld::cluster::render(&view));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Journal { config, json } => {
            let config = load_client_config(&config)?;
            let answer = Client::from_config(&config)?.get::<serde_json::Value>("/v1/journal")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&answer)?);
            } else {
                for (key, value) in answer["journal"].as_object().into_iter().flatten() {
                    println!("{key}: {value}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Send {
            config,
            target,
            conversation,
            text,
            wait,
            key,
            json,
        } => {
            let client = Client::from_config(&load_client_config(&config)?)?;
            let send = channeld::outbox::cli::Send {
                target,
                conversation,
                text,
                wait,
                key,
                json,
            };
            Ok(ExitCode::from(send.run(&client)?))
        }
        Command::Messages {
            config,
            id,
            state,
            cancel,
            figures,
            json,
        } => {
            let client = Client::from_config(&load_client_config(&config)?)?;
            let code = if figures {
                channeld::outbox::cli::figures(&client, json)?
            } else {
                channeld::outbox::cli::messages(&client, id, state, cancel, json)?
            };
            Ok(ExitCode::from(code))
        }
        Command::IsolateChild {
            plugin,
            source,
            worker_threads,
            max_log_level,
        } => {
            let code = channeld::isolate::child::run(channeld::isolate::child::ChildArgs {
                plugin,
                source,
                worker_threads,
                max_log_level,
            });
            Ok(ExitCode::from(code as u8))
        }
        Command::Completions { shell } => {
            channeld::manual::completions(shell, &mut std::io::stdout())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Man => {
            channeld::manual::man(&mut std::io::stdout())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Start(args) => op(args, "start"),
        Command::Stop(args) => op(args, "stop"),
        Command::Restart(args) => op(args, "restart"),
        Command::Logout(args) => op(args, "logout"),
        Command::Reset(args) => op(args, "reset"),
    }
}

/// An account operation through the API; exit 1 if any account's outcome is a failure.
fn op(args: OpArgs, verb: &str) -> anyhow::Result<ExitCode> {
    if args.target.account.is_none() && matches!(verb, "logout" | "reset") {
        use clap::CommandFactory as _;
        Cli::command()
            .error(
                clap::error::ErrorKind::MissingRequiredArgument,
                format!(
                    "`{verb}` needs an account: channeld {verb} {}:ACCOUNT",
                    args.target.channel
                ),
            )
            .exit();
    }
    let config = load_client_config(&args.config)?;
    let client = Client::from_config(&config)?;
    let path = api_types::op_path(&args.target.channel, args.target.account.as_deref(), verb);
    let raw: serde_json::Value = client.post(&path)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&raw)?);
    }
    let answer: OpAnswer =
        serde_json::from_value(raw).context("reading channeld's answer to the operation")?;
    let mut failed = false;
    for (key, result) in &answer.results {
        failed |= result.outcome.is_failure();
        if !args.json {
            let outcome = serde_json::to_value(result.outcome)?;
            let outcome = outcome.as_str().unwrap_or("?");
            let reason = result
                .reason
                .as_deref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default();
            println!("{key}: {outcome}{reason}");
        }
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// `channeld check`: loads the plugins directory through the catalog, the daemon's own load path
/// (each file bounded by `load_timeout`, on a loader thread, so a constructor that never returns
/// is reported by its file name as timed out), registers each channel with its config (which
/// lists its accounts) and starts nothing.
async fn check(config: Config, state_dir: Option<std::path::PathBuf>) -> anyhow::Result<ExitCode> {
    let temp;
    let state_dir = match state_dir {
        Some(dir) => dir,
        None => {
            temp = tempfile::tempdir().context("creating a temporary state directory")?;
            temp.path().to_owned()
        }
    };
    // Staging wipes its directory: never under a running daemon's feet.
    daemon::prepare_state_dir(&state_dir)?;
    let _lock = channeld::state_lock::StateLock::acquire(&state_dir)?;
    let staging = StagingDir::open(&state_dir.join("staging"))
        .with_context(|| format!("staging directory in {}", state_dir.display()))?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let board = Arc::new(StatusBoard::new(clock.clone()));
    let config = Arc::new(config);
    let (supervisor, catalog) = daemon::open_catalog(config.clone(), staging, board, clock)?;
    catalog.load_initial().await?;
    catalog.close().await;
    let listing = catalog.listing();
    let mut problems = 0;
    for plugin in catalog.plugins() {
        let channel = &plugin.info.channel_id;
        let accounts = supervisor.channel(channel).map_or(0, |c| c.accounts.len());
        println!(
            "ok      {}  {channel} {}  ({accounts} account{})",
            plugin.staged.source.display(),
            plugin.info.plugin_version,
            if accounts == 1 { "" } else { "s" }
        );
    }
    for refused in listing.plugins.iter().filter(|p| p.state == "failed") {
        problems += 1;
        println!(
            "refused {}",
            refused.load_error.as_deref().unwrap_or_default()
        );
    }
    for channel in config.channels.keys() {
        if catalog.plugin(channel).is_none() {
            problems += 1;
            println!("missing [channels.{channel}]: no plugin provides this channel");
        }
    }
    catalog.shutdown_plugins().await;
    Ok(if problems == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
