//! Browser test support: Debian's `chromium`, headless, driven through `chromedriver`
//! with a small W3C WebDriver client written here (JSON over HTTP/1.1 on loopback, on
//! the workspace's tokio and serde_json). No browser is downloaded; `scripts/setup`
//! installs both packages.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use base64::Engine as _;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// Where Debian's packages put the browser and its driver.
const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// The W3C name of an element reference in JSON.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

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
        let capabilities = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": CHROMIUM, "args": args },
        }}});
        let created = request(self.addr, "POST", "/session", Some(&capabilities)).await?;
        let session = created["sessionId"].as_str().context("no session id")?.to_owned();
        Ok(Browser { driver: self.addr, session, profile })
    }
}

static PROFILES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// One browser window. Closing it (or dropping it) ends its Chromium process.
pub struct Browser {
    driver: SocketAddr,
    session: String,
    profile: PathBuf,
}

impl Browser {
    async fn command(&self, method: &str, path: &str, body: Option<&Value>) -> anyhow::Result<Value> {
        request(self.driver, method, &format!("/session/{}{path}", self.session), body).await
    }

    pub async fn goto(&self, url: &str) -> anyhow::Result<()> {
        self.command("POST", "/url", Some(&json!({ "url": url }))).await.map(drop)
    }

    /// The first element matching a CSS selector.
    pub async fn find(&self, css: &str) -> anyhow::Result<String> {
        let found = self
            .command("POST", "/element", Some(&json!({ "using": "css selector", "value": css })))
            .await
            .with_context(|| format!("find {css}"))?;
        Ok(found[ELEMENT].as_str().context("no element reference")?.to_owned())
    }

    pub async fn click(&self, css: &str) -> anyhow::Result<()> {
        let element = self.find(css).await?;
        self.command("POST", &format!("/element/{element}/click"), Some(&json!({}))).await.map(drop)
    }

    /// Clear a text field and type `text` into it, as a person would.
    pub async fn type_into(&self, css: &str, text: &str) -> anyhow::Result<()> {
        let element = self.find(css).await?;
        self.command("POST", &format!("/element/{element}/clear"), Some(&json!({}))).await?;
        self.command("POST", &format!("/element/{element}/value"), Some(&json!({ "text": text })))
            .await
            .map(drop)
    }

    /// Run `script` (a function body; `arguments` holds `args`) in the page.
    pub async fn eval(&self, script: &str, args: Value) -> anyhow::Result<Value> {
        self.command("POST", "/execute/sync", Some(&json!({ "script": script, "args": args }))).await
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
        self.command("POST", "/window/rect", Some(&json!({ "width": width, "height": height })))
            .await
            .map(drop)
    }

    /// Save a PNG of the window to `file`.
    pub async fn screenshot(&self, file: &Path) -> anyhow::Result<()> {
        let encoded = self.command("GET", "/screenshot", None).await?;
        let png = base64::engine::general_purpose::STANDARD.decode(encoded.as_str().context("no image")?)?;
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(file, png)?;
        Ok(())
    }

    /// End the window's Chromium process.
    pub async fn close(mut self) -> anyhow::Result<()> {
        let session = std::mem::take(&mut self.session);
        request(self.driver, "DELETE", &format!("/session/{session}"), None).await.map(drop)
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            // A test that failed midway: end the browser from a plain thread (no runtime
            // needed), so no Chromium outlives the test.
            let (driver, path) = (self.driver, format!("/session/{}", self.session));
            let _ = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
                if let Ok(runtime) = runtime {
                    let _ = runtime.block_on(request(driver, "DELETE", &path, None));
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

/// One WebDriver call: the JSON `value` of the answer, or the driver's error.
async fn request(
    driver: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> anyhow::Result<Value> {
    let body = body.map(Value::to_string).unwrap_or_default();
    let mut stream = TcpStream::connect(driver).await.context("connect to chromedriver")?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {driver}\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    // chromedriver keeps the connection open: read the head, then exactly the body.
    let (status, payload) = tokio::time::timeout(Duration::from_secs(60), read_response(&mut stream))
        .await
        .with_context(|| format!("chromedriver did not answer {method} {path}"))??;
    let json: Value = serde_json::from_slice(&payload)
        .with_context(|| format!("{method} {path}: not JSON: {}", String::from_utf8_lossy(&payload)))?;
    if status != 200 {
        bail!(
            "{method} {path}: {status}: {}",
            json["value"]["message"].as_str().unwrap_or(&json.to_string())
        );
    }
    Ok(json["value"].clone())
}

/// Read one HTTP/1.1 response: status and body (by `Content-Length`, chunks, or to
/// the end of the stream).
async fn read_response(stream: &mut TcpStream) -> anyhow::Result<(u16, Vec<u8>)> {
    let mut data = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let head_end = loop {
        if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            bail!("connection closed before the response head");
        }
        data.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&data[..head_end]).to_ascii_lowercase();
    let status = crate::status_of(&head).context("no status")?;
    let mut body = data.split_off(head_end + 4);
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    let chunked = head.contains("transfer-encoding: chunked");
    loop {
        let complete = match length {
            Some(length) => body.len() >= length,
            None if chunked => dechunk(&body).is_ok(),
            None => false,
        };
        if complete {
            break;
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&buf[..n]);
    }
    if chunked {
        body = dechunk(&body)?;
    }
    Ok((status, body))
}

/// Decode an HTTP/1.1 chunked body.
fn dechunk(mut data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n").context("bad chunk")?;
        let size_text = std::str::from_utf8(&data[..line_end])?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(data.get(..size).context("short chunk")?);
        data = data.get(size + 2..).context("short chunk")?;
    }
}
