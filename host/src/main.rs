//! The `roomcast` binary: parses the command line and wires the configuration to
//! [`roomcast::server::run`].
//!
//! Run with: `roomcast serve --plugins plugins/dist`

use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Arg, ArgMatches, Command};
use roomcast::config::{Config, LogFormat, SETTINGS};

fn cli() -> Command {
    let mut serve = Command::new("serve").about("Run the server").arg(
        Arg::new("config")
            .long("config")
            .value_name("FILE")
            .help("TOML config file; flags override it"),
    );
    for (key, value_name, help) in SETTINGS {
        let mut arg = Arg::new(*key)
            .long(key.replace('_', "-"))
            .value_name(*value_name)
            .help(*help);
        if *key == "admin_token" {
            arg = arg.env("ROOMCAST_ADMIN_TOKEN").hide_env_values(true);
        }
        serve = serve.arg(arg);
    }
    Command::new("roomcast")
        .about("A WebSocket room server whose room logic lives in WebAssembly components")
        .version(env!("CARGO_PKG_VERSION"))
        .subcommand_required(true)
        .subcommand(serve)
}

fn load_config(matches: &ArgMatches) -> anyhow::Result<Config> {
    let mut config = Config::default();
    if let Some(file) = matches.get_one::<String>("config") {
        config.apply_file(std::path::Path::new(file))?;
    }
    for (key, _, _) in SETTINGS {
        if let Some(value) = matches.get_one::<String>(key) {
            config.apply_flag(&key.replace('_', "-"), value)?;
        }
    }
    Ok(config)
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ROOMCAST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn serve(matches: &ArgMatches) -> anyhow::Result<()> {
    let config = load_config(matches)?;
    init_logging(config.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let listener = roomcast::server::bind(config.listen, config.listen_backlog)?;
        roomcast::server::run(listener, config, roomcast::shutdown::signal()).await?;
        anyhow::Ok(())
    })
}

fn main() -> ExitCode {
    let matches = cli().get_matches();
    let result = match matches.subcommand() {
        Some(("serve", sub)) => serve(sub),
        _ => unreachable!("clap requires a subcommand"),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("roomcast: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
