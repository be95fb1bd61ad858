//! The `roomcast` binary: parses the command line and wires the configuration to
//! [`roomcast::server::run`].
//!
//! Run with: `roomcast serve --plugins DIR`, `roomcast plugin check FILE.wasm`,
//! `roomcast plugin new NAME`.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Arg, ArgMatches, Command};
use roomcast::config::{Config, LogFormat, SETTINGS};

/// A size-class allocator: idle connections cost less memory than with the system
/// allocator, whose freed handshake buffers fragment the heap.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc.h (v3): milliseconds before freed pages go back to
/// the OS.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Give freed memory back after 100 ms rather than mimalloc 3's default of a second.
/// A delayed purge runs only when its thread next allocates or frees, and with the
/// default an idle server kept most of what its connection burst had freed: 4.2 KiB
/// of RSS per idle connection at 19,000, against 3.0 KiB with this.
fn tune_allocator() {
    // SAFETY: sets one integer option of the allocator, which is safe at any time;
    // this runs first in `main`, before any other thread exists.
    #[allow(unsafe_code)]
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 100);
    }
    // No transparent huge pages for this process. mimalloc asks for them on its arenas
    // (before `main`, so its own option comes too late), and the heap then grows and
    // stays resident in 2 MiB steps: 10,000 idle connections took 1.2 to 1.5 KiB each
    // with them, 0.81 to 0.86 without (a huge page stays resident while any of it is
    // in use). The fan-out's CPU per delivery did not change (paired runs,
    // bench/PROFILE.md).
    // SAFETY: `prctl` with integer arguments only; PR_SET_THP_DISABLE changes the
    // process's paging policy and nothing Rust relies on.
    #[allow(unsafe_code)]
    let disabled = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if disabled != 0 {
        // Not fatal: memory per connection is then what the kernel's THP policy makes it.
        eprintln!("roomcast: could not turn transparent huge pages off: {}", std::io::Error::last_os_error());
    }
}

/// How often, at most, an idle worker thread asks the allocator to return what it freed.
const COLLECT_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Called when a runtime worker runs out of work: at most every [`COLLECT_EVERY`] per
/// thread, make mimalloc return the pages this thread freed. Its delayed purges
/// otherwise run only when the thread next allocates, so a server that went quiet
/// after a burst kept that memory resident for as long as it stayed quiet: after 3,000
/// connections that each got 800 KB closed at once, a debug server stayed at 51 MB
/// (29 MB before the burst) without this, and fell to 29 MB within a second with it.
/// A non-forced collect was not enough (it leaves pages whose purge delay has not
/// passed, and the worker then sleeps). Forcing costs a walk over this thread's
/// pages, at most once a second and only when the worker has nothing else to do.
///
/// A park within the second skips the collect, and what the thread freed since stayed
/// resident until the thread next woke: on a server that went quiet, at the first
/// heartbeat 30 s later (3 to 4 MB after 2,000 connections opened within half a
/// second, most of it pages freed within the purge delay). So a skipped park leaves a
/// timer that wakes the runtime when the second is up, and the worker that then parks
/// collects; one such timer at a time, and none once the server stays idle.
fn collect_when_idle() {
    thread_local! {
        static LAST: std::cell::Cell<Option<std::time::Instant>> = const { std::cell::Cell::new(None) };
    }
    static FOLLOW_UP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let now = std::time::Instant::now();
    if let Some(last) = LAST.get()
        && now.duration_since(last) < COLLECT_EVERY
    {
        use std::sync::atomic::Ordering::Relaxed;
        if !FOLLOW_UP.load(Relaxed) && !FOLLOW_UP.swap(true, Relaxed) {
            let due = tokio::time::Instant::from_std(last + COLLECT_EVERY);
            tokio::spawn(async move {
                tokio::time::sleep_until(due).await;
                FOLLOW_UP.store(false, Relaxed);
            });
        }
        return;
    }
    LAST.set(Some(now));
    // SAFETY: `mi_collect` only works on the calling thread's own heap and the
    // allocator's shared structures under its own locks; it is safe at any time.
    #[allow(unsafe_code)]
    unsafe {
        libmimalloc_sys::mi_collect(true);
    }
}

fn cli() -> Command {
    let mut serve = Command::new("serve").about("Run the server").arg(
        Arg::new("config").long("config").value_name("FILE").help("TOML config file; flags override it"),
    );
    for (key, value_name, help) in SETTINGS {
        let mut arg = Arg::new(*key).long(key.replace('_', "-")).value_name(*value_name).help(*help);
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
        .subcommand(
            Command::new("plugin")
                .about("Work with plugins")
                .subcommand_required(true)
                .subcommand(
                    Command::new("check")
                        .about("Load a plugin file and print its name and hooks, or what is wrong with it")
                        .arg(Arg::new("file").value_name("FILE.wasm").required(true)),
                )
                .subcommand(
                    Command::new("new")
                        .about("Write a plugin crate from the echo template")
                        .arg(Arg::new("name").value_name("NAME").required(true))
                        .arg(
                            Arg::new("dir")
                                .long("dir")
                                .value_name("DIR")
                                .default_value(".")
                                .help("Parent folder"),
                        )
                        .arg(
                            Arg::new("sdk")
                                .long("sdk")
                                .value_name("PATH")
                                .help("The guest-sdk folder [default: the one this binary was built from]"),
                        ),
                ),
        )
}

fn plugin_check(file: &str) -> anyhow::Result<()> {
    let runtime = roomcast::plugin::PluginRuntime::new(roomcast::plugin::HostCaps::default())?;
    let report = runtime.check(std::path::Path::new(file))?;
    println!("{report}");
    Ok(())
}

fn plugin_new(matches: &ArgMatches) -> anyhow::Result<()> {
    let name = matches.get_one::<String>("name").expect("required");
    let parent = std::path::Path::new(matches.get_one::<String>("dir").expect("has a default"));
    let sdk = matches
        .get_one::<String>("sdk")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(roomcast::scaffold::default_sdk_path);
    let dir = roomcast::scaffold::new_plugin(name, parent, &sdk)?;
    println!("wrote {}", dir.display());
    println!("build it:  cd {} && cargo build --release", dir.display());
    println!("install:   cp target/wasm32-wasip2/release/{name}.wasm <your plugins folder>/");
    Ok(())
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
    // Colour only for a person at a terminal: not in files, pipes or journald, and
    // never when NO_COLOR is set (https://no-color.org).
    let colour = std::io::IsTerminal::is_terminal(&std::io::stdout())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(colour);
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
        .on_thread_park(collect_when_idle)
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let shutdown = roomcast::server::shutdown::signal().context("cannot install signal handlers")?;
        // The port first: a port in use fails at once, before plugins are compiled.
        let listener = roomcast::server::bind(config.listen, config.listen_backlog)?;
        let server = roomcast::server::Server::new(config)?;
        server.run(listener, shutdown).await?;
        anyhow::Ok(())
    })
}

fn main() -> ExitCode {
    tune_allocator();
    let matches = cli().get_matches();
    let result = match matches.subcommand() {
        Some(("serve", sub)) => serve(sub),
        Some(("plugin", sub)) => match sub.subcommand() {
            Some(("check", check)) => plugin_check(check.get_one::<String>("file").expect("required")),
            Some(("new", new)) => plugin_new(new),
            _ => unreachable!("clap requires a subcommand"),
        },
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
