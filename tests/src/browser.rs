//! Browser test support: Debian's `chromium`, headless, driven through `chromedriver`
//! with the `fantoccini` WebDriver client (over plain HTTP on loopback, no TLS). This
//! file starts the driver, opens windows with a fresh profile each, and adds what the
//! tests need on top: a bound on every command, polling a script until it holds, and
//! screenshots kept as build artefacts. No browser is downloaded; `scripts/setup`
//! installs both packages.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};

/// Where Debian's packages put the browser and its driver.
const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// How long one WebDriver command may take before the test gives up on the driver.
const COMMAND: Duration = Duration::from_secs(60);

/// A running `chromedriver`, stopped when dropped.
pub struct Driver {
    addr: SocketAddr,
    _child: Child,
}

impl Driver {
    /// Start `chromedriver` on a free loopback port.
    pub async fn start() -> anyhow::Result<Self> {
        for binary in [CHROMIUM, CHROMEDRIVER] {
            if !Path::new(binary).exists() {
                bail!(
                    "{binary} is missing: run scripts/setup (it installs Debian's chromium and chromium-driver)"
                );
            }
        }
        let mut child = Command::new(CHROMEDRIVER)
            .args(["--port=0", "--allowed-ips=127.0.0.1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("start chromedriver")?;
        let mut lines = BufReader::new(child.stdout.take().context("chromedriver stdout")?).lines();
        let port = tokio::time::timeout(Duration::from_secs(20), async {
            while let Some(line) = lines.next_line().await? {
                if let Some(rest) = line.split_once("started successfully on port ").map(|(_, p)| p) {
                    return Ok(rest.trim_end_matches('.').parse::<u16>()?);
                }
            }
            bail!("chromedriver exited before it listened")
        })
        .await
        .context("chromedriver did not start within 20 s")??;
        // Keep draining its output so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self { addr: SocketAddr::from(([127, 0, 0, 1], port)), _child: child })
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Open a browser window (its own Chromium process and a fresh profile: no shared
    /// cookies or storage with other windows).
    pub async fn open(&self) -> anyhow::Result<Browser> {
        let profile = std::env::temp_dir().join(format!(
            "roomcast-chromium-{}-{}",
            std::process::id(),
            PROFILES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&profile);
        std::fs::create_dir_all(&profile)?;
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--window-size=1200,760",
            &format!("--user-data-dir={}", profile.display()),
        ];
        let capabilities = json!({
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": CHROMIUM, "args": args },
        });
        let Value::Object(capabilities) = capabilities else { unreachable!("an object") };
        let client = within("POST /session", async {
            ClientBuilder::new(HttpConnector::new()).capabilities(capabilities).connect(&self.url()).await
        })
        .await?;
        let session = within("the session id", client.session_id()).await?.context("no session id")?;
        Ok(Browser { client, driver: self.url(), session, profile })
    }
}

static PROFILES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Run one WebDriver command, within [`COMMAND`].
async fn within<T, E>(what: &str, command: impl Future<Output = Result<T, E>>) -> anyhow::Result<T>
where
    E: std::error::Error + Send + Sync + 'static,
{
    tokio::time::timeout(COMMAND, command)
        .await
        .with_context(|| format!("chromedriver did not answer {what} within {COMMAND:?}"))?
        .with_context(|| what.to_owned())
}

/// One browser window. Closing it (or dropping it) ends its Chromium process.
pub struct Browser {
    client: Client,
    /// The driver's URL and the session's id, to end the session from `Drop`.
    driver: String,
    session: String,
    profile: PathBuf,
}

impl Browser {
    pub async fn goto(&self, url: &str) -> anyhow::Result<()> {
        within(&format!("go to {url}"), self.client.goto(url)).await
    }

    pub async fn click(&self, css: &str) -> anyhow::Result<()> {
        let element = within(&format!("find {css}"), self.client.find(Locator::Css(css))).await?;
        within(&format!("click {css}"), element.click()).await
    }

    /// Clear a text field and type `text` into it, as a person would.
    pub async fn type_into(&self, css: &str, text: &str) -> anyhow::Result<()> {
        let element = within(&format!("find {css}"), self.client.find(Locator::Css(css))).await?;
        within(&format!("clear {css}"), element.clear()).await?;
        within(&format!("type into {css}"), element.send_keys(text)).await
    }

    /// Run `script` (a function body; `arguments` holds the array `args`) in the page.
    pub async fn eval(&self, script: &str, args: Value) -> anyhow::Result<Value> {
        let args = match args {
            Value::Array(args) => args,
            other => vec![other],
        };
        within("execute a script", self.client.execute(script, args)).await
    }

    /// Poll `script` until it returns something truthy (returned), within `bound`.
    pub async fn wait_for(
        &self,
        what: &str,
        script: &str,
        args: Value,
        bound: Duration,
    ) -> anyhow::Result<Value> {
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            let value = self.eval(script, args.clone()).await?;
            if !matches!(&value, Value::Null | Value::Bool(false)) && value != json!("") && value != json!(0)
            {
                return Ok(value);
            }
            if tokio::time::Instant::now() > deadline {
                let page = self.eval("return document.body.innerText", json!([])).await.unwrap_or_default();
                bail!("not within {bound:?}: {what}\n--- the page says ---\n{}", page.as_str().unwrap_or(""));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Resize the window (screenshots show the viewport only).
    pub async fn resize(&self, width: u32, height: u32) -> anyhow::Result<()> {
        within("resize the window", self.client.set_window_size(width, height)).await
    }

    /// Save a PNG of the window to `file`.
    pub async fn screenshot(&self, file: &Path) -> anyhow::Result<()> {
        let png = within("take a screenshot", self.client.screenshot()).await?;
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(file, png)?;
        Ok(())
    }

    /// End the window's Chromium process.
    pub async fn close(mut self) -> anyhow::Result<()> {
        self.session.clear();
        within("end the session", self.client.clone().close()).await
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            // A test that failed midway: its runtime may be ending, and the client's own
            // clean-up with it. End the session from a plain thread with a runtime of its
            // own, so no Chromium outlives the test.
            let (driver, session) = (self.driver.clone(), std::mem::take(&mut self.session));
            let _ = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
                if let Ok(runtime) = runtime {
                    let _ = runtime.block_on(async {
                        let client =
                            Client::with_existing_session(&driver, &session, HttpConnector::new()).await?;
                        within("end the session", client.close()).await
                    });
                }
            })
            .join();
        }
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// Where screenshots go: `target/screenshots/NAME.png` of the build that runs the tests.
pub fn screenshot_path(name: &str) -> PathBuf {
    // The test binary is target/debug/deps/NAME-HASH.
    let exe = std::env::current_exe().unwrap_or_default();
    let target = exe.ancestors().nth(3).map(Path::to_owned).unwrap_or_else(|| PathBuf::from("target"));
    target.join("screenshots").join(format!("{name}.png"))
}
